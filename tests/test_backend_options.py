"""Options a backend declares (BackendSpec.options): parsing `--option KEY=VALUE`, checking it in the core, and one
that reaches the real OpenVINO runtime."""

from __future__ import annotations

import pytest

from phi3cli.backends import get_spec, registry
from phi3cli.backends.options import check_declared, check_options, options_for, parse_pairs
from phi3cli.errors import Phi3Error
from tests.test_cli import assert_clean_error, run_phi3

OPENVINO = get_spec("openvino")
DECLARED = [o.name for o in OPENVINO.options]


def test_pairs_are_parsed_with_dashes_or_underscores_and_a_pair_needs_an_equals_sign():
    assert parse_pairs(["kv-cache-precision=f16", "max_prompt_len=2048"]) == {
        "kv_cache_precision": "f16",
        "max_prompt_len": "2048",
    }
    with pytest.raises(Phi3Error, match="KEY=VALUE, not 'f16'"):
        parse_pairs(["f16"])


def test_values_are_checked_and_typed_by_the_declaring_spec():
    checked = check_options(
        OPENVINO, {"kv_cache_precision": "F16", "max_prompt_len": "2048", "batching": object()}, skip=("batching",)
    )
    assert checked["kv_cache_precision"] == "f16" and checked["max_prompt_len"] == 2048
    for key, value, words in [
        ("kv_cache_precision", "int3", "takes u8, u4, f16, bf16 or f32, not 'int3'"),
        ("max_prompt_len", "many", "takes a whole number ≥ 1, not 'many'"),
        ("max_prompt_len", "0", "takes a whole number ≥ 1, not '0'"),
        ("dynamic_quantization_group_size", "-1", "≥ 0, not '-1'"),
    ]:
        with pytest.raises(Phi3Error) as info:
            check_options(OPENVINO, {key: value})
        assert words in info.value.message and "\n" not in info.value.message


def test_an_unknown_key_names_the_keys_the_backend_takes_or_the_backend_that_takes_it():
    with pytest.raises(Phi3Error) as info:
        check_options(OPENVINO, {"kv_cache": "f16"})
    assert "has no option kv_cache" in info.value.message
    assert all(name in info.value.message for name in DECLARED)
    bare = next(s for s in registry().values() if not s.options)
    with pytest.raises(Phi3Error) as info:
        check_options(bare, {"kv_cache_precision": "f16"})
    assert f"The {bare.name} backend takes no options" in info.value.message
    assert "--backend openvino" in info.value.hint


def test_bench_gives_each_configuration_the_options_its_backend_takes():
    bare = next(s for s in registry().values() if not s.options)
    options = {"kv_cache_precision": "f16"}
    assert options_for(OPENVINO, options) == options and options_for(bare, options) == {}
    check_declared([OPENVINO, bare], options)
    with pytest.raises(Phi3Error, match="No backend measured here has the option kv_cache_precision"):
        check_declared([bare], options)


def test_a_wrong_option_fails_in_one_line_before_the_model_is_looked_for():
    # The model does not exist: the option is checked first, so the error is about the option.
    done = run_phi3("chat", "-m", "./no/such/model", "-b", "openvino", "-o", "kv_cache=f16", "hi")
    assert_clean_error(done, "has no option kv_cache", "kv_cache_precision")
    done = run_phi3("serve", "-m", "./no/such/model", "-b", "openvino", "--option", "attention_backend=flash")
    assert_clean_error(done, "attention_backend takes auto, sdpa or pa, not 'flash'")
    # a flag from before --option is a shorthand for it, checked the same way
    done = run_phi3("chat", "-m", "./no/such/model", "-b", "openvino", "--npu-hint", "fast", "hi")
    assert_clean_error(done, "generate_hint takes fast_compile or best_perf, not 'fast'")


def test_bench_checks_its_options_against_the_backends_it_measures_before_running(config_only_model):
    model = str(config_only_model)
    done = run_phi3("bench", "-m", model, "-b", "torch", "-b", "openvino", "-d", "cpu", "-o", "kv_cache_precision=x")
    assert_clean_error(done, "kv_cache_precision takes u8, u4, f16, bf16 or f32, not 'x'")
    done = run_phi3("bench", "-m", model, "-b", "torch", "-d", "cpu", "-o", "kv_cache_precision=f16")
    assert_clean_error(done, "No backend measured here has the option kv_cache_precision")


def test_the_options_are_listed_in_help_and_by_devices():
    helped = run_phi3("bench", "--help", env={"COLUMNS": "400"})
    assert all(name in helped.stdout for name in DECLARED), helped.stdout
    listed = run_phi3("devices", env={"COLUMNS": "400"})
    assert listed.returncode == 0 and all(name in listed.stdout for name in DECLARED), listed.stdout


@pytest.mark.slow
def test_an_option_reaches_the_openvino_runtime(demo_source, store):
    from phi3cli.loading import load

    def compiled(**options):
        model = load(demo_source, backend="openvino", device="cpu", options=options, store=store)
        try:
            return model.compiled_properties
        finally:
            model.close()

    default = compiled()
    asked = compiled(**parse_pairs(["kv_cache_precision=u8", "performance_hint=throughput"]))
    assert default["KV_CACHE_PRECISION"] == "f16" and default["PERFORMANCE_HINT"] == "LATENCY"
    assert asked["KV_CACHE_PRECISION"] == "u8" and asked["PERFORMANCE_HINT"] == "THROUGHPUT"
