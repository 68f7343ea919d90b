"""A checkpoint's own modelling code: which Python files its config.json names, checked before anything runs them.

phi3 runs such code only where a conversion needs it and the user asked (`phi3 convert --trust-remote-code` of
Phi-3.5-vision); this module only reads names and checks files, it imports nothing of the checkpoint's.
"""

from __future__ import annotations

from pathlib import Path

from phi3cli.errors import UnsupportedModelError


def remote_code_files(config: dict, folder: Path, spec: str) -> list[str]:
    """The Python files a checkpoint's config.json names in its auto_map, all present in its folder, or one line
    saying which are missing."""
    modules = {ref.split("--")[-1].rsplit(".", 1)[0] for ref in (config.get("auto_map") or {}).values() if ref}
    files = sorted(f"{module}.py" for module in modules)
    missing = [name for name in files if not (folder / name).is_file()]
    if not files or missing:
        what = f"its config.json names {', '.join(missing)}" if files else "its config.json names none (no auto_map)"
        raise UnsupportedModelError(
            f"{spec} has no modelling code to run: {what}, not in {folder}.",
            hint="Give the checkpoint's full folder, with the .py files it ships.",
        )
    return files


def remote_code_types() -> tuple[str, ...]:
    """The vision model types some backend converts only by running the checkpoint's own code (Phi-3.5-vision)."""
    from phi3cli.backends import registry

    return tuple(t for s in registry().values() for t in s.remote_code_types)
