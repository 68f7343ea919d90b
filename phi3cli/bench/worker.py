"""The subprocess that measures one configuration: `python -m phi3cli.bench.worker JOB.json RESULT.json`.

It reads a MeasureJob, measures it in this fresh process, and writes {"ok": true, ...figures} or
{"ok": false, "error": message} to RESULT.json. Progress goes to stdout as lines starting with
PROGRESS_PREFIX, which the parent relays; anything else a runtime prints is ignored.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

PROGRESS_PREFIX = "@phi3-bench "


def _report(message: str) -> None:
    print(PROGRESS_PREFIX + message, flush=True)


def main(argv: list[str]) -> int:
    job_path, result_path = Path(argv[0]), Path(argv[1])
    from phi3cli.backends import get_backend
    from phi3cli.errors import Phi3Error
    from phi3cli.store import ModelStore
    from phi3cli.util import first_line, write_atomically

    from .measure import MeasureJob, measure_configuration

    job = MeasureJob(**json.loads(job_path.read_text()))
    try:
        figures = measure_configuration(job, ModelStore(), _report)
        figures["versions"] = get_backend(job.backend).runtime_versions()
        out = {"ok": True, **figures}
    except Phi3Error as exc:
        out = {"ok": False, "error": exc.message + (f" ({exc.hint})" if exc.hint else "")}
    except Exception as exc:  # a runtime's own failure: keep its type and first line
        out = {"ok": False, "error": first_line(exc, typed=True), "traceback": traceback.format_exc()}
    write_atomically(result_path, json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
