"""Comparing a run with a baseline report: what CI smoke jobs fail on.

A configuration regresses when its decode tokens/s falls, or its time to first token rises, by more
than the margin, when its KL divergence from the reference grows by more than the margin, when its
top-1 or free-running agreement with the reference drops, or when it ran in the baseline and fails
now. In a multi-turn test (--turns), the last turn's time to first token and its growth over the
first turn's regress when they rise by more than the margin. Baselines of another model or another
report schema are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from phi3cli.errors import Phi3Error

from .report import SCHEMA, measured_rows, run_label
from .turns import multi_turn_label, multi_turn_rows
from .vision import image_label, image_rows

AGREEMENT_SLACK = 1e-9  # agreement is a share of equal tokens: any real drop counts
TOP1_SLACK = 0.005  # top-1 agreement may move by one position in a few hundred between runs of a runtime
KLD_FLOOR = 1e-4  # nats: below this a KL divergence is noise, whatever the relative change


@dataclass
class Finding:
    """One comparison of a figure with its baseline."""

    config: str  # backend/device/format
    test: str  # pp512+tg128, or chat6-pp170+tg16 for a multi-turn test
    figure: str  # decode_tps | ttft_ms | kl_divergence | top1 | agreement | status | turnN_ttft_ms | ttft_growth
    # | image_ms (the image test's encoding time; its ttft_ms and decode_tps under the image test's label)
    baseline: float | str | None
    current: float | str | None
    change: float | None  # now / baseline - 1 (top1 and agreement: now - baseline)
    regressed: bool


def parse_margin(text: str) -> float:
    """'10%' or '10' -> 0.10."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%?\s*", text or "")
    if not match or float(match[1]) >= 100:
        raise Phi3Error(
            f"--max-regression {text!r} is not a percentage below 100.", hint="Write it like --max-regression 10%."
        )
    return float(match[1]) / 100


def check_comparable(current: dict, baseline: dict, baseline_name: str = "the baseline") -> None:
    """Refuse a baseline of another schema, model or generation length."""
    if baseline.get("schema") != SCHEMA:
        raise Phi3Error(
            f"{baseline_name} is a {baseline.get('schema')!r} report, not {SCHEMA!r}.",
            hint="Record a new baseline with this version of phi3 (`phi3 bench --json FILE`).",
        )
    cur, base = current["model"], baseline["model"]
    same = (
        cur.get("fingerprint") == base.get("fingerprint")
        if cur.get("fingerprint") and base.get("fingerprint")
        else cur.get("slug") == base.get("slug")
    )
    if not same:
        raise Phi3Error(
            f"{baseline_name} measured the model {base.get('spec')!r}; this run measured {cur.get('spec')!r}.",
            hint="Compare runs of the same model: pass the baseline's model with --model.",
        )
    if baseline["settings"].get("gen_tokens") != current["settings"].get("gen_tokens"):
        raise Phi3Error(
            f"{baseline_name} generated {baseline['settings'].get('gen_tokens')} tokens per run; "
            f"this run {current['settings'].get('gen_tokens')}.",
            hint="Use the baseline's --gen-tokens (leave it out and phi3 takes it from the baseline).",
        )


def compare(current: dict, baseline: dict, margin: float, baseline_name: str = "the baseline") -> list[Finding]:
    """Every figure compared; Finding.regressed marks what should fail a CI job."""
    check_comparable(current, baseline, baseline_name)
    now = {
        (r["backend"], r["device"], r["format"], run["prompt_tokens"]): (r, run) for r, run in measured_rows(current)
    }
    status_now = {(r["backend"], r["device"], r["format"]): r for r in current["results"]}
    findings: list[Finding] = []
    quality_checked: set[str] = set()
    for row, run in measured_rows(baseline):
        if row["status"] != "ok":
            continue
        label = f"{row['backend']}/{row['device']}/{row['format']}"
        test = run_label(run)
        cur_row = status_now.get((row["backend"], row["device"], row["format"]))
        if cur_row is None:
            continue  # not selected in this run
        if cur_row["status"] != "ok":
            findings.append(Finding(label, test, "status", "ok", cur_row["status"], None, True))
            continue
        pair = now.get((row["backend"], row["device"], row["format"], run["prompt_tokens"]))
        if pair is None:
            continue  # prompt length not measured in this run
        cur_row, cur_run = pair
        for figure, higher_is_better in (("decode_tps", True), ("ttft_ms", False)):
            base, value = run[figure]["mean"], cur_run[figure]["mean"]
            findings += _ratio(label, test, figure, base, value, margin, higher_is_better)
        if label not in quality_checked:  # quality is one figure per configuration, whatever the test
            quality_checked.add(label)
            findings += _quality_findings(label, test, row["quality"], cur_row["quality"], margin)
    findings += _compare_multi_turn(current, baseline, margin)
    findings += _compare_image(current, baseline, margin)
    return findings


def _quality_findings(label: str, test: str, base: dict, cur: dict, margin: float) -> list[Finding]:
    findings = []
    base_kld, cur_kld = base.get("kl_divergence"), cur.get("kl_divergence")
    if base_kld is not None and cur_kld is not None:
        change = cur_kld / base_kld - 1 if base_kld else None
        grew = cur_kld > base_kld * (1 + margin) and cur_kld - base_kld > KLD_FLOOR
        findings.append(Finding(label, test, "kl_divergence", base_kld, cur_kld, change, grew))
    for figure, slack in (("top1", TOP1_SLACK), ("agreement", AGREEMENT_SLACK)):
        was, now = base.get(figure), cur.get(figure)
        if was is not None and now is not None:
            findings.append(Finding(label, test, figure, was, now, now - was, now < was - slack))
    return findings


def _compare_multi_turn(current: dict, baseline: dict, margin: float) -> list[Finding]:
    """The last turn's TTFT and the growth over the first turn's, for each multi-turn test run in both."""
    now = {
        (r["backend"], r["device"], r["format"], t["prompt_tokens"], t["turns"]): t for r, t in multi_turn_rows(current)
    }
    findings = []
    for row, test in multi_turn_rows(baseline):
        cur = now.get((row["backend"], row["device"], row["format"], test["prompt_tokens"], test["turns"]))
        if cur is None or not test["ttft_ms"] or not cur["ttft_ms"]:
            continue
        label = f"{row['backend']}/{row['device']}/{row['format']}"
        pairs = (
            (f"turn{test['turns']}_ttft_ms", test["ttft_ms"][-1]["mean"], cur["ttft_ms"][-1]["mean"]),
            ("ttft_growth", test["ttft_growth"]["mean"], cur["ttft_growth"]["mean"]),
        )
        for figure, base, value in pairs:
            findings += _ratio(label, multi_turn_label(test), figure, base, value, margin)
    return findings


def _compare_image(current: dict, baseline: dict, margin: float) -> list[Finding]:
    """The image test's encoding time, time to first token and decode speed, where both ran it on the same image."""
    now = {(r["backend"], r["device"], r["format"], t["image"], t["gen_tokens"]): t for r, t in image_rows(current)}
    findings = []
    for row, test in image_rows(baseline):
        cur = now.get((row["backend"], row["device"], row["format"], test["image"], test["gen_tokens"]))
        if cur is None:
            continue
        label = f"{row['backend']}/{row['device']}/{row['format']}"
        for figure, higher_is_better in (("image_ms", False), ("ttft_ms", False), ("decode_tps", True)):
            base, value = test[figure]["mean"], cur[figure]["mean"]
            findings += _ratio(label, image_label(test), figure, base, value, margin, higher_is_better)
    return findings


def _ratio(
    label: str, test: str, figure: str, base: float | None, value: float | None, margin: float, higher_is_better=False
) -> list[Finding]:
    """A speed or time figure against its baseline, as a ratio; it regressed past margin when a speed fell or a time
    grew by more than margin. Nothing where either side has no figure."""
    if not base or value is None:
        return []
    change = value / base - 1
    worse = change < -margin if higher_is_better else value > base * (1 + margin)
    return [Finding(label, test, figure, base, value, change, worse)]
