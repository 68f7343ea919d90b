"""No silent fallback: the device that ran is read back from the runtime, shown, and checked against the one asked."""

from __future__ import annotations

import importlib.util

import pytest
from typer.testing import CliRunner

from phi3cli.backends import registry
from phi3cli.backends.base import GenerationSettings
from phi3cli.devices import DeviceReport, executed_devices, normalise_device
from phi3cli.errors import DeviceUnavailableError
from phi3cli.generation import generate_text
from phi3cli.loading import check_executed_device, load
from phi3cli.progress import SilentProgress


@pytest.mark.parametrize(
    "reported, device",
    [
        ("CPU", "cpu"),
        ("GPU", "gpu"),
        ("GPU.0", "gpu"),
        ("GPU.1", "gpu"),
        ("NPU", "npu"),
        ("CPUExecutionProvider", "cpu"),
        ("DmlExecutionProvider", "gpu"),
        ("CUDAExecutionProvider", "gpu"),
        ("GPU (DirectML)", "gpu"),
        ("cuda:0", "gpu"),
        ("['CPU']", "cpu"),
        ("HETERO", None),
        ("", None),
    ],
)
def test_runtime_device_names_are_normalised(reported, device):
    assert normalise_device(reported) == device


def test_a_list_of_devices_is_read_whole():
    assert executed_devices("GPU.0, CPU") == ["gpu", "cpu"]
    assert executed_devices("['NPU']") == ["npu"]


def installed_backends() -> list[str]:
    """The backends this machine runs for real (their module exists and their runtime is installed)."""
    names = []
    for name, spec in registry().items():
        if spec.installed and importlib.util.find_spec(spec.factory.partition(":")[0]) is not None:
            names.append(name)
    return names


@pytest.mark.parametrize("backend", installed_backends())
@pytest.mark.slow
def test_each_backend_reads_the_executed_device_from_its_runtime(backend, demo_source, store):
    """On this machine every runtime executes on the CPU, and says so (read back after loading)."""
    progress = SilentProgress()
    model = load("demo", backend=backend, device="cpu", store=store, progress=progress)
    try:
        assert model.route.device == model.device == "cpu"
        assert executed_devices(model.executed_device) == ["cpu"], model.executed_device
        assert check_executed_device(model) is None
        assert not [n for n in progress.notes if n.startswith("Fallback")]
        prompt = model.chat_template.render([{"role": "user", "content": "Hi"}])
        stats = generate_text(model, prompt, GenerationSettings(max_new_tokens=4))
        assert stats.executed_device == model.executed_device  # what chat's stats line, bench and serve show
    finally:
        model.close()


# Test doubles for hardware this machine does not have. FakeNpuLibBackend behaves as the Intel NPU
# Acceleration Library does on a machine without an NPU: the model is "compiled for the NPU" and runs on
# the CPU; the device it executes on is read back from the real runtime (torch parameters), here CPU.


def fake_report(*args, **kwargs) -> DeviceReport:
    """A device list where an NPU is present (as the NPU library would report one)."""
    return DeviceReport(
        cpu="fake CPU",
        present={"npu-lib": ["npu"], "torch": ["cpu"]},
        details={"npu-lib": "fake npu_available(): True", "torch": "PyTorch: CPU"},
    )


def fake_npu_lib_backend(reference):
    """The npu-lib backend's interface over the real torch runtime (it runs the Hugging Face folder as is)."""
    import dataclasses

    from phi3cli.backends.base import Backend
    from phi3cli.backends.torch_backend.runtime import TorchModel

    class FakeNpuLibModel(TorchModel):
        backend = "npu-lib"

    class FakeNpuLibBackend(Backend):
        def load(self, folder, request, progress):
            # The real demo model on the real torch runtime, asked for the NPU: it reports where it really runs.
            ref = reference
            return FakeNpuLibModel(ref.path, ref.model, ref.tokenizer, ref.format, request.device)

    return FakeNpuLibBackend(dataclasses.replace(registry()["npu-lib"], marker=None, platforms=(), requires=()))


@pytest.fixture
def silent_fallback(monkeypatch, torch_model):
    import phi3cli.devices
    import phi3cli.loading

    real_get_backend = phi3cli.loading.get_backend
    monkeypatch.setattr(phi3cli.devices, "probe", fake_report)
    monkeypatch.setattr(
        phi3cli.loading,
        "get_backend",
        lambda name: fake_npu_lib_backend(torch_model) if name == "npu-lib" else real_get_backend(name),
    )


@pytest.mark.slow
def test_a_runtime_on_another_device_stops_the_command(silent_fallback, store):
    with pytest.raises(DeviceUnavailableError) as caught:
        load("demo", backend="npu-lib", device="npu", store=store)
    assert "Asked for npu" in caught.value.message and "executes on CPU" in caught.value.message
    assert "--allow-fallback" in caught.value.hint


@pytest.mark.slow
def test_allow_fallback_runs_with_a_notice(silent_fallback, store):
    progress = SilentProgress()
    model = load("demo", backend="npu-lib", device="npu", allow_fallback=True, store=store, progress=progress)
    assert (model.route.device, model.device, model.executed_device) == ("npu", "npu", "CPU")
    assert [n for n in progress.notes if n.startswith("Fallback: asked for npu")], progress.notes


@pytest.mark.slow
def test_chat_stops_on_fallback_and_runs_with_allow_fallback(silent_fallback, demo_source):
    from phi3cli.cli import app

    runner = CliRunner()
    args = ["chat", "-m", "demo", "-b", "npu-lib", "-d", "npu", "-n", "8", "What is the capital of France?"]
    stopped = runner.invoke(app, args)
    assert stopped.exit_code == 1, stopped.output
    assert "Error: Asked for npu, but the npu-lib runtime reports it executes on CPU" in stopped.output
    assert "--allow-fallback" in stopped.output and "Traceback" not in stopped.output

    ran = runner.invoke(app, [*args, "--allow-fallback"])
    assert ran.exit_code == 0, ran.output
    assert "Fallback: asked for npu, but the npu-lib runtime reports it executes on CPU" in ran.output
    assert "npu-lib on CPU" in ran.output  # the stats line names the device that ran
    assert "Paris" in ran.output


def test_fallback_notice_is_yellow():
    from io import StringIO

    from rich.console import Console

    from phi3cli.cli.render import RichProgress

    out = StringIO()
    console = Console(file=out, force_terminal=True, color_system="standard")
    with RichProgress(console) as progress:
        progress.note("Fallback: asked for npu, but it executes on CPU.")
    assert "\x1b[33mFallback" in out.getvalue()  # 33: yellow
