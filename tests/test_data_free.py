"""The data-free int4 recipe (the default above 1B parameters) on the real demo model, through the real CLI."""

from __future__ import annotations

import pytest

from tests.conftest import run_phi3


@pytest.mark.slow
def test_openvino_data_free_makes_every_layer_int4_and_runs(demo_source, tmp_path):
    from phi3cli.backends.openvino.ir import weight_summary

    out = tmp_path / "demo-ov-data-free"
    proc = run_phi3("convert", "demo", "--to", "openvino", "--format", "int4", "--recipe", "data-free", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "int4 asym, group 64, ratio 1" in proc.stderr  # the recipe is said, and it is not the calibrated one
    assert "scale estimation" not in proc.stderr
    shares = weight_summary(out / "openvino_model.xml")
    assert shares["int4"] > 0.75 and shares.get("int8", 0) > 0.1, shares  # layers int4; the tied embedding int8
    answer = run_phi3("chat", "--model", str(out), "-n", "16", "What is the capital of France?")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip(), answer.stderr
