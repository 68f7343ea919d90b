"""Adapters in the model store: the normalised file a runtime loads, and a base merged with adapters for convert.

A merged model is a source of its own (sources/<base>--lora-<hash>), so every variant converted from it has a store
key distinct from the base's; the hash covers each adapter's content and alpha.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from phi3cli.adapters import AdapterChoice, LoraAdapter, read_adapter
from phi3cli.backends.adapters import PREFIX, AdapterError
from phi3cli.progress import Progress, SilentProgress
from phi3cli.sources import ModelSource
from phi3cli.store import ModelStore
from phi3cli.util import atomic_output, short_hash, write_atomically


def base_config(folder: Path) -> dict:
    """The base model's config.json (a Hugging Face folder, or a runtime folder that keeps one beside it)."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(
            f"{folder} has no readable config.json to check an adapter against.",
            hint="Use a model phi3 converted (it keeps config.json), or merge: phi3 convert MODEL --adapter DIR.",
        ) from exc


def read_choices(choices: list[AdapterChoice], base: dict) -> list[tuple[LoraAdapter, float]]:
    """Each adapter asked, read and checked against the base, with its alpha; names must differ."""
    names = [c.name for c in choices]
    if dup := next((n for n in names if names.count(n) > 1), None):
        raise AdapterError(f"Two adapters are named {dup!r}.", hint="Name them: --adapter NAME=DIR.")
    return [(read_adapter(c.path, base, c.name), c.alpha) for c in choices]


def normalised_file(adapter: LoraAdapter, store: ModelStore) -> Path:
    """The adapter as one safetensors file of fused Phi-3 LoRAs (scale folded into B), written once per content."""
    from safetensors.numpy import save_file

    path = store.cache_dir("adapters") / f"{adapter.digest}.safetensors"
    if path.is_file():
        return path
    tensors = {}
    for module, (a, b) in adapter.pairs.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b
    staging = path.with_name(f".{path.name}.partial")
    try:
        save_file(tensors, str(staging), metadata={"source": str(adapter.path), "format": "pt"})
        staging.replace(path)
    finally:
        staging.unlink(missing_ok=True)
    return path


def merge(hf_dir: Path, adapters: list[tuple[LoraAdapter, float]], out: Path, progress: Progress) -> None:
    """Write hf_dir into out with W += alpha·B·A for every adapter, shard by shard, in each weight's own dtype."""
    import torch
    from safetensors.torch import load_file, save_file

    shards = sorted(hf_dir.glob("*.safetensors"))
    if not shards:
        raise AdapterError(f"{hf_dir} has no safetensors weights to merge an adapter into.")
    wanted = {f"{m}.weight" for a, _ in adapters for m in a.pairs}
    done: set[str] = set()
    for shard in shards:
        progress.phase(f"Merging {', '.join(a.name for a, _ in adapters)} into {shard.name}")
        tensors = load_file(str(shard))
        for key in wanted & tensors.keys():
            weight = tensors[key].to(torch.float32)
            for adapter, alpha in adapters:
                if (module := key.removesuffix(".weight")) in adapter.pairs:
                    weight += alpha * torch.from_numpy(adapter.delta(module))
            tensors[key] = weight.to(tensors[key].dtype).contiguous()
            done.add(key)
        save_file(tensors, str(out / shard.name), metadata={"format": "pt"})
    if missing := sorted(wanted - done):
        raise AdapterError(f"{hf_dir} has no weight {missing[0]} for the adapter to change.")
    for item in hf_dir.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and not (out / item.name).exists():
            write_atomically(out / item.name, item.read_bytes())


def merged_source(
    source: ModelSource, choices: list[AdapterChoice], store: ModelStore, progress: Progress | None = None
) -> ModelSource:
    """The source with the adapters merged into its weights, built once into the store as a source of its own."""
    progress = progress or SilentProgress()
    hf_dir = source.hf_dir(store, progress)
    adapters = read_choices(choices, base_config(hf_dir))
    tag = short_hash(*(f"{a.digest}:{alpha!r}" for a, alpha in adapters))
    slug = f"{source.slug}--lora-{tag}"
    final = store.source_dir(slug)
    if not (final / "config.json").is_file():
        with store.lock(f"source-{slug}"):
            if not (final / "config.json").is_file():
                with atomic_output(final, force=True) as out:
                    merge(hf_dir, adapters, out, progress)
    label = "+".join(f"{a.name}" + (f":{alpha:g}" if alpha != 1 else "") for a, alpha in adapters)
    return replace(source, spec=f"{source.spec}+{label}", kind="folder", path=final, slug=slug, route=None)


def check_runtime(backend, request, store: ModelStore, progress: Progress | None = None):
    """The request, or where the backend cannot apply adapters at run time a one-line refusal; a backend that runs
    Hugging Face folders itself (the torch reference) gets the request for the merged source instead."""
    from phi3cli.backends.adapters import ADAPTERS, MERGE_HINT, adapter_refusal

    if not (why := adapter_refusal(backend, request)):
        return request
    if backend.spec.marker is None and not request.source.runtime:
        merged = merged_source(request.source, list(request.options[ADAPTERS]), store, progress)
        options = {k: v for k, v in request.options.items() if k != ADAPTERS}
        return replace(request, source=merged, options=options)
    raise AdapterError(f"Run-time adapters: {why}.", hint=MERGE_HINT)


def runtime_request(backend, folder: Path, request, store: ModelStore):
    """The request with its adapters (AdapterChoices) read, checked against the base in folder, and normalised."""
    from phi3cli.backends.adapters import ADAPTERS, RuntimeAdapter

    choices = request.options.get(ADAPTERS)
    if not choices:
        return request
    adapters = read_choices(list(choices), base_config(folder))
    loaded = tuple(RuntimeAdapter(a.name, normalised_file(a, store), alpha, tuple(a.pairs)) for a, alpha in adapters)
    return replace(request, options={**request.options, ADAPTERS: loaded})
