"""Write docs/cli.md from the real `--help` of every phi3 command; `--check` fails if it is out of date.

Usage: python scripts/gen_cli_docs.py [--check]
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cli.md"
COMMANDS = [
    [],
    ["chat"],
    ["convert"],
    ["quantize"],
    ["bench"],
    ["serve"],
    ["devices"],
    ["models"],
    ["models", "list"],
    ["models", "rm"],
    ["models", "path"],
    ["models", "prune"],
    ["models", "catalog"],
    ["models", "pull"],
]


def help_text(args: list[str]) -> str:
    env = {**os.environ, "COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"}
    done = subprocess.run(
        [sys.executable, "-m", "phi3cli", *args, "--help"], capture_output=True, text=True, env=env, check=True
    )
    return "\n".join(line.rstrip() for line in done.stdout.strip("\n").splitlines())


def render() -> str:
    parts = ["# phi3 command reference\n", "Generated from each command's `--help` by `scripts/gen_cli_docs.py`.\n"]
    for args in COMMANDS:
        parts.append(f"## `{' '.join(['phi3', *args])}`\n")
        parts.append("```\n" + help_text(args) + "\n```\n")
    return "\n".join(parts)


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC.relative_to(ROOT)} is out of date: run python scripts/gen_cli_docs.py")
            return 1
        return 0
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
