"""The least memory a phi3 command runs in: the command run again inside a memory cgroup at each limit given.

Linux, as root, with a cgroup v1 memory controller (/sys/fs/cgroup/memory) or cgroup v2 (memory.max). The cgroup
counts page cache, so a model read through a memory map counts only for the pages the runtime holds; with no swap,
a command over the limit is killed by the kernel (exit 137), as it would be on a machine with that much memory.

    python -m benchmarks.memory_floor --limit 2.5 --limit 3 --limit 4 -- phi3 chat -m FOLDER -n 16 Hello

Each run gets a new empty PHI3_HOME unless --keep-home (a cold load: the runtime's compiled-model cache is written
too). Prints, per limit, whether the command finished, how it ended (its error line, if it printed one), the
cgroup's peak and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")
NAME = "phi3-memory-floor"


def make_group() -> tuple[Path, str, str]:
    """A memory cgroup of our own: its folder, the file that sets its limit and the one that reports its peak."""
    if (V1 / "memory.limit_in_bytes").exists():
        group = V1 / NAME
        group.mkdir(exist_ok=True)
        return group, "memory.limit_in_bytes", "memory.max_usage_in_bytes"
    group = V2 / NAME
    group.mkdir(exist_ok=True)
    return group, "memory.max", "memory.peak"


def run_limited(command: list[str], limit_gb: float, env: dict[str, str]) -> dict:
    group, limit_file, peak_file = make_group()
    (group / limit_file).write_text(str(int(limit_gb * 1e9)))
    if peak_file == "memory.max_usage_in_bytes":
        (group / peak_file).write_text("0")
    start = time.perf_counter()
    # The child joins the group before it execs the command, so everything it starts is counted.
    done = subprocess.run(
        ["sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$@"', "sh", *command],
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    peak = (group / peak_file).read_text().strip() if (group / peak_file).exists() else ""
    lines = done.stderr.strip().splitlines() or [""]
    error = next((line for line in lines if line.startswith("Error:")), lines[-1])
    return {
        "limit_gb": limit_gb,
        "finished": done.returncode == 0,
        "returncode": done.returncode,
        "peak_gb": round(int(peak) / 1e9, 2) if peak.isdigit() else None,
        "seconds": round(seconds, 1),
        "error": "" if done.returncode == 0 else error[:300],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=float, action="append", required=True, help="memory limit in GB (repeat)")
    parser.add_argument("--keep-home", action="store_true", help="use the PHI3_HOME of the environment")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command (phi3 ... or python ...)")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    if command[0] == "phi3":
        command = [sys.executable, "-m", "phi3cli", *command[1:]]
    rows = []
    for limit in sorted(args.limit):
        with tempfile.TemporaryDirectory(prefix="phi3-floor-") as home:
            env = dict(os.environ) if args.keep_home else {**os.environ, "PHI3_HOME": home}
            row = run_limited(command, limit, env)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
