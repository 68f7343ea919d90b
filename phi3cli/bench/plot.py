"""`--plot FILE.png`: decode tokens/s and time to first token per configuration, as bar charts (matplotlib)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from phi3cli.errors import Phi3Error
from phi3cli.util import write_atomically

from .report import measured_rows, run_label


def write_plot(report: dict, path: Path) -> None:
    """Two horizontal bar charts with standard-deviation whiskers, written atomically as PNG (or SVG, PDF)."""
    try:
        import matplotlib

        logging.getLogger("matplotlib").setLevel(logging.WARNING)  # not its font-cache chatter
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Phi3Error("--plot needs matplotlib.", hint="pip install 'phi3cli[plot]'") from None

    rows = [(r, run) for r, run in measured_rows(report) if r["status"] == "ok"]
    if not rows:
        raise Phi3Error("Nothing was measured, so there is nothing to plot.")
    labels = [f"{r['backend']} {r['format']} {r['device']} {run_label(run)}" for r, run in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.45 * len(rows)), sharey=True)
    for ax, key, title, color in (
        (axes[0], "decode_tps", "Decode tokens/s (higher is better)", "#2a7ab9"),
        (axes[1], "ttft_ms", "Time to first token, ms (lower is better)", "#d9822b"),
    ):
        means = [run[key]["mean"] for _, run in rows]
        stds = [run[key]["std"] for _, run in rows]
        ax.barh(labels, means, xerr=stds, color=color, capsize=3)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        for y, (value, std) in enumerate(zip(means, stds, strict=True)):
            ax.text(value + (std or 0), y, f"  {value:.1f}", va="center", fontsize=8)  # beyond the whisker
        ax.set_xlim(right=max(m + (d or 0) for m, d in zip(means, stds, strict=True)) * 1.15)
    s = report["settings"]
    fig.suptitle(
        f"phi3 bench · {report['model']['spec']} · {report['machine']['cpu']} · "
        f"{s['repetitions']} runs, {s['gen_tokens']} tokens out",
        fontsize=10,
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    suffix = Path(path).suffix.lower().lstrip(".") or "png"
    fig.savefig(buffer, format=suffix, dpi=120)
    plt.close(fig)
    write_atomically(Path(path), buffer.getvalue())
