"""Building variants: into the model store (reused on the next run) or into a folder the user names.

Every build goes through a staging folder that is renamed into place only when complete.
"""

from __future__ import annotations

from pathlib import Path

from phi3cli.backends import get_backend
from phi3cli.backends.base import Backend, ConvertRecipe
from phi3cli.progress import Progress, SilentProgress
from phi3cli.sizing import GB, Estimate, check_disk, check_memory, model_config
from phi3cli.sources import ModelSource, refuse_vision_elsewhere
from phi3cli.store import MANIFEST, ModelStore, VariantKey
from phi3cli.util import atomic_output


def variant_key(backend: Backend, source: ModelSource, recipe: ConvertRecipe) -> VariantKey:
    return VariantKey(
        source=source.slug,
        backend=backend.name,
        format=recipe.format,
        target=recipe.target,
        converter=backend.converter_version(),
        recipe=recipe.canonical(),
    )


def ensure_variant(
    backend: Backend, source: ModelSource, recipe: ConvertRecipe, store: ModelStore, progress: Progress | None = None
) -> Path:
    """The stored variant for (source, backend, recipe, converter version), built on first use."""
    progress = progress or SilentProgress()
    key = variant_key(backend, source, recipe)
    if variant := store.find_variant(key):
        store.touch(variant)
        return variant.path
    with store.lock(f"variant-{key.source}-{key.dirname}"):
        if variant := store.find_variant(key):
            return variant.path
        hf_dir = source.hf_dir(store, progress)
        estimate = check_build(backend, hf_dir, recipe, source.spec, store.root)
        needs = f", about {estimate.peak_bytes / GB:.1f} GB of memory" if estimate else ""
        progress.note(
            f"Converting {source.spec} for {backend.name} ({recipe.format}, {recipe.target}{needs}); once, then reused."
        )
        with store.build_variant(key, source_spec=source.spec, versions=backend.runtime_versions(), force=True) as out:
            backend.build(hf_dir, recipe, out, progress, store.cache_dir(backend.name))
    return store.variant_dir(key)


def check_build(backend: Backend, hf_dir: Path, recipe: ConvertRecipe, what: str, where: Path) -> Estimate | None:
    """The pre-flight check: refuse, in one line, a build that would run out of memory, or of disk where it writes
    (where), before it starts."""
    estimate = backend.build_estimate(model_config(hf_dir), recipe)
    action = f"Converting {what} for {backend.name} ({recipe.format})"
    check_disk(estimate, where, action)
    check_memory(
        estimate,
        action,
        hint="Close other programs, or run a ready-made variant instead of converting (`phi3 models catalog` "
        "lists them; `phi3 chat -m NAME` downloads the one for your device).",
    )
    return estimate


def convert(
    source: ModelSource,
    backend_name: str,
    recipe: ConvertRecipe,
    output: Path | None,
    *,
    force: bool = False,
    store: ModelStore | None = None,
    progress: Progress | None = None,
) -> Path:
    """Convert a source to a backend's format: into output if given, else into the store."""
    store = store or ModelStore()
    progress = progress or SilentProgress()
    refuse_vision_elsewhere(source, backend_name, "--to")
    backend = get_backend(backend_name)
    if output is None:
        return ensure_variant(backend, source, recipe, store, progress)
    hf_dir = source.hf_dir(store, progress)
    check_build(backend, hf_dir, recipe, source.spec, Path(output).absolute().parent)
    with atomic_output(output, force=force) as staging:
        backend.build(hf_dir, recipe, staging, progress, store.cache_dir(backend.name))
    return Path(output).absolute()


def quantize(
    model_dir: Path,
    backend_name: str,
    recipe: ConvertRecipe,
    output: Path,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Compress the weights of a model already in a backend's format into a new folder."""
    backend = get_backend(backend_name)
    with atomic_output(output, force=force) as staging:
        backend.quantize(Path(model_dir), recipe, staging, progress or SilentProgress())
        (staging / MANIFEST).unlink(missing_ok=True)  # a store variant's manifest does not describe the copy
    return Path(output).absolute()
