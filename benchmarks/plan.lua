-- wrk sends a finite plan of requests, each at most once, counts or times the answers,
-- and stops with nothing in flight.
--
--   wrk -t T -c C -d CAP -s plan.lua URL -- DIR RATE WINDOW_US T C/T START_US TIMED STOP FINISHED
--
-- DIR holds plan-<thread>.txt: the thread's HTTP requests as they go on the wire, one
-- after the other (no bodies: each ends with an empty line).
--   RATE      requests/s of each thread; 0: as fast as the server answers. A paced thread
--             spreads its connections' requests evenly; threads are offset from each other.
--   WINDOW_US answers are counted (or timed) per window of this many µs of CLOCK_MONOTONIC,
--             so that the windows of threads and of separate wrk processes line up.
--   C/T       connections per thread.
--   START_US  CLOCK_MONOTONIC µs at which every thread starts sending: wrk starts threads one
--             after another as it loads their plans, which takes a while for big plans.
--   TIMED     1: one connection per thread (C/T = 1), and each answer's latency is kept;
--             0: answers are only counted (any number of connections per thread).
--   STOP      a file; once it exists, the threads send nothing more ("-": none).
--   FINISHED  a file this run creates when its plan is done ("-": none), for another run's STOP.
--
-- Why a plan and not wrk's usual endless loop: when wrk's duration ends it drops the
-- requests in flight, which the server may or may not have recorded, so what the server
-- counted could not be checked exactly. wrk calls delay() before each request of a
-- connection, the first one and then each time the previous answer is complete. delay()
-- reserves the next plan line; when the plan is used up (or STOP exists) it parks the
-- connection (an hour's delay). A plan neither paced nor timed does without delay(), whose
-- timers change how wrk's requests reach the server (direct_request): request() reserves,
-- and parks with an empty request. Once all of a thread's connections are parked, the thread
-- writes its answers to DIR/lat-<thread>.txt and marks DIR/done-<thread>; the thread that
-- finds every mark sends SIGINT to wrk, which stops at once and calls done(). Nothing is in
-- flight then: every request sent was answered.
--
-- Latency (TIMED) is measured here, not taken from wrk's statistics: wrk 4 "corrects" its
-- histogram for coordinated omission with synthetic samples derived from the run's mean
-- rate, which is not what a closed-loop run measured. Here it is the time from building a
-- request to the call of delay() after its answer, with CLOCK_MONOTONIC; with one connection
-- per thread, that answer can only be this request's. lat-<n>.txt has one line per window:
-- "WINDOW COUNT [LATENCY_US ...]".
--
-- done() prints one line "PLAN-RESULT {json}" with wrk's counts and each thread's.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } plan_timespec;
int clock_gettime(int clock, plan_timespec *tp);
int kill(int pid, int sig);
int getpid(void);
int usleep(unsigned int usec);
]]
local CLOCK_MONOTONIC = 1
local SIGINT = 2
local PARKED_MS = 3600 * 1000
local timespec = ffi.new("plan_timespec")

local function now_us()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
  return tonumber(timespec.tv_sec) * 1000000 + math.floor(tonumber(timespec.tv_nsec) / 1000)
end

local function exists(path)
  local file = io.open(path, "r")
  if file == nil then return false end
  file:close()
  return true
end

-- main state: the threads, for done()
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("id", #threads)
end

-- thread state; globals so that done() can read them with thread:get
planned, reserved, sent, answered, fillers = 0, 0, 0, 0, 0
first_us, done_us, late, late_max_us = 0, 0, 0, 0
complete = 0

local plan = {}
local dir, window_us, threads_total, connections, start_us, timed, stop_file, finished_file
local calls, parked = 0, 0
local interval_us, next_us = 0, 0
local filler
local pending_since = 0
local counts, latencies = {}, {}
local stopped = false
local direct, verified = false, false

function init(args)
  dir = args[1]
  local rate = tonumber(args[2])
  window_us = tonumber(args[3])
  threads_total = tonumber(args[4])
  connections = tonumber(args[5])
  start_us = tonumber(args[6])
  timed = args[7] == "1"
  if args[8] ~= "-" then stop_file = args[8] end
  if args[9] ~= "-" then finished_file = args[9] end
  if rate > 0 then
    interval_us = 1000000 / rate
    next_us = start_us + (id - 1) * interval_us / threads_total
  end
  -- Unpaced and untimed, the plan is kept without delay(): with it, wrk sends each request
  -- from a timer one turn of its loop after the answer, in bursts, and the server reads them
  -- in fewer, bigger batches than a plain wrk run sends (nginx took 7.6-8.1 µs a request
  -- so, 9.3-9.4 without). request() then counts, reserves and parks (see direct_request).
  direct = rate == 0 and not timed
  if direct then delay = nil end
  local file = assert(io.open(dir .. "/plan-" .. id .. ".txt", "rb"))
  local data = file:read("*a")
  file:close()
  local at = 1
  while true do
    local _, last = data:find("\r\n\r\n", at, true)
    if last == nil then break end
    plan[#plan + 1] = data:sub(at, last)
    at = last + 1
  end
  planned = #plan
  -- Sent only if wrk re-opens a connection after an error (it then skips delay()), and
  -- built once at start, when wrk checks the script.
  filler = wrk.format("GET", "/healthz")
end

local function save()
  local out = assert(io.open(dir .. "/lat-" .. id .. ".txt", "w"))
  for window, count in pairs(counts) do
    out:write(window, " ", count)
    local values = latencies[window]
    if values ~= nil then out:write(" ", table.concat(values, " ")) end
    out:write("\n")
  end
  out:close()
end

local function finish(now)
  done_us = now
  complete = 1
  save()
  local mark = assert(io.open(dir .. "/done-" .. id, "w"))
  mark:close()
  -- The last thread to finish sees every mark (each writes its own before looking).
  for i = 1, threads_total do
    if not exists(dir .. "/done-" .. i) then return end
  end
  if finished_file ~= nil then assert(io.open(finished_file, "w")):close() end
  ffi.C.kill(ffi.C.getpid(), SIGINT)
end

function delay()
  local now = now_us()
  calls = calls + 1
  -- Each connection calls once before its first request, then once per answer. (Untimed,
  -- an early answer may be counted in place of a connection's first call: the window it
  -- is counted in can be off by that, never the total.)
  if (timed and pending_since > 0) or (not timed and calls > connections) then
    local window = math.floor(now / window_us)
    counts[window] = (counts[window] or 0) + 1
    answered = answered + 1
    if timed then
      local values = latencies[window]
      if values == nil then
        values = {}
        latencies[window] = values
      end
      values[#values + 1] = now - pending_since
      pending_since = 0
    end
  end
  if not stopped and stop_file ~= nil and exists(stop_file) then stopped = true end
  if reserved >= planned or stopped then
    parked = parked + 1
    if parked == connections then finish(now) end
    return PARKED_MS
  end
  reserved = reserved + 1
  if interval_us == 0 then
    if now < start_us then return math.ceil((start_us - now) / 1000) end
    return 0
  end
  local wait = next_us - now
  next_us = next_us + interval_us
  if wait <= 0 then
    -- Behind the schedule: every connection was busy. Counted, so that a paced run whose
    -- latencies hide such waits (coordinated omission) shows it.
    if -wait > 1000 then
      late = late + 1
      if -wait > late_max_us then late_max_us = -wait end
    end
    return 0
  end
  -- wrk's timers count whole ms: rounded, a request leaves within half a ms of its slot.
  return math.floor(wait / 1000 + 0.5)
end

-- The plan without delay(): a connection asks for its next request once its answer is in,
-- so request() counts the answer and reserves the line; a plan used up (or STOP) is an
-- empty request, which leaves the connection idle with nothing in flight: parked.
local function direct_request()
  if not verified then
    verified = true
    -- Before starting, wrk asks thread 1 for one request to check the script.
    if id == 1 then return filler end
  end
  local now = now_us()
  if calls == 0 and now < start_us then
    ffi.C.usleep(start_us - now)
    now = now_us()
  end
  calls = calls + 1
  if calls > connections then
    local window = math.floor(now / window_us)
    counts[window] = (counts[window] or 0) + 1
    answered = answered + 1
  end
  if not stopped and stop_file ~= nil and exists(stop_file) then stopped = true end
  if reserved >= planned or stopped then
    parked = parked + 1
    if parked == connections then finish(now) end
    return ""
  end
  reserved = reserved + 1
  sent = sent + 1
  if sent == 1 then first_us = now end
  return plan[sent]
end

function request()
  if direct then return direct_request() end
  if sent < reserved then
    sent = sent + 1
    pending_since = now_us()
    if sent == 1 then first_us = pending_since end
    return plan[sent]
  end
  if reserved > 0 then fillers = fillers + 1 end
  pending_since = 0
  return filler
end

function done(summary, latency, requests)
  local rows = {}
  for _, t in ipairs(threads) do
    rows[#rows + 1] = string.format(
      '{"id":%d,"planned":%d,"sent":%d,"answered":%d,"complete":%d,"fillers":%d,' ..
      '"first_us":%d,"done_us":%d,"late":%d,"late_max_us":%d}',
      t:get("id"), t:get("planned"), t:get("sent"), t:get("answered"), t:get("complete"),
      t:get("fillers"), t:get("first_us"), t:get("done_us"), t:get("late"),
      t:get("late_max_us"))
  end
  local e = summary.errors
  io.write(string.format(
    'PLAN-RESULT {"requests":%d,"duration_us":%d,"errors":{"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d},"threads":[%s]}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(rows, ",")))
end
