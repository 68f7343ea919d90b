"""`phi3 models`: what the model store holds, how big it is, and removing what is no longer needed."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

from phi3cli.cli.errors import user_errors
from phi3cli.cli.models_catalog import catalog, pull
from phi3cli.errors import Phi3Error, StoreEntryNotFoundError
from phi3cli.util import human_size

if TYPE_CHECKING:  # the store is read where a command needs it, so `phi3 --help` stays fast
    from phi3cli.hub_history import HubUse
    from phi3cli.inventory import StoreEntry, StoreInventory
    from phi3cli.store import ModelStore

models_app = typer.Typer(
    name="models",
    help="List, locate, remove and prune the models phi3 built (converted variants, the demo model, caches), "
    "list the hub models it ran from the Hugging Face hub cache, and list and pull the catalogue's short names.",
    no_args_is_help=True,
)

YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")]

KIND_LABEL = {"source": "source", "cache": "runtime cache", "broken": "broken", "partial": "half-built"}


def _when(t: float | None) -> str:
    """A date as `ls -l` shows it: the time within the last six months, else the year."""
    if not t:
        return "-"
    recent = abs(time.time() - t) < 182 * 86400
    return time.strftime("%b %d %H:%M" if recent else "%b %d  %Y", time.localtime(t))


def _what(entry: StoreEntry) -> str:
    if entry.variant is not None:
        k = entry.variant.key
        return f"{k.backend} {k.format} {k.target}"
    if entry.kind == "source":
        return (
            "demo model"
            if entry.source == "demo"
            else ".gguf source"
            if entry.source.startswith("gguf--")
            else "source"
        )
    return KIND_LABEL.get(entry.kind, entry.kind)


def _versions(entry: StoreEntry) -> str:
    if entry.variant is None:
        return ""
    changed = entry.variant.outdated()
    parts = []
    for name, built in entry.variant.versions.items():
        if name in changed:
            parts.append(f"[yellow]{name} {built} (installed: {changed[name][1] or 'none'})[/]")
        else:
            parts.append(f"{name} {built}")
    return ", ".join(parts)


def _status(entry: StoreEntry) -> str:
    if entry.status == "ok":
        return "[yellow]outdated[/]" if entry.variant is not None and entry.variant.outdated() else "[green]ok[/]"
    return f"[red]{escape(entry.status)}[/]" if entry.kind == "broken" else f"[yellow]{escape(entry.status)}[/]"


def _entry_json(entry: StoreEntry, size: int) -> dict:
    data = {
        "id": entry.id,
        "kind": entry.kind,
        "source": entry.source,
        "path": str(entry.path),
        "size_bytes": size,
        "status": entry.status,
        "created": entry.created,
        "last_used": entry.last_used,
    }
    if entry.variant is not None:
        key = entry.variant.key
        data.update(
            source_spec=entry.variant.source_spec,
            backend=key.backend,
            format=key.format,
            target=key.target,
            converter=key.converter,
            versions=entry.variant.versions,
            outdated={name: {"built": b, "installed": n} for name, (b, n) in entry.variant.outdated().items()},
        )
    return data


def _table(rows: list[tuple[StoreEntry, int]], title: str | None = None, reasons: dict[str, str] | None = None):
    """One row per entry, and below it the runtime versions each variant was built with, as numbered notes
    (variants of one backend share a set, so a narrow terminal still shows every column)."""
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True
    )
    table.add_column("id", no_wrap=True)
    table.add_column("source", min_width=10, overflow="fold")
    table.add_column("what [built with]", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("created\nlast used", no_wrap=True)
    table.add_column("why" if reasons is not None else "status", min_width=6)
    notes: list[str] = []
    for entry, size in rows:
        versions = _versions(entry)
        if versions and versions not in notes:
            notes.append(versions)
        table.add_row(
            entry.id,
            escape(
                entry.variant.source_spec if entry.variant is not None and entry.variant.source_spec else entry.source
            ),
            _what(entry) + (f" [dim]\\[{notes.index(versions) + 1}][/]" if versions else ""),
            human_size(size),
            f"{_when(entry.created)}\n{_when(entry.last_used)}" if entry.last_used else _when(entry.created),
            escape(reasons[entry.id]) if reasons is not None else _status(entry),
        )
    return Group(table, *(f"[dim]\\[{n}][/] {text}" for n, text in enumerate(notes, 1)))


def _hub_json(use: HubUse, size: int) -> dict:
    return {
        "id": use.id,
        "repo": use.repo,
        "variant": use.variant,
        "runs_with": use.runtime or None,
        "revision": use.revision,
        "path": use.path,
        "size_bytes": size,
        "status": use.status,
        "last_used": use.last_used,
    }


def _hub_table(rows: list[tuple[HubUse, int]], title: str):
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True
    )
    table.add_column("id", no_wrap=True)
    table.add_column("repo\n  folder", min_width=20, overflow="fold")
    table.add_column("runs as", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("last used", no_wrap=True)
    table.add_column("status", min_width=6)
    for use, size in rows:
        status = "[green]ok[/]" if use.status == "ok" else f"[yellow]{escape(use.status)}[/]"
        what = f"{use.runtime} folder" if use.runtime else "checkpoint"
        name = escape(use.repo) + (f"\n  {escape(use.variant)}" if use.variant else "")
        table.add_row(use.id, name, what, human_size(size), _when(use.last_used), status)
    return table


def _inventory() -> StoreInventory:
    from phi3cli.inventory import StoreInventory
    from phi3cli.store import ModelStore

    return StoreInventory(ModelStore())


@models_app.command("list")
@user_errors
def list_models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (sizes in bytes) instead of a table.")] = False,
) -> None:
    """List each stored variant and materialised source with its size on disk, dates and runtime versions.

    Sizes are the blocks allocated on disk, as `du` counts them; the total is that of the whole store folder.
    Broken entries (no valid variant.json) and half-built ones are listed too: remove them with `rm` or `prune`.
    Hub models phi3 ran (a repo's checkpoint, or a ready-to-run folder of it) are listed below, with their size in
    the Hugging Face hub cache, which phi3 does not own: `rm --hub-cache` deletes from it.
    """
    inventory = _inventory()
    rows = [(entry, entry.size) for entry in inventory.entries()]
    total = inventory.total_size()
    from phi3cli.hub_history import hub_uses

    hub = [(use, use.size()) for use in hub_uses(inventory.store)]
    if as_json:
        data = {
            "root": str(inventory.store.root),
            "total_bytes": total,
            "entries": [_entry_json(e, n) for e, n in rows],
            "hub": [_hub_json(u, n) for u, n in hub],
        }
        try:
            print(json.dumps(data, indent=2), flush=True)
        except BrokenPipeError:  # `phi3 models list --json | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(1) from None
        return
    console = Console(highlight=False, soft_wrap=True)
    if not rows:
        console.print(f"The model store at {inventory.store.root} is empty.")
    else:
        console.print(_table(rows, title=f"Model store: {inventory.store.root}"))
        variants = [n for e, n in rows if e.kind == "variant"]
        listed = sum(n for _, n in rows)
        console.print(
            f"{len(variants)} variant{'' if len(variants) == 1 else 's'}: {human_size(sum(variants))} · "
            f"everything listed: {human_size(listed)} · folders, locks and manifests: {human_size(total - listed)}\n"
            f"[bold]Store total: {human_size(total)}[/] ({total} bytes, as `du -s --block-size=1` counts)"
        )
    if hub:
        roots = sorted({str(u.cache_root) for u, _ in hub})
        console.print()
        console.print(_hub_table(hub, title=f"Hub models phi3 ran, in the Hugging Face hub cache: {', '.join(roots)}"))
        console.print(
            f"{len(hub)} hub model{'' if len(hub) == 1 else 's'}: {human_size(sum(n for _, n in hub))}, not in the "
            "store total; the hub cache is shared with other tools: `phi3 models rm ID --hub-cache` deletes one."
        )


@models_app.command("path")
@user_errors
def path(
    target: Annotated[
        str | None, typer.Argument(help="An entry's id, path or source (default: the store itself).")
    ] = None,
) -> None:
    """Print where the store is (set PHI3_HOME to move it), or where one entry lies."""
    inventory = _inventory()
    if target is None:
        print(inventory.store.root)
        return
    found = inventory.find_entries(target)
    if len(found) > 1:
        raise Phi3Error(
            f"{target!r} matches {len(found)} entries: {', '.join(e.id for e in found)}.", hint="Give one id."
        )
    print(found[0].path)


def _count(rows: list) -> str:
    return f"{len(rows)} entr{'y' if len(rows) == 1 else 'ies'}"


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise Phi3Error(
            "Nothing removed: there is no terminal to confirm on.", hint="Pass --yes to remove without asking."
        )
    if not typer.confirm(question, default=False):
        Console(stderr=True, highlight=False).print("Nothing removed.")
        raise typer.Exit(1)


def _remove(inventory: StoreInventory, entries: list[StoreEntry], console: Console, freed: int = 0) -> None:
    for entry in entries:
        freed += inventory.remove(entry)
        console.print(f"[green]Removed[/] {entry.id} {entry.path}")
    console.print(f"Freed {human_size(freed)}.")


@models_app.command("rm")
@user_errors
def rm(
    targets: Annotated[
        list[str],
        typer.Argument(
            help="What to remove: an id from `phi3 models list` (or its first 4+ characters), a path in the store, "
            "or a source (as given to convert, e.g. demo) for all of its variants."
        ),
    ],
    yes: YesOpt = False,
    hub_cache: Annotated[
        bool,
        typer.Option(
            "--hub-cache",
            help="Also delete the hub models named (listed under the hub cache) from the Hugging Face hub cache, "
            "which other tools share. Without it, phi3 never deletes from that cache.",
        ),
    ] = False,
) -> None:
    """Remove variants (or a source's materialised model, a cache, a broken entry). Asks unless --yes.

    A hub model phi3 ran (`OWNER/NAME`, `OWNER/NAME:SUBFOLDER` or its id) is deleted from the hub cache only
    with --hub-cache.
    """
    from phi3cli.hub_history import find_hub_uses

    inventory = _inventory()
    chosen: dict[str, StoreEntry] = {}
    hub: dict[str, HubUse] = {}
    for target in targets:
        in_hub = find_hub_uses(inventory.store, target)
        try:
            found = inventory.find_entries(target)
        except StoreEntryNotFoundError:
            if not in_hub:
                raise
            found = []
        if in_hub and not hub_cache and not found:
            raise Phi3Error(
                f"{target} is in the Hugging Face hub cache ({in_hub[0].cache_root}), which other tools share; "
                "phi3 deletes from it only when asked.",
                hint=f"phi3 models rm {target} --hub-cache",
            )
        for entry in found:
            chosen[entry.id] = entry
        for use in in_hub:
            hub[use.id] = use
    busy = [e for e in chosen.values() if not e.removable]
    if busy:
        raise Phi3Error(
            f"{busy[0].path} is being built right now ({busy[0].status}); it cannot be removed until that build ends."
        )
    rows = [(e, e.size) for e in chosen.values()]
    hub_rows = [(u, u.size()) for u in hub.values()] if hub_cache else []
    console = Console(highlight=False, soft_wrap=True)
    if rows:
        console.print(_table(rows, title="To remove"))
    if hub_rows:
        console.print(_hub_table(hub_rows, title="To delete from the Hugging Face hub cache"))
    for use in hub.values():
        if not hub_cache:
            console.print(f"[dim]Kept {use.name} in the hub cache ({use.id}); add --hub-cache to delete it too.[/]")
    kept_sources = {e.source for e in chosen.values() if e.kind == "variant"} - {
        e.source for e in chosen.values() if e.kind == "source"
    }
    for entry in inventory.entries():
        if entry.kind == "source" and entry.source in kept_sources:
            console.print(f"[dim]Kept the source model {entry.source} ({entry.id}); name its id to remove it too.[/]")
    count = _count(rows + hub_rows)
    _confirm(f"Remove {count} ({human_size(sum(n for _, n in rows + hub_rows))})?", yes)
    _remove(inventory, list(chosen.values()), console, freed=_delete_hub(inventory.store, hub_rows, console))


def _delete_hub(store: ModelStore, rows: list[tuple[HubUse, int]], console: Console) -> int:
    from phi3cli.hub_history import delete_from_cache

    freed = 0
    for use, _ in rows:
        freed += delete_from_cache(store, use)
        console.print(f"[green]Deleted from the hub cache[/] {use.id} {escape(use.name)}")
    return freed


@models_app.command("prune")
@user_errors
def prune(
    older_than: Annotated[
        float | None,
        typer.Option("--older-than", "--unused-days", min=0, help="Also remove variants not used for this many days."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be removed.")] = False,
    yes: YesOpt = False,
) -> None:
    """Remove variants built by runtime versions no longer installed, half-built leftovers and broken entries.

    With --older-than N, also variants not used for N days. Shows what it removes and asks unless --yes.
    """
    inventory = _inventory()
    picked = inventory.prune_candidates(unused_days=older_than)
    console = Console(highlight=False, soft_wrap=True)
    if not picked:
        console.print("Nothing to prune.")
        return
    rows = [(p.entry, p.entry.size) for p in picked]
    console.print(
        _table(rows, title="Would remove" if dry_run else "To remove", reasons={p.entry.id: p.reason for p in picked})
    )
    if dry_run:
        console.print(f"{_count(rows)}, {human_size(sum(n for _, n in rows))}; nothing removed (--dry-run).")
        return
    _confirm(f"Remove {_count(rows)} ({human_size(sum(n for _, n in rows))})?", yes)
    _remove(inventory, [p.entry for p in picked], console)


# The catalogue of short names: its own module (phi3cli.cli.models_catalog), registered here.
models_app.command("catalog")(catalog)
models_app.command("pull")(pull)
