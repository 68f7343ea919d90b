"""`phi3 devices`: what this machine has, per runtime."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from phi3cli.cli.errors import user_errors


@user_errors
def devices() -> None:
    """Show the CPU, the devices each installed runtime sees, which extras are missing, each backend's options, and
    every NPU check."""
    from phi3cli.backends import registry
    from phi3cli.devices import npu_checks, probe

    report = probe()
    console = Console(highlight=False)
    console.print(f"[bold]CPU:[/] {report.cpu}")
    table = Table("backend", "devices", "formats", "what it saw", "install", title="Runtimes")
    for name, spec in registry().items():
        formats = ", ".join(spec.formats)
        if name in report.missing:
            table.add_row(
                name,
                "[dim]-[/]",
                formats,
                f"[yellow]{escape(report.missing[name])}[/]",
                escape(f"phi3cli[{spec.extra}]"),
            )
        else:
            devs = ", ".join(report.present.get(name, [])) or "[red]none[/]"
            table.add_row(name, devs, formats, escape(report.details.get(name, "")), "[green]installed[/]")
    console.print(table)
    show_options(console)
    console.print("[bold]NPU:[/] looked for with")
    for label, found, said in npu_checks(report):
        mark = "[dim]?[/]" if found is None else "[green]✓[/]" if found else "[red]✗[/]"
        console.print(f"  {mark} {escape(label)}: {escape(said)}", soft_wrap=True)


def show_options(console: Console) -> None:
    """The options each backend declares, as `--option KEY=VALUE` sets them."""
    from phi3cli.backends import registry

    table = Table(
        "backend", "option", "values", "default", "what it does", title="Backend options (--option KEY=VALUE)"
    )
    for spec in registry().values():
        for option in spec.options:
            default = "" if option.default is None else str(option.default)
            where = f" ({', '.join(option.devices)} only)" if option.devices else ""
            table.add_row(spec.name, option.name, escape(option.allowed), default, escape(option.help + where))
    if table.row_count:
        console.print(table)
