"""`phi3 bench --draft / --prompt-lookup`: one configuration without and with speculation, side by side.

Both loads go through loading.load and every reply through stream_reply, as chat runs them, one after the other in
this process (the plain model is closed before the speculative one loads). Two tasks: the ordinary synthetic
prompt (shuffled words, where lookup has little to find) and an input-grounded one, a chat message asking to
copy a shipped paragraph (bench/data/grounded.txt), where the answer repeats its input and lookup pays. Greedy,
so both runs must give the same tokens; the table says whether they did. The plain model is loaded with
SAME_NUMERICS, as a speculating one is, so the two differ by speculation alone.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

from phi3cli.backends.base import GenerationSettings, LoadedModel
from phi3cli.bench.measure import synthetic_prompt
from phi3cli.bench.quality import DATA
from phi3cli.bench.stats import summarize
from phi3cli.generation import ReplyStats, generate_text
from phi3cli.progress import Progress, SilentProgress
from phi3cli.speculation import SAME_NUMERICS, Speculation

TASKS = ("synthetic", "copy a given text")
GROUNDED_ASK = "Repeat this text:\n\n"  # of the asks tried, the one the demo follows most closely


@cache
def grounded_text() -> str:
    """The paragraph the input-grounded task copies (written for phi3, shipped with the package)."""
    return (DATA / "grounded.txt").read_text(encoding="utf-8")


def grounded_prompt(model: LoadedModel) -> list[int]:
    """The input-grounded task's prompt: the chat message asking to copy the shipped paragraph, templated."""
    return model.encode(model.chat_template.render([{"role": "user", "content": GROUNDED_ASK + grounded_text()}]))


def _task_prompts(model: LoadedModel, prompt_tokens: int, runs: int) -> dict[str, list[list[int]]]:
    return {
        "synthetic": [synthetic_prompt(model.encode, prompt_tokens, seed) for seed in range(runs)],
        "copy a given text": [grounded_prompt(model)] * runs,
    }


def measure_tasks(
    model: LoadedModel, gen_tokens: int, prompt_tokens: int, warmup: int, runs: int, note, tasks=TASKS
) -> dict:
    """Per task: the replies of `runs` repetitions after `warmup` unmeasured ones (the first prompt's)."""
    out = {}
    for task, prompts in _task_prompts(model, prompt_tokens, warmup + runs).items():
        if task not in tasks:
            continue
        # The synthetic prompt runs to its length as bench's own test does; the copy stops where the model ends it.
        settings = GenerationSettings(max_new_tokens=gen_tokens, ignore_eos=task == "synthetic")
        replies: list[ReplyStats] = []
        for i, ids in enumerate(prompts):
            note(f"{task}: run {i + 1} of {len(prompts)}")
            stats = generate_text(model, ids, settings)
            if i >= warmup:
                replies.append(stats)
        out[task] = replies
    return out


def figures(replies: list[ReplyStats]) -> dict:
    accepted = [r.acceptance for r in replies if r.acceptance is not None]
    return {
        "decode_tps": summarize([r.decode_tps for r in replies]),
        "ttft_s": summarize([r.ttft_s for r in replies]),
        "tokens": summarize([r.generated_tokens for r in replies]),
        "passes": summarize([r.steps for r in replies]),
        "acceptance": sum(accepted) / len(accepted) if accepted else None,
    }


def run_speculation_bench(
    model: str,
    speculation: Speculation,
    *,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    warmup: int = 1,
    repetitions: int = 3,
    progress: Progress | None = None,
    load: Callable[..., LoadedModel] | None = None,
    **how,
) -> dict:
    """Measure the model (how: loading.load's keywords) without, then with speculation; returns the report."""
    from phi3cli.loading import load as load_model

    load = load or load_model
    progress = progress or SilentProgress()
    how["options"] = {**SAME_NUMERICS, **(how.get("options") or {})}  # the baseline computes as speculation does
    runs: dict[str, dict] = {}
    described = {}
    for label, spec in (("without", None), ("with", speculation)):
        progress.phase(f"Loading {model} {label} speculation")
        loaded = load(model, progress=progress, speculation=spec, **how)
        try:
            described = {"backend": loaded.backend, "device": loaded.executed_device, "format": loaded.format}
            runs[label] = measure_tasks(loaded, gen_tokens, prompt_tokens, warmup, repetitions, progress.phase)
        finally:
            loaded.close()
    tasks = []
    for task, plain in runs["without"].items():
        fast = runs["with"][task]
        without, with_ = figures(plain), figures(fast)
        tasks.append(
            {
                "task": task,
                "prompt_tokens": plain[0].prompt_tokens,
                "without": without,
                "with": with_,
                "ratio": with_["decode_tps"]["mean"] / without["decode_tps"]["mean"],
                "acceptance": with_["acceptance"],
                "tokens_per_pass": with_["tokens"]["mean"] / with_["passes"]["mean"],
                "same_answer": all(a.token_ids == b.token_ids for a, b in zip(plain, fast, strict=True)),
                "answer": fast[0].text,
            }
        )
    return {
        "model": model,
        **described,
        "threads": how.get("threads"),
        "speculation": speculation.describe(),
        "settings": {"prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "warmup": warmup, "runs": repetitions},
        "tasks": tasks,
    }


def speculation_markdown(report: dict) -> str:
    """The table as Markdown, for docs pages."""
    lines = [
        f"{report['model']} · {report['backend']} {report['format']} on {report['device']} · "
        f"{report['threads'] or 'default'} threads · {report['speculation']}",
        "",
        "| task | prompt | decode tok/s without | decode tok/s with | speed-up | accepted | tokens/pass | same answer |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in report["tasks"]:
        without, with_ = row["without"]["decode_tps"], row["with"]["decode_tps"]
        accepted = "n/a" if row["acceptance"] is None else f"{row['acceptance']:.0%}"
        lines.append(
            f"| {row['task']} | {row['prompt_tokens']} | {without['mean']:.1f} ± {without['std']:.1f} | "
            f"{with_['mean']:.1f} ± {with_['std']:.1f} | {row['ratio']:.2f}× | {accepted} | "
            f"{row['tokens_per_pass']:.2f} | {'yes' if row['same_answer'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"
