-- wrk sends a finite plan of requests, each exactly once, times every answer, then stops.
--
--   wrk -t N -c N -d CAP -s plan.lua URL -- DIR RATE_PER_THREAD WINDOW_US N
--
-- One connection per thread (-t and -c equal), so that each thread always knows which
-- request an answer belongs to. DIR holds agents.txt (one user agent a line) and
-- plan-<thread>.txt, one request a line: "METHOD PATH AGENT [X-FORWARDED-FOR]", AGENT
-- a line number of agents.txt (0: no User-Agent header). RATE_PER_THREAD 0 sends as fast
-- as the server answers; above 0 it paces the thread's requests to that many a second.
--
-- Why a plan and not wrk's usual endless loop: when wrk's duration ends it drops the
-- requests in flight, which the server may or may not have recorded, so what the server
-- counted could not be checked exactly. Here wrk calls delay() before every request, and
-- (with one connection) only once the previous answer is complete. delay() reserves the
-- next plan line; once the plan is used up it parks the connection (an hour's delay),
-- writes the thread's latencies to DIR/lat-<thread>.txt and DIR/done-<thread>, and the
-- thread that finds every done file there sends SIGINT to wrk, which stops at once. So
-- nothing is in flight at the end and every planned request was answered.
--
-- Latency is measured here, not taken from wrk's statistics: wrk 4 "corrects" its
-- histogram for coordinated omission with synthetic samples derived from the run's mean
-- rate, which is not what a closed-loop run measured. Here it is the time from building
-- a request to the call of delay() after its answer, per request, with CLOCK_MONOTONIC.
-- Each latency is kept in the window (WINDOW_US) its answer came in: lat-<n>.txt has
-- one line per window, "WINDOW LATENCY_US LATENCY_US ...", WINDOW counted from the
-- clock's epoch, so the threads' windows line up.
--
-- done() prints one line "PLAN-RESULT {json}" with wrk's counts and each thread's.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } plan_timespec;
int clock_gettime(int clock, plan_timespec *tp);
int kill(int pid, int sig);
int getpid(void);
]]
local CLOCK_MONOTONIC = 1
local SIGINT = 2
local PARKED_MS = 3600 * 1000
local timespec = ffi.new("plan_timespec")

local function now_us()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
  return tonumber(timespec.tv_sec) * 1000000 + math.floor(tonumber(timespec.tv_nsec) / 1000)
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
local dir, window_us, threads_total
local interval_us, next_us = 0, 0
local filler
local pending_since = 0
local windows = {}

function init(args)
  dir = args[1]
  local rate = tonumber(args[2])
  window_us = tonumber(args[3])
  threads_total = tonumber(args[4])
  if rate > 0 then interval_us = 1000000 / rate end
  local agents = {}
  for line in io.lines(dir .. "/agents.txt") do agents[#agents + 1] = line end
  for line in io.lines(dir .. "/plan-" .. id .. ".txt") do
    local method, path, agent, forwarded = line:match("^(%S+) (%S+) (%d+) ?(%S*)$")
    local headers = {}
    local index = tonumber(agent)
    if index > 0 then headers["User-Agent"] = agents[index] end
    if forwarded ~= "" then headers["X-Forwarded-For"] = forwarded end
    plan[#plan + 1] = wrk.format(method, path, headers)
  end
  planned = #plan
  -- Sent only if wrk re-opens a connection after an error (it then skips delay()), and
  -- built once at start, when wrk checks the script.
  filler = wrk.format("GET", "/healthz")
end

local function save()
  local out = assert(io.open(dir .. "/lat-" .. id .. ".txt", "w"))
  for window, values in pairs(windows) do
    out:write(window, " ", table.concat(values, " "), "\n")
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
    local other = io.open(dir .. "/done-" .. i, "r")
    if other == nil then return end
    other:close()
  end
  ffi.C.kill(ffi.C.getpid(), SIGINT)
end

function delay()
  local now = now_us()
  if pending_since > 0 then
    local window = math.floor(now / window_us)
    local values = windows[window]
    if values == nil then
      values = {}
      windows[window] = values
    end
    values[#values + 1] = now - pending_since
    answered = answered + 1
    pending_since = 0
  end
  if reserved >= planned then
    if complete == 0 then finish(now) end
    return PARKED_MS
  end
  reserved = reserved + 1
  if interval_us == 0 then return 0 end
  if next_us == 0 then next_us = now end
  local wait = next_us - now
  next_us = next_us + interval_us
  if wait <= 0 then
    -- Behind the schedule: the previous answer came late. Counted, so that a paced run
    -- whose latencies hide such waits (coordinated omission) shows it.
    if -wait > 1000 then
      late = late + 1
      if -wait > late_max_us then late_max_us = -wait end
    end
    return 0
  end
  return math.floor(wait / 1000)
end

function request()
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
