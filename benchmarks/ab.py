"""A/B: tracker's CPU per hit for two checkouts (or two settings), side by side in one run.

    python benchmarks/ab.py --a /path/to/checkout-a --b /path/to/checkout-b [--rounds 3]
    python benchmarks/ab.py --a . --b . --b-env TRACKER_DURABILITY=journal

Both servers run at once on one PostgreSQL, pinned to the same core (0); wrk (core 1)
loads them in turn, pixel then click, for `--rounds` rounds, so a change in the
machine's other load touches both alike. The figure is CPU per request of each server's
processes, read from /proc, which holds steadier than req/s on a shared machine. A
checkout is any directory with a `tracker/` package (e.g. `git worktree add /tmp/b HEAD~1`).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import Database, require, start_tracker, stop, tree_cpu_seconds
from load import LUA, USER_AGENTS, _prepare


def _env(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="checkout A")
    parser.add_argument("--b", type=Path, required=True, help="checkout B")
    parser.add_argument("--a-env", nargs="*", default=[], help="VAR=value for A")
    parser.add_argument("--b-env", nargs="*", default=[], help="VAR=value for B")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    require("wrk", "taskset")
    for checkout in (args.a, args.b):
        if not (checkout / "tracker" / "__init__.py").exists():
            raise SystemExit(f"{checkout}: no tracker/ package there")

    work = Path(tempfile.mkdtemp(prefix="tracker-ab-"))
    (work / "agents.txt").write_text("\n".join(USER_AGENTS) + "\n")
    (work / "paths.lua").write_text(LUA)
    db = Database(work / "pg")
    servers: dict[str, tuple[subprocess.Popen[bytes], str, Path]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    try:
        for name, checkout, extra in (("A", args.a, args.a_env), ("B", args.b, args.b_env)):
            directory = work / name
            directory.mkdir()
            proc, url = start_tracker(db.dsn, directory, name=name,
                                      PYTHONPATH=str(checkout.resolve()), **_env(extra))
            pixels, clicks = asyncio.run(_prepare(db.dsn, url, 2000, 5))
            (directory / "pixels.txt").write_text("\n".join(pixels) + "\n")
            (directory / "clicks.txt").write_text("\n".join(clicks) + "\n")
            servers[name] = (proc, url, directory)
        for _ in range(args.rounds):
            for kind in ("pixels", "clicks"):
                for name, (proc, url, directory) in servers.items():
                    before = tree_cpu_seconds(proc.pid)
                    out = subprocess.run(
                        ["taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{args.seconds}s",
                         "-s", str(work / "paths.lua"), url, "--",
                         str(directory / f"{kind}.txt"), str(work / "agents.txt")],
                        capture_output=True, text=True, check=True).stdout
                    used = tree_cpu_seconds(proc.pid) - before
                    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
                    cpu.setdefault((kind, name), []).append(used / requests * 1e6)
                    time.sleep(1)  # the writer catches up outside the next measurement
    finally:
        for proc, _, _ in servers.values():
            stop(proc)
        db.stop()
    print(f"\n{args.rounds} rounds of {args.seconds} s, both servers pinned to core 0; "
          "CPU µs per request (median, min)")
    for kind in ("pixels", "clicks"):
        a, b = sorted(cpu[(kind, "A")]), sorted(cpu[(kind, "B")])
        ma, mb = a[len(a) // 2], b[len(b) // 2]
        print(f"{kind:<7} A {ma:6.2f} ({a[0]:6.2f})   B {mb:6.2f} ({b[0]:6.2f})   "
              f"B/A {mb / ma:5.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
