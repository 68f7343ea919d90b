"""Model sources: a Hugging Face id (phi3cli.hub), a local folder, a .gguf file, a runtime folder, or `demo`.

Resolving a source never imports torch or transformers: it reads config files only. Materialising a
.gguf or building the demo model does, inside the functions that need it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from phi3cli import DEFAULT_MODEL
from phi3cli.backends import registry, runtime_of_folder
from phi3cli.errors import ModelNotFoundError, Phi3Error, UnsupportedModelError
from phi3cli.progress import Progress, SilentProgress
from phi3cli.remote_code import remote_code_files, remote_code_types
from phi3cli.store import ModelStore
from phi3cli.util import short_hash, slugify

if TYPE_CHECKING:
    from phi3cli.routing import Route

SUPPORTED_MODEL_TYPES = ("phi3",)
SUPPORTED_HELP = (
    "phi3 runs the Phi-3 architecture (config model_type 'phi3', Phi3ForCausalLM): Phi-3-mini/medium, "
    "Phi-3.5-mini and Phi-4-mini, or `demo`"
)
# Phi relatives that are not Phi3ForCausalLM, by config model_type: (what they are, why phi3 does not run them).
OTHER_PHI_MODELS = {
    "phi3small": (
        "Phi-3-small (Phi3SmallForCausalLM)",
        "it needs the modelling code it ships (block-sparse attention, a tiktoken tokenizer), not transformers' "
        "built-in Phi3ForCausalLM",
    ),
    "phi3_v": (
        "Phi-3-vision / Phi-3.5-vision (Phi3VForCausalLM)",
        "converting it runs the modelling code it ships, which phi3 does only when `phi3 convert` is given "
        "--trust-remote-code; OpenVINO's ready-made IRs of it run by id or path (see docs/vision.md)",
    ),
    "phi4mm": (
        "Phi-4-multimodal (Phi4MMForCausalLM)",
        "this form needs the modelling code it ships, which phi3 does not run; phi3 converts Phi-4-multimodal "
        "in transformers' own form (model_type 'phi4_multimodal', Phi4MultimodalForCausalLM)",
    ),
    "phimoe": (
        "Phi-3.5-MoE (PhiMoEForCausalLM)",
        "it is a mixture of experts, not Phi3ForCausalLM, and ONNX Runtime GenAI's builder makes it for CUDA only",
    ),
}
# Kinds of source that are Hugging Face models (any other kind is the name of the backend whose folder it is).
HF_KINDS = ("demo", "hub", "folder", "gguf")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: what the user named, what kind it is, and where it lies on disk."""

    spec: str
    kind: str  # demo | hub | folder | gguf, or the backend whose own format the folder is in
    path: Path
    slug: str
    route: Route | None = field(default=None, compare=False)  # the route a hub repo's folder was chosen by

    @property
    def runtime(self) -> str | None:
        """The backend a prebuilt runtime folder belongs to, or None for a Hugging Face model."""
        return None if self.kind in HF_KINDS else self.kind

    def hf_dir(self, store: ModelStore, progress: Progress | None = None) -> Path:
        """A Hugging Face folder (config, tokenizer, safetensors) for this source, built once if needed."""
        if self.kind in ("hub", "folder", "demo"):
            return self.path
        if self.kind == "gguf":
            from phi3cli.gguf_import import materialise_gguf

            return materialise_gguf(self.path, store.source_dir(self.slug), store, progress)
        raise UnsupportedModelError(
            f"{self.spec} is already a {self.kind} model; it cannot be converted again.",
            hint="Give the original Hugging Face model or .gguf file as the source.",
        )


def check_architecture(config_path: Path, spec: str, trust_remote_code: bool = False) -> dict:
    """Read a config.json and refuse any architecture that is not Phi-3 (or a vision model a backend converts;
    one whose conversion runs the checkpoint's own code only with trust_remote_code)."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"{config_path} cannot be read as a model config: {exc}") from exc
    model_type = config.get("model_type")
    if trust_remote_code and model_type in remote_code_types():
        remote_code_files(config, config_path.parent, spec)
        return config
    refuse_other_phi(model_type, spec)
    if model_type not in SUPPORTED_MODEL_TYPES + vision_model_types():
        archs = ", ".join(config.get("architectures") or []) or "unknown"
        raise UnsupportedModelError(
            f"{spec} is a '{model_type}' model ({archs}), not Phi-3.", hint=SUPPORTED_HELP + "."
        )
    return config


def vision_model_types() -> tuple[str, ...]:
    """The vision-language model types some backend converts (Phi-4-multimodal's 'phi4_multimodal')."""
    return tuple(t for s in registry().values() for t in s.vision_types)


def refuse_vision_elsewhere(source: ModelSource, backend: str, flag: str = "--backend") -> None:
    """Refuse to convert a vision-language checkpoint with a backend that does not convert it (flag: the option
    that names the backend, in the hint)."""
    if source.kind not in ("hub", "folder"):
        return
    try:
        model_type = json.loads((source.path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return
    if model_type in vision_model_types() and model_type not in registry()[backend].vision_types:
        able = [s.name for s in registry().values() if model_type in s.vision_types]
        raise UnsupportedModelError(
            f"{source.spec} is a vision-language model ({model_type}); the {backend} backend does not convert it.",
            hint=f"Use {flag} {' or '.join(able)}.",
        )


def refuse_other_phi(model_type: str | None, spec: str) -> None:
    """Refuse a Phi model that is not Phi3ForCausalLM by name, saying why."""
    if model_type in OTHER_PHI_MODELS:
        name, why = OTHER_PHI_MODELS[model_type]
        raise UnsupportedModelError(f"{spec} is {name}: {why}.", hint=SUPPORTED_HELP + ".")


def refuse_unconvertible(model_type: str | None, spec: str, trust_remote_code: bool = False) -> None:
    """Refuse, before anything is downloaded, a checkpoint of a Phi type phi3 does not convert (as asked)."""
    if not (trust_remote_code and model_type in remote_code_types()):
        refuse_other_phi(model_type, spec)


def conversion_flag(model_type: str | None) -> str | None:
    """What `phi3 convert` needs for a checkpoint of this type: "" nothing, "--trust-remote-code", None: refused."""
    if model_type in OTHER_PHI_MODELS:
        return "--trust-remote-code" if model_type in remote_code_types() else None
    return ""


def folder_kind(path: Path) -> str | None:
    """The backend whose format a folder is in, 'folder' for a Hugging Face folder, None for anything else."""
    if kind := runtime_of_folder(path):
        return kind
    if (path / "config.json").is_file():
        return "folder"
    return None


def gguf_architecture(path: Path) -> str:
    """The general.architecture field of a .gguf file, read from its header."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise Phi3Error("Reading a .gguf file needs the gguf package.", hint="pip install 'phi3cli[torch]'") from exc
    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as exc:  # a truncated or foreign file
        raise UnsupportedModelError(f"{path} is not a readable .gguf file: {exc}") from exc


def resolve_source(
    spec: str | None,
    store: ModelStore | None = None,
    *,
    progress: Progress | None = None,
    revision: str | None = None,
    device: str = "auto",
    backend: str | None = None,
    convert: bool = False,
    format: str | None = None,
    trust_remote_code: bool = False,
) -> ModelSource:
    """Turn what the user typed into a ModelSource, downloading or building it if needed.

    device and backend are those asked: of a hub repo with several ready-to-run folders, they pick one. A name in
    phi3's catalogue (or its source repo's id) stands for the ready-made variant that fits them and format
    (phi3cli.catalog); convert asks for its source checkpoint instead. trust_remote_code: a checkpoint whose
    conversion runs its own code (Phi-3.5-vision) is accepted (`phi3 convert --trust-remote-code`).
    """
    spec = spec or DEFAULT_MODEL
    store = store or ModelStore()
    progress = progress or SilentProgress()

    if spec == "demo":
        from phi3cli.demo import ensure_demo

        return ModelSource(spec, "demo", ensure_demo(store, progress), "demo")

    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UnsupportedModelError(
                f"{spec} is a file but not a .gguf model.",
                hint="Give a .gguf file, a model folder, a Hugging Face id, or `demo`.",
            )
        arch = gguf_architecture(path)
        if arch != "phi3":
            raise UnsupportedModelError(f"{spec} is a '{arch}' .gguf, not Phi-3.", hint=SUPPORTED_HELP + ".")
        resolved = path.resolve()
        return ModelSource(spec, "gguf", resolved, f"gguf--{slugify(path.stem)}-{short_hash(str(resolved))}")
    if path.is_dir():
        kind = folder_kind(path)
        if kind is None:
            raise UnsupportedModelError(
                f"{spec} is a folder but holds no model (no config.json, nor a folder a backend runs: "
                f"{', '.join(s.marker for s in registry().values() if s.marker)}).",
                hint="Point --model at a Hugging Face model folder or one made by `phi3 convert`.",
            )
        if kind == "folder":
            check_architecture(path / "config.json", spec, trust_remote_code)
        resolved = path.resolve()
        return ModelSource(spec, kind, resolved, f"local--{slugify(path.name)}-{short_hash(str(resolved))}")
    from phi3cli.catalog_resolve import catalog_spec
    from phi3cli.hub import parse_hub_id, resolve_hub

    asked = dict(device=device, backend=backend, format=format, convert=convert, revision=revision)
    found = catalog_spec(
        spec,
        **asked,
        progress=progress,
        check_source=lambda m: refuse_unconvertible(m.source_type, m.source, trust_remote_code),
    )
    spec = found or spec  # a catalogue name: the hub repo (and folder) it stands for here
    if (hub_id := parse_hub_id(spec)) is None:
        raise ModelNotFoundError(
            f"No model named {spec!r}: it is not a file, a folder, or a Hugging Face id (owner/name[:subfolder]).",
            hint="Try `--model demo` for the built-in demo model.",
        )
    hub = resolve_hub(*hub_id, store=store, revision=revision, device=device, backend=backend, progress=progress)
    slug = f"hub--{slugify(hub.repo)}" + (f"--{slugify(hub.variant)}" if hub.variant else "")
    slug += f"@{slugify(revision)}" if revision else ""
    if hub.runtime:  # a folder a backend runs as it is
        return ModelSource(spec, hub.runtime, hub.folder, slug, hub.route)
    check_architecture(hub.folder / "config.json", spec, trust_remote_code)
    return ModelSource(spec, "hub", hub.folder, slug)
