"""OpenVINO weight-compression recipes: the NNCF settings for int4, int8 and fp16, with defaults filled in and checked.

No runtime is imported here; export.py applies the settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phi3cli.backends.base import ConvertRecipe
from phi3cli.backends.nncf_weights import CALIBRATION_TEXT, calibration_samples
from phi3cli.backends.openvino import SPEC
from phi3cli.errors import ConversionError, UnsupportedModelError
from phi3cli.progress import Progress
from phi3cli.sizing import calibrated_by_default, parameter_count

FORMATS = SPEC.formats
# Bump when a default below or what export writes changes: it is part of the store key, so stored variants are
# rebuilt (history in CHANGELOG.md).
RECIPE_VERSION = "6"
# The int4 defaults (measured: docs/results/). Up to CALIBRATED_MAX_PARAMETERS, `calibrated`: asymmetric, group
# 64, 60 % of the layers int4 (the rest int8), scales fitted by NNCF's scale estimation on phi3's calibration text.
# Above it, `data-free`: asymmetric, group 64, every layer int4 (embedding and lm_head int8), no inference pass,
# so a 3.8B model converts in minutes within about its fp16 size of memory. `cookbook`: the Phi-3 Cookbook's
# data-free recipe. The NPU's: OpenVINO's NPU guide (symmetric, channel-wise, all layers int4).
INT4_RECIPE = {"group_size": 64, "ratio": 0.6, "sym": False, "scale_estimation": True}
DATA_FREE_INT4_RECIPE = {"group_size": 64, "ratio": 1.0, "sym": False}
NAMED_INT4_RECIPES = {
    "calibrated": INT4_RECIPE,
    "data-free": DATA_FREE_INT4_RECIPE,
    "cookbook": {"group_size": 128, "ratio": 0.6, "sym": True},
}
NPU_INT4_RECIPE = {"group_size": -1, "ratio": 1.0, "sym": True}
MIN_GROUP_SIZE = 16
HUB_DATASETS = ("wikitext2", "c4", "c4-new", "gsm8k")


def weight_widths(config: dict) -> list[int]:
    """The input widths of the model's weight matrices (what an int4 group size must divide)."""
    hidden = int(config["hidden_size"])
    heads = int(config.get("num_attention_heads") or 1)
    head_dim = int(config.get("head_dim") or hidden // heads)
    widths = {hidden, heads * head_dim}
    if config.get("intermediate_size"):
        widths.add(int(config["intermediate_size"]))
    return sorted(widths)


def fit_group_size(requested: int, widths: list[int]) -> int:
    """The requested group size if it divides every width, else the largest power of two below it that does."""
    if requested == -1 or all(w % requested == 0 for w in widths):
        return requested
    size = 1 << (requested.bit_length() - 1)
    while size >= MIN_GROUP_SIZE:
        if size < requested and all(w % size == 0 for w in widths):
            return size
        size //= 2
    raise ConversionError(
        f"No int4 group size of at least {MIN_GROUP_SIZE} divides the layer widths {widths}.",
        hint="Use --group-size -1 (channel-wise) or --format int8.",
    )


def resolve_recipe(recipe: ConvertRecipe, config: dict, progress: Progress) -> dict[str, Any] | None:
    """NNCF weight-compression settings for a recipe (None for fp16), with defaults filled in and checked."""
    if recipe.format not in FORMATS:
        raise UnsupportedModelError(
            f"OpenVINO builds {', '.join(FORMATS)} weights, not {recipe.format}.",
            hint="Use --format int4, int8 or fp16 (fp32 runs with --backend torch or onnx).",
        )
    if recipe.target not in SPEC.convert_targets:
        raise ConversionError(
            f"OpenVINO builds for cpu, gpu or npu, not {recipe.target}.", hint="Use --device cpu, gpu or npu."
        )
    if recipe.ratio is not None and not 0.0 <= recipe.ratio <= 1.0:
        raise ConversionError(f"--ratio must be between 0 and 1, not {recipe.ratio}.", hint="For example --ratio 0.8.")
    if recipe.preset is not None:
        if recipe.preset not in NAMED_INT4_RECIPES:
            names = ", ".join(NAMED_INT4_RECIPES)
            raise ConversionError(f"OpenVINO has no recipe named {recipe.preset!r}.", hint=f"Use --recipe {names}.")
        if recipe.format != "int4":
            raise ConversionError(f"--recipe {recipe.preset} is an int4 recipe.", hint="Use --format int4.")
    if recipe.format == "fp16":
        if recipe.awq or recipe.dataset:
            raise ConversionError(
                "--awq and --dataset tune weight compression; fp16 compresses nothing.", hint="Use --format int4."
            )
        return None
    if recipe.format == "int8":
        if recipe.group_size is not None or recipe.ratio is not None:
            progress.note("int8 is channel-wise on every layer; --group-size and --ratio apply to int4 only.")
        # Channel-wise int8 on every layer; asymmetric unless asked (optimum-intel's default).
        return {"bits": 8, "sym": bool(recipe.sym), "group_size": -1, "ratio": 1.0, **_data_aware(recipe)}
    defaults = _default_int4(recipe, config, progress)
    requested = recipe.group_size if recipe.group_size is not None else defaults["group_size"]
    if requested == 0 or requested < -1:
        raise ConversionError(
            f"--group-size must be a positive number or -1 (channel-wise), not {requested}.",
            hint="For example --group-size 128.",
        )
    group = fit_group_size(requested, weight_widths(config))
    if group != requested:
        progress.note(
            f"Group size {requested} does not divide every layer width {weight_widths(config)}; "
            f"using {group}, the largest that does (set it with --group-size)."
        )
    settings = {
        "bits": 4,
        "sym": defaults["sym"] if recipe.sym is None else recipe.sym,
        "group_size": group,
        "ratio": defaults["ratio"] if recipe.ratio is None else recipe.ratio,
        **_data_aware(recipe),
    }
    if defaults.get("scale_estimation"):  # on the shipped text unless --dataset gives another
        settings["scale_estimation"] = True
        settings.setdefault("dataset", calibration_samples())
    return settings


def _default_int4(recipe: ConvertRecipe, config: dict, progress: Progress) -> dict[str, Any]:
    """The int4 settings a recipe starts from: the named one, the NPU's, or the default for the model's size."""
    if recipe.preset is not None:
        return NAMED_INT4_RECIPES[recipe.preset]
    if recipe.target == "npu":
        return NPU_INT4_RECIPE
    if calibrated_by_default(config):
        return INT4_RECIPE
    if not (recipe.awq or recipe.dataset):
        progress.note(
            f"{parameter_count(config) / 1e9:.1f}B parameters: int4 without calibration (--recipe data-free: every "
            "layer int4, asymmetric, group 64), which needs no inference pass; --recipe calibrated fits the scales "
            "on calibration text, at about twice the memory and many times the time."
        )
    return DATA_FREE_INT4_RECIPE


def _data_aware(recipe: ConvertRecipe) -> dict[str, Any]:
    """AWQ settings: quant_method and a dataset optimum-intel accepts (a name, or a list of texts from a file)."""
    if not recipe.awq and not recipe.dataset:
        return {}
    name = recipe.dataset
    path = Path(name).expanduser() if name else CALIBRATION_TEXT  # --awq alone: phi3's shipped text
    if path.is_file():
        texts = calibration_samples(path)
        if not texts:
            raise ConversionError(
                f"The calibration file {path} is empty.", hint="Give a text file, paragraphs split by blank lines."
            )
        dataset: str | list[str] = texts
    elif name == "auto":
        dataset = name
    elif name in HUB_DATASETS:
        import importlib.util

        if importlib.util.find_spec("datasets") is None:
            raise ConversionError(
                f"--dataset {name} is fetched from the Hugging Face hub with the `datasets` package, "
                "which is not installed.",
                hint="Use --dataset auto (text the model generates) or --dataset FILE.txt (paragraphs split by blank lines), "
                "or pip install datasets and connect to the hub.",
            )
        dataset = name
    else:
        raise ConversionError(
            f"Unknown calibration data set {name!r}.",
            hint=f"Use auto, a text file (paragraphs split by blank lines), or one of {', '.join(HUB_DATASETS)}.",
        )
    return {"dataset": dataset, "quant_method": "awq" if recipe.awq else "default"}


def describe_recipe(settings: dict[str, Any] | None) -> str:
    if settings is None:
        return "fp16"
    if settings["bits"] == 8:
        return f"int8 {'sym' if settings['sym'] else 'asym'}, channel-wise"
    group = "channel-wise" if settings["group_size"] == -1 else f"group {settings['group_size']}"
    awq = ", AWQ" if settings.get("quant_method") == "awq" else ""
    scales = ", scale estimation" if settings.get("scale_estimation") else ""
    return f"int4 {'sym' if settings['sym'] else 'asym'}, {group}, ratio {settings['ratio']:g}{awq}{scales}"
