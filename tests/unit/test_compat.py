"""Compatibility fingerprint: any differing field means a different namespace, and is named."""

import os

import msgspec
import pytest

from kvmkt_connector.compat import (
    CompatFingerprint,
    KVLayoutSpec,
    fingerprint_from_vllm_config,
    sharing_blockers,
)

LAYOUT = KVLayoutSpec("FLASH_ATTN", "NHD", "bfloat16", 32, 65536, 1, 1)
BASE = CompatFingerprint(
    page_format=1, key_scheme="sha256-prefix-v1", vllm_version="0.26.0", model="/m/llama",
    model_revision=None, model_files="abc", weights="checkpoint", hf_config="def", architecture="LlamaForCausalLM",
    dtype="bfloat16", kv_cache_dtype="auto", calculate_kv_scales=False, quantization=None,
    tokenizer="/m/llama", tokenizer_revision=None, block_size=16, num_layers=32,
    num_kv_heads=8, head_size=128, tp_size=1, pp_size=1, dcp_size=1, kv_layout=LAYOUT,
)


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if value is None:
        return "something"
    return value + "-x"


@pytest.mark.parametrize("field", [f for f in BASE.__struct_fields__ if f != "kv_layout"])
def test_each_field_changes_the_namespace_and_is_named(field):
    other = msgspec.structs.replace(BASE, **{field: _changed(getattr(BASE, field))})
    assert other.digest() != BASE.digest()
    assert [d[0] for d in BASE.differences(other)] == [field]
    assert field in BASE.describe_differences(other)


@pytest.mark.parametrize("field", KVLayoutSpec.__struct_fields__)
def test_each_layout_field_changes_the_namespace_and_is_named(field):
    layout = msgspec.structs.replace(LAYOUT, **{field: _changed(getattr(LAYOUT, field))})
    other = BASE.with_layout(layout)
    assert other.digest() != BASE.digest()
    assert [d[0] for d in BASE.differences(other)] == [f"kv_layout.{field}"]


def test_equal_fingerprints_share_a_namespace():
    copy = msgspec.msgpack.decode(msgspec.msgpack.encode(BASE), type=CompatFingerprint)
    assert copy.digest() == BASE.digest() and not BASE.differences(copy)


def test_blockers():
    assert sharing_blockers(BASE, 1) == []
    assert any("hybrid" in r for r in sharing_blockers(BASE, 2))
    fp = msgspec.structs.replace(BASE, calculate_kv_scales=True, pp_size=2)
    assert len(sharing_blockers(fp, 1)) == 2


def _engine_fp(model_dir, **overrides):
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=str(model_dir), skip_tokenizer_init=True, max_model_len=512,
                dtype="float32", block_size=16)
    args.update(overrides)
    return fingerprint_from_vllm_config(EngineArgs(**args).create_engine_config())


def test_from_real_vllm_configs(tmp_path):
    from kvmkt_connector.demo.tiny_model import write_tiny_llama

    m1 = write_tiny_llama(str(tmp_path / "m1"), seed=1)
    m2 = write_tiny_llama(str(tmp_path / "m2"), seed=2)
    base = _engine_fp(m1)
    assert base.num_layers == 2 and base.num_kv_heads == 2 and base.head_size == 32
    assert _engine_fp(m1).digest() == base.digest()
    assert {d[0] for d in base.differences(_engine_fp(m1, dtype="bfloat16"))} == {"dtype"}
    assert {d[0] for d in base.differences(_engine_fp(m1, block_size=32))} == {"block_size"}
    assert {"model", "model_files", "tokenizer"} <= {d[0] for d in base.differences(_engine_fp(m2))}
    rope = _engine_fp(m1, hf_overrides={"rope_theta": 5000.0})
    assert [d[0] for d in base.differences(rope)] == ["hf_config"]
    dummy = _engine_fp(m1, load_format="dummy")  # random weights: never KV of real ones
    assert [d[0] for d in base.differences(dummy)] == ["weights"]


_FP8_WEIGHTS = {"quant_method": "fp8", "activation_scheme": "dynamic"}


@pytest.mark.parametrize(("base", "other", "fields"), [
    ({}, {"quantization": "fp8"}, ["quantization"]),  # weights quantized when loading
    ({}, {"hf_overrides": {"quantization_config": _FP8_WEIGHTS}},  # a quantized checkpoint
     ["hf_config", "quantization"]),
    ({"hf_overrides": {"quantization_config": _FP8_WEIGHTS}},  # same method, other blocks
     {"hf_overrides": {"quantization_config": {**_FP8_WEIGHTS, "weight_block_size": [64, 64]}}},
     ["hf_config"]),
    ({}, {"kv_cache_dtype": "fp8"}, ["kv_cache_dtype"]),
    ({"kv_cache_dtype": "fp8_e4m3"}, {"kv_cache_dtype": "fp8_e5m2"}, ["kv_cache_dtype"]),
    ({"kv_cache_dtype": "fp8"}, {"kv_cache_dtype": "fp8", "kv_cache_dtype_skip_layers": ["0"]},
     ["kv_cache_dtype"]),
    ({}, {"hf_overrides": {"rope_theta": 5000.0}}, ["hf_config"]),
    ({}, {"hf_overrides": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}},
     ["hf_config"]),
    ({"hf_overrides": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}},
     {"hf_overrides": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}}, ["hf_config"]),
    ({"hf_overrides": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}},
     {"hf_overrides": {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}}, ["hf_config"]),
], ids=["quantization", "quantization_config", "quantization_config-params", "kv_cache_dtype",
        "kv_cache_dtype-fp8-kinds", "kv_cache_dtype_skip_layers", "rope_theta", "rope_scaling",
        "rope_scaling-factor", "rope_scaling-type"])  # fmt: skip
def test_quantization_and_rope_settings_are_not_interchangeable(tmp_path, base, other, fields):
    """Configs that differ only there give other KV bytes: other namespaces, and the log
    names what differs. (bfloat16: vLLM refuses fp8 quantization of float32 models.)"""
    from kvmkt_connector.demo.tiny_model import write_tiny_llama

    m1 = write_tiny_llama(str(tmp_path / "m1"), seed=1)
    a = _engine_fp(m1, dtype="bfloat16", **base)
    b = _engine_fp(m1, dtype="bfloat16", **other)
    assert a.digest() != b.digest()
    assert [d[0] for d in a.differences(b)] == fields
    assert _engine_fp(m1, dtype="bfloat16", **other).digest() == b.digest()  # deterministic


def test_the_same_model_by_another_path_shares(tmp_path):
    """A trailing slash, a symlink or a relative path name the same model: one namespace."""
    from kvmkt_connector.demo.tiny_model import write_tiny_llama

    m1 = write_tiny_llama(str(tmp_path / "m1"), seed=1)
    os.symlink(m1, tmp_path / "link")
    base = _engine_fp(m1)
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        relative = _engine_fp("m1")
    finally:
        os.chdir(cwd)
    for other in (_engine_fp(m1 + "/"), _engine_fp(tmp_path / "link"), relative):
        assert base.digest() == other.digest(), base.describe_differences(other)
