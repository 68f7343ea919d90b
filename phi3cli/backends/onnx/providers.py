"""Which execution providers run an ONNX Runtime GenAI folder: the one place that knows DirectML, CUDA and Windows.

Decided from the device asked, what the folder's genai_config.json names and what this ONNX Runtime GenAI build
provides (`choose_providers` is a pure function).
"""

from __future__ import annotations

from dataclasses import dataclass

from phi3cli.errors import DeviceUnavailableError

# Execution providers a genai_config.json can name, and the package that brings each.
PROVIDERS = {
    "dml": ("DirectML", "onnxruntime-genai-directml (Windows only)"),
    "cuda": ("CUDA", "onnxruntime-genai-cuda (NVIDIA GPUs)"),
}


def available_providers() -> set[str]:
    """GPU execution providers this ONNX Runtime GenAI build has (the CPU is always there)."""
    import onnxruntime_genai as og

    checks = {"dml": "is_dml_available", "cuda": "is_cuda_available"}
    return {name for name, check in checks.items() if getattr(og, check, lambda: False)()}


@dataclass(frozen=True)
class ProviderChoice:
    """The execution providers to run a folder with; () is ONNX Runtime's CPU provider."""

    providers: tuple[str, ...]
    clear: bool  # drop what genai_config.json names, then append `providers`
    note: str | None = None  # something the user should read (a config's provider overridden)


def _provider_label(name: str) -> str:
    return PROVIDERS.get(name, (name, ""))[0]


def _provider_missing(name: str, why: str) -> DeviceUnavailableError:
    label, package = PROVIDERS.get(name, (name, None))
    where = f"{package} provides it" if package else "no ONNX Runtime GenAI package phi3 knows provides it"
    return DeviceUnavailableError(
        f"{why} the {label} execution provider, which this ONNX Runtime GenAI lacks; {where}.",
        hint="Install that package, or run the model on the CPU with --device cpu.",
    )


def choose_providers(device: str, configured: list[str], available: set[str], platform: str) -> ProviderChoice:
    """Providers for a request: cpu clears whatever the folder names (a DirectML folder then runs on the
    CPU); gpu keeps the folder's provider if it has one, else DirectML on Windows, else CUDA."""
    if device == "cpu":
        note = None
        if configured:
            names = ", ".join(_provider_label(p) for p in configured)
            note = f"The model's genai_config.json targets {names}; running it on the CPU with its providers cleared."
        return ProviderChoice((), clear=True, note=note)
    if device != "gpu":
        raise DeviceUnavailableError(
            f"The onnx backend runs on cpu or gpu, not {device}.",
            hint="Use --device cpu or gpu, or --backend openvino for the NPU.",
        )
    if configured:
        for name in configured:
            if name not in available:
                raise _provider_missing(name, "The model's genai_config.json asks for")
        return ProviderChoice(tuple(configured), clear=False)
    wanted = ("dml", "cuda") if platform == "win32" else ("cuda",)
    for name in wanted:
        if name in available:
            return ProviderChoice((name,), clear=True)
    raise DeviceUnavailableError(
        "This ONNX Runtime GenAI has no GPU execution provider: DirectML comes with "
        f"{PROVIDERS['dml'][1]}, CUDA with {PROVIDERS['cuda'][1]}.",
        hint="Install one of them in place of onnxruntime-genai, or use --device cpu.",
    )


def apply_providers(config, choice: ProviderChoice) -> None:
    """Make an og.Config use the chosen providers."""
    if choice.clear:
        config.clear_providers()
        for name in choice.providers:
            config.append_provider(name)


def configured_providers(genai: dict) -> list[str]:
    """The execution providers a genai_config.json names for its decoder, in order."""
    options = genai["model"]["decoder"].get("session_options", {}).get("provider_options", [])
    return [name for entry in options if isinstance(entry, dict) for name in entry]


EXECUTED = {"CPU": "CPU", "DML": "GPU (DirectML)", "CUDA": "GPU (CUDA)"}
