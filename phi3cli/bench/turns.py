"""The multi-turn test (phi3 bench --turns N): its label, the configurations that ran it, its figures."""

from __future__ import annotations

from .stats import fmt_figure, summarize


def multi_turn_label(test: dict) -> str:
    """A multi-turn test: N turns, each a user message of prompt_tokens and an answer of gen_tokens."""
    return f"chat{test['turns']}-pp{test['prompt_tokens']}+tg{test['gen_tokens']}"


def multi_turn_rows(report: dict):
    """(result, multi-turn test) for every configuration that ran one."""
    for row in report["results"]:
        if row["status"] == "ok":
            for test in row.get("multi_turn") or []:
                yield row, test


def multi_turn_figures(test: dict) -> dict:
    """Per turn over the repetitions: TTFT, prompt and cached tokens; growth is turn N's TTFT / turn 1's."""
    reps = test["reps"]
    per_turn = list(zip(*reps, strict=True)) if reps else []
    return {
        "prompt_tokens": test["prompt_tokens"],
        "gen_tokens": test["gen_tokens"],
        "turns": test["turns"],
        "turn_prompt_tokens": [round(sum(t["prompt_tokens"] for t in turn) / len(turn)) for turn in per_turn],
        "cached_tokens": [round(sum(t["cached_tokens"] for t in turn) / len(turn)) for turn in per_turn],
        "ttft_ms": [summarize([t["ttft_ms"] for t in turn]) for turn in per_turn],
        "ttft_growth": summarize([rep[-1]["ttft_ms"] / rep[0]["ttft_ms"] for rep in reps if rep[0]["ttft_ms"] > 0]),
    }


def multi_turn_markdown(report: dict) -> list[str]:
    """The multi-turn table: time to first token at each turn, and turn N's over turn 1's."""
    tests = list(multi_turn_rows(report))
    if not tests:
        return []
    turns = max(test["turns"] for _, test in tests)
    reuse = "kept between turns" if report["settings"].get("cache_reuse") else "not kept (--no-cache-reuse)"
    lines = [
        "",
        f"Multi-turn: time to first token (ms) at each turn of a conversation; KV cache {reuse}. Under each turn, "
        "the whole prompt and how much of it came from the cache.",
        "",
        "| device | backend | format | test | "
        + " | ".join(f"turn {i + 1}" for i in range(turns))
        + " | turn N / turn 1 |",
        "|---|---|---|---|" + "--:|" * (turns + 1),
    ]
    for row, test in tests:
        cells = [row["device"], row["backend"], row["format"], multi_turn_label(test)]
        for i in range(turns):
            if i < len(test["ttft_ms"]):
                cells.append(
                    f"{fmt_figure(test['ttft_ms'][i], 0)} ({test['turn_prompt_tokens'][i]}, "
                    f"{test['cached_tokens'][i]} cached)"
                )
            else:
                cells.append("")
        cells.append(fmt_figure(test["ttft_growth"], 2))
        lines.append("| " + " | ".join(cells) + " |")
    return lines
