"""`phi3 models catalog` and `phi3 models pull`: the short model names, their ready-made variants, and fetching one."""

from __future__ import annotations

import json
from functools import cache
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from phi3cli.cli.errors import user_errors
from phi3cli.cli.options import BackendOpt, ConvertOpt, DeviceChoice, DeviceOpt, TrustRemoteCodeOpt
from phi3cli.cli.render import RichProgress

if TYPE_CHECKING:
    from phi3cli.catalog import CatalogModel


def _reader():
    """read_cache, once per repo."""
    from phi3cli.catalog import read_cache

    return cache(read_cache)


def _model_json(model: CatalogModel, read) -> dict:
    from phi3cli.catalog import source_cached, variant_cached
    from phi3cli.sources import conversion_flag

    return {
        "name": model.name,
        "title": model.title,
        "what": model.what,
        "source": {
            "repo": model.source,
            "model_type": model.source_type,
            "convert": conversion_flag(model.source_type),  # what `phi3 convert` needs; null: it is not converted
            "size_gb": model.source_size_gb,
            "on_disk": source_cached(model, read),
            "cited": list(model.source_cited),
        },
        "variants": [
            {
                "repo": v.repo,
                "folder": v.folder,
                "runs_with": v.runtime,
                "precision": v.precision,
                "devices": list(v.devices),
                "provider": v.provider,
                "needs": v.needs,
                "size_gb": v.size_gb,
                "size_of": v.size_of,
                "on_disk": variant_cached(v, read),
                "cited": list(v.cited),
            }
            for v in model.variants
        ],
    }


def _catalog_table(models: list[dict]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    table.add_column("name · variant (repo[:folder])", min_width=24, overflow="fold")
    table.add_column("runs as", no_wrap=True)
    table.add_column("built for", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("on disk", no_wrap=True)
    mark = {True: "[green]yes[/]", False: "[dim]-[/]"}
    for m in models:
        table.add_row(f"[bold]{m['name']}[/] [dim]{escape(m['what'])}[/]", "", "", "", "")
        src = m["source"]
        size = f"{src['size_gb']:g} GB" if src["size_gb"] is not None else "[dim]not stated[/]"
        how = "not converted" if src["convert"] is None else f"convert {src['convert']}".strip()
        table.add_row(f"  source {escape(src['repo'])}", "checkpoint", how, size, mark[src["on_disk"]])
        for v in m["variants"]:
            size = f"{v['size_gb']:g} GB" if v["size_gb"] is not None else "[dim]not stated[/]"
            name = escape(v["repo"] + (f":{v['folder']}" if v["folder"] else ""))
            built = ", ".join(v["devices"]) + (f" ({v['provider']})" if v["provider"] else "")
            table.add_row(f"  {name}", f"{v['runs_with']} {v['precision']}", built, size, mark[v["on_disk"]])
        table.add_section()
    return table


@user_errors
def catalog(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (with each entry's cited pages).")] = False,
) -> None:
    """List the short model names (`phi3 chat -m NAME`), what each is, and its ready-made variants.

    For each: the source checkpoint it converts from, and the variants its publishers put on the hub (repo and
    subfolder, runtime and precision, the device each is built for, its size where a public page states it),
    and which of them the Hugging Face hub cache already holds. `phi3 chat -m NAME` runs the one that fits the
    device; `phi3 models pull NAME` downloads it without running it.
    """
    from phi3cli.catalog import cache_folder, catalog

    read = _reader()
    models = [_model_json(m, read) for m in catalog().values()]
    hub = str(cache_folder("a/b").parent)
    if as_json:
        print(json.dumps({"hub_cache": hub, "models": models}, indent=2), flush=True)
        return
    console = Console(highlight=False, soft_wrap=True)
    console.print(_catalog_table(models))
    console.print(
        f"Sizes as the publishers' pages state them (decimal GB; the weights file or folder). On disk: in the hub "
        f"cache at {hub}. `phi3 chat -m NAME` runs the variant for this machine's device (--device, --backend "
        "narrow it; --convert builds from the source instead); `phi3 models pull NAME --device D` downloads one."
    )


@user_errors
def pull(
    name: Annotated[
        str,
        typer.Argument(help="A name from `phi3 models catalog` (or its source repo's id), or any hub id phi3 runs."),
    ],
    device: DeviceOpt = DeviceChoice.auto,
    backend: BackendOpt = None,
    convert: ConvertOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Download a model into the Hugging Face hub cache without running it: the variant `phi3 chat -m NAME` would run.

    With --device, the variant built for that device, even one this machine does not have (pull here, then copy
    the hub cache folder it prints to a machine without a connection). Only that variant's folder is downloaded,
    with the hub's progress bars; an interrupted download resumes.
    """
    from phi3cli.catalog import cache_folder
    from phi3cli.catalog_resolve import pull_spec
    from phi3cli.hub_history import find_hub_uses
    from phi3cli.sources import resolve_source
    from phi3cli.store import ModelStore
    from phi3cli.util import human_size

    store = ModelStore()
    with RichProgress() as progress:
        spec = pull_spec(name, device=device.value, backend=backend, convert=convert, progress=progress)
        asked = (device.value, backend) if spec is None else ("auto", None)  # a variant picked for elsewhere
        source = resolve_source(
            spec or name,
            store,
            device=asked[0],
            backend=asked[1],
            convert=convert,
            progress=progress,
            trust_remote_code=trust_remote_code,
        )
    uses = find_hub_uses(store, source.spec)
    size = f" ({human_size(uses[0].size())})" if uses else ""
    folder = cache_folder(source.spec.partition(":")[0])
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"[green]Pulled[/] {escape(name)} → {escape(source.spec)}{size}: {source.path}")
    console.print(
        f"[dim]To run it on a machine without a connection, copy {folder} to the same place in that machine's hub "
        "cache (HF_HUB_CACHE).[/]"
    )
