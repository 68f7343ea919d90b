"""Which backend each --device picks given which devices are present: choose_route over made-up DeviceReports.

choose_route is a pure function of a DeviceReport, so every machine (an AI PC with an NPU, a GPU laptop,
a CPU-only server) can be described here without having it.
"""

from __future__ import annotations

import pytest

from phi3cli.devices import DeviceReport
from phi3cli.errors import BackendUnavailableError, DeviceUnavailableError
from phi3cli.routing import backends_to_probe, choose_route

NOT_WIN = "npu-lib installs only on win32 (this is linux)"
DETAILS = {
    "openvino": "OpenVINO devices: {}",
    "onnx": "ONNX Runtime GenAI providers: {}",
    "npu-lib": "the Intel NPU Acceleration Library's npu_available(): {}",
    "torch": "PyTorch: CPU",
}


def machine(openvino=None, onnx=None, npu_lib=None, torch=("cpu",), missing=None) -> DeviceReport:
    """A report: each backend's devices (None: not installed), as the probes would fill it."""
    report = DeviceReport(cpu="Test CPU (8 logical cores)")
    for name, devices in (("openvino", openvino), ("onnx", onnx), ("npu-lib", npu_lib), ("torch", torch)):
        if devices is None:
            report.missing[name] = (missing or {}).get(name, f"{name} not installed")
            continue
        report.present[name] = list(devices)
        seen = {
            "openvino": ", ".join(d.upper() for d in devices) or "none",
            "onnx": ", ".join(["DirectML"] * ("gpu" in devices) + ["CPU"]),
            "npu-lib": str("npu" in devices),
            "torch": "",
        }[name]
        report.details[name] = DETAILS[name].format(seen)
    return report


AI_PC = machine(openvino=("npu", "gpu", "cpu"), onnx=("gpu", "cpu"), npu_lib=("npu",))
AI_PC_LINUX = machine(openvino=("npu", "gpu", "cpu"), onnx=("cpu",), missing={"npu-lib": NOT_WIN})
GPU_LAPTOP = machine(openvino=("gpu", "cpu"), onnx=("gpu", "cpu"), npu_lib=())
CPU_SERVER = machine(openvino=("cpu",), onnx=("cpu",), missing={"npu-lib": NOT_WIN})
ONNX_ONLY = machine(onnx=("gpu", "cpu"))
TORCH_ONLY = machine()
LIBRARY_ONLY_NPU = machine(openvino=("cpu",), onnx=("cpu",), npu_lib=("npu",))


@pytest.mark.parametrize(
    "report, device, backend, runtime, expected",
    [
        # An AI PC: OpenVINO GenAI's NPU plugin is the default for the NPU, and for auto.
        (AI_PC, "auto", None, None, ("openvino", "npu")),
        (AI_PC, "npu", None, None, ("openvino", "npu")),
        (AI_PC, "gpu", None, None, ("openvino", "gpu")),
        (AI_PC, "cpu", None, None, ("openvino", "cpu")),
        # The NPU library only when named.
        (AI_PC, "npu", "npu-lib", None, ("npu-lib", "npu")),
        (AI_PC, "auto", "npu-lib", None, ("npu-lib", "npu")),
        (AI_PC, "auto", None, "npu-lib", ("npu-lib", "npu")),  # a folder made by `phi3 quantize --backend npu-lib`
        (AI_PC_LINUX, "npu", None, None, ("openvino", "npu")),
        (AI_PC, "gpu", "onnx", None, ("onnx", "gpu")),
        # No NPU: auto takes the GPU, then the CPU.
        (GPU_LAPTOP, "auto", None, None, ("openvino", "gpu")),
        (GPU_LAPTOP, "gpu", "onnx", None, ("onnx", "gpu")),
        (CPU_SERVER, "auto", None, None, ("openvino", "cpu")),
        (CPU_SERVER, "cpu", "onnx", None, ("onnx", "cpu")),
        (CPU_SERVER, "auto", None, "onnx", ("onnx", "cpu")),
        (ONNX_ONLY, "auto", None, None, ("onnx", "gpu")),
        (ONNX_ONLY, "cpu", None, None, ("onnx", "cpu")),
        (TORCH_ONLY, "auto", None, None, ("torch", "cpu")),
        (TORCH_ONLY, "cpu", None, None, ("torch", "cpu")),
        (LIBRARY_ONLY_NPU, "auto", None, None, ("openvino", "cpu")),  # never picks the library by itself
    ],
)
def test_route(report, device, backend, runtime, expected):
    route = choose_route(report, device=device, backend=backend, runtime=runtime)
    assert (route.backend, route.device) == expected


def test_auto_says_what_it_picked_and_why():
    reason = choose_route(GPU_LAPTOP).reason
    assert reason.startswith("auto: picked gpu with openvino") and "OpenVINO devices: GPU, CPU" in reason


def test_no_npu_names_both_checks_what_the_machine_has_and_where_to_run_instead():
    with pytest.raises(DeviceUnavailableError) as info:
        choose_route(CPU_SERVER, device="npu")
    message = info.value.message
    assert message.startswith("No NPU found.")
    assert "OpenVINO devices: CPU" in message
    assert f"the Intel NPU Acceleration Library's npu_available() cannot be asked here ({NOT_WIN})" in message
    assert "ONNX" not in message and "PyTorch" not in message  # they cannot drive an NPU, so were not asked
    assert "This machine has: CPU — Test CPU (8 logical cores)." in message
    assert info.value.instead == "cpu"


def test_no_npu_with_a_gpu_suggests_the_gpu():
    with pytest.raises(DeviceUnavailableError) as info:
        choose_route(GPU_LAPTOP, device="npu")
    assert "npu_available(): False" in info.value.message and "GPU" in info.value.message
    assert info.value.instead == "gpu"


def test_only_the_library_sees_the_npu():
    with pytest.raises(DeviceUnavailableError, match="Only the npu-lib backend sees an NPU") as info:
        choose_route(LIBRARY_ONLY_NPU, device="npu")
    assert "--backend npu-lib" in info.value.hint


def test_library_without_an_npu_does_not_offer_its_own_cpu():
    with pytest.raises(DeviceUnavailableError, match="No NPU for the npu-lib backend found") as info:
        choose_route(GPU_LAPTOP, device="npu", backend="npu-lib")
    assert info.value.instead is None and "Leave out --backend npu-lib" in info.value.hint


def test_library_not_installable_says_why_and_what_instead():
    from phi3cli.backends import registry

    report = machine(openvino=("npu", "cpu"), missing={"npu-lib": registry()["npu-lib"].missing() or NOT_WIN})
    with pytest.raises(BackendUnavailableError) as info:
        choose_route(report, device="npu", backend="npu-lib")
    assert info.value.hint == "Use OpenVINO GenAI's NPU plugin instead: --backend openvino --device npu."


def test_no_gpu_points_to_the_cpu():
    with pytest.raises(DeviceUnavailableError) as info:
        choose_route(CPU_SERVER, device="gpu")
    assert info.value.message.startswith("No GPU found.") and info.value.instead == "cpu"


def test_command_on_rewrites_the_device():
    from phi3cli.cli.errors import command_on

    assert command_on("cpu", ["chat", "--model", "demo", "--device", "npu", "hi there"]) == (
        "phi3 chat --model demo --device cpu 'hi there'"
    )
    assert command_on("gpu", ["chat", "-d", "npu"]) == "phi3 chat -d gpu"
    assert command_on("cpu", ["bench", "--device=npu"]) == "phi3 bench --device=cpu"
    assert command_on("cpu", ["chat"]) == "phi3 chat --device cpu"


@pytest.mark.parametrize(
    "device, backend, expected",
    [
        ("auto", None, {"openvino", "onnx", "torch"}),  # the library is imported only when it could be used
        ("cpu", None, {"openvino", "onnx", "torch"}),
        ("npu", None, {"openvino", "npu-lib"}),
        ("auto", "npu-lib", {"npu-lib"}),
        ("gpu", "onnx", {"onnx"}),
    ],
)
def test_backends_to_probe(device, backend, expected):
    assert set(backends_to_probe(device, backend)) == expected
