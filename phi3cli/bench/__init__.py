"""`phi3 bench` as a library: plan configurations, measure each in its own process, report and compare.

    from phi3cli.bench import BenchSettings, plan_configurations, run_bench
    report = run_bench("demo", plan_configurations(probe(), everything=True), BenchSettings(repetitions=3))

Every figure comes from phi3cli.generation's stream_reply, the path `phi3 chat` uses.
"""

from __future__ import annotations

from .compare import Finding, compare, parse_margin
from .config import (
    BenchSettings,
    Configuration,
    PlannedConfiguration,
    baseline_configurations,
    plan_configurations,
    settings_with_baseline,
)
from .formats import to_csv, to_json, to_markdown
from .report import SCHEMA, load_report
from .runner import run_bench

__all__ = [
    "SCHEMA",
    "BenchSettings",
    "Configuration",
    "Finding",
    "PlannedConfiguration",
    "baseline_configurations",
    "compare",
    "load_report",
    "parse_margin",
    "plan_configurations",
    "run_bench",
    "settings_with_baseline",
    "to_csv",
    "to_json",
    "to_markdown",
]
