"""`phi3 bench --adapter`: one configuration without and with a run-time LoRA adapter, side by side, and its quality.

The same side-by-side measurement as `--draft` (bench/speculative.py) on the synthetic prompt: the base loaded
plain, then with the adapter applied at run time, each through loading.load and every reply through stream_reply.
Quality: the adapter merged into the weights (adapter_store.merged_source, the `phi3 convert --adapter` path) and
converted to the same format is the reference; on bench's perplexity text, teacher-forced, the KL divergence and
top-1 agreement of the run-time adapter against it (how closely run time gives the merged model) and of the base
against it (how much the adapter changes the model, for scale).
"""

from __future__ import annotations

from collections.abc import Callable

from phi3cli.adapters import AdapterChoice
from phi3cli.backends.adapters import ADAPTERS, MERGE_HINT, AdapterError
from phi3cli.backends.base import LoadedModel
from phi3cli.bench.quality import next_token_divergence, perplexity_text
from phi3cli.bench.speculative import figures, measure_tasks
from phi3cli.progress import Progress, SilentProgress
from phi3cli.store import ModelStore

LABELS = ("without", "with")


def _describe(choices: tuple[AdapterChoice, ...]) -> str:
    return " + ".join(c.name + (f" (alpha {c.alpha:g})" if c.alpha != 1 else "") for c in choices)


def run_adapter_bench(
    model: str,
    choices: tuple[AdapterChoice, ...],
    *,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    warmup: int = 1,
    repetitions: int = 3,
    progress: Progress | None = None,
    store: ModelStore | None = None,
    load: Callable[..., LoadedModel] | None = None,
    **how,
) -> dict:
    """Measure the model (how: loading.load's keywords) without, then with the adapters; returns the report."""
    from phi3cli.adapter_store import merged_source
    from phi3cli.backends import get_backend
    from phi3cli.loading import load as load_model
    from phi3cli.loading import prepare
    from phi3cli.sources import resolve_source

    load = load or load_model
    store = store or ModelStore()
    progress = progress or SilentProgress()
    plain = {k: v for k, v in (how.pop("options", None) or {}).items() if k != ADAPTERS}
    where = {k: how.get(k) for k in ("backend", "format") if how.get(k)} | {"device": how.get("device", "auto")}
    if how.get("backend") and not hasattr(impl := get_backend(how["backend"]), "adapter_refusal"):
        raise AdapterError(
            f"Run-time adapters: the {impl.name} backend applies none; nothing to compare.", hint=MERGE_HINT
        )
    source = resolve_source(model, store, progress=progress, **where)
    # Refused (another backend, a merged copy instead) and built before anything is measured.
    ready = prepare(source, store=store, progress=progress, options={**plain, ADAPTERS: choices}, **how)
    if not ready.request.options.get(ADAPTERS):
        raise AdapterError(
            f"The {ready.backend.name} backend runs an adapter merged, not at run time: nothing to compare.",
            hint="Measure the merged copy as any model: phi3 convert MODEL --adapter DIR, then phi3 bench -m it.",
        )
    how = {**how, "format": ready.request.format}  # the merged reference is converted to the format measured
    options = {"without": plain, "with": {**plain, ADAPTERS: choices}}
    runs, logprobs, described = {}, {}, {}
    ids: list[int] = []
    for label in (*LABELS, "merged"):
        progress.phase(f"Loading {model} {label} the adapter" if label in LABELS else "Loading the merged model")
        target = merged_source(source, list(choices), store, progress) if label == "merged" else source
        loaded = load(target, progress=progress, store=store, options=options.get(label, plain), **how)
        try:
            if label in LABELS:
                described = {"backend": loaded.backend, "device": loaded.executed_device, "format": loaded.format}
                reps = measure_tasks(
                    loaded, gen_tokens, prompt_tokens, warmup, repetitions, progress.phase, ("synthetic",)
                )
                runs[label] = reps["synthetic"]
            ids = ids or loaded.encode(perplexity_text())[: loaded.context_length]
            progress.phase(f"Scoring the perplexity text ({label})")
            logprobs[label] = loaded.next_token_logprobs(ids)
        finally:
            loaded.close()
    rows = []
    for label in LABELS:
        kld, top1 = next_token_divergence(logprobs["merged"], logprobs[label])
        rows.append({"adapter": label, **figures(runs[label]), "kl_divergence": kld, "top1": top1})
    return {
        "model": model,
        **described,
        "threads": how.get("threads"),
        "adapter": _describe(choices),
        "reference": f"merged, {described.get('format')}",
        "settings": {"prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "warmup": warmup, "runs": repetitions},
        "quality_tokens": len(ids),
        "prompt_tokens": runs["without"][0].prompt_tokens,
        "rows": rows,
        "ratio": rows[1]["decode_tps"]["mean"] / rows[0]["decode_tps"]["mean"],
    }


def adapter_markdown(report: dict) -> str:
    """The table as Markdown, for docs pages."""
    lines = [
        f"{report['model']} · {report['backend']} {report['format']} on {report['device']} · "
        f"{report['threads'] or 'default'} threads · adapter {report['adapter']} · prompt {report['prompt_tokens']} "
        f"tokens · quality against the {report['reference']} model on {report['quality_tokens']} tokens",
        "",
        "| adapter | decode tok/s | TTFT ms | speed | KLD vs merged | top-1 vs merged |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["rows"]:
        tps, ttft = row["decode_tps"], row["ttft_s"]
        ratio = 1.0 if row["adapter"] == "without" else report["ratio"]
        lines.append(
            f"| {row['adapter']} | {tps['mean']:.1f} ± {tps['std']:.1f} | {1000 * ttft['mean']:.0f} ± "
            f"{1000 * ttft['std']:.0f} | {ratio:.2f}× | {row['kl_divergence']:.2g} | {row['top1']:.1%} |"
        )
    return "\n".join(lines) + "\n"
