"""Compatibility fingerprint: when are two instances' KV pages interchangeable?

Two instances may share a page only if every field below is equal. The fingerprint's digest
is the namespace of the block keys and of the registry, so instances that differ in any
field never see each other's pages. ``differences`` names the fields that differ, for the
log line a user reads when sharing does not happen.

Model-level fields come from the ``VllmConfig`` (the same in the scheduler and the workers);
the KV layout comes from the tensors the workers registered and reaches the scheduler
in the workers' first connector metadata (metadata.MarketplaceHandshake).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import msgspec

from kvmkt_connector.hashing import HASH_SCHEME

# Bumped whenever the meaning of a page or key changes in an incompatible way.
PAGE_FORMAT_VERSION = 1


class KVLayoutSpec(msgspec.Struct, frozen=True):
    """The byte layout of one worker's KV pages (one scheduler block of every layer)."""

    attention_backend: str
    kv_layout: str  # "NHD" / "HND": token-major or head-major inside a page
    kv_dtype: str  # the torch dtype of the cache tensors
    num_layers: int  # distinct KV tensors registered
    page_bytes: int  # bytes of one block in one layer (all segments)
    segments_per_page: int  # contiguous pieces a page is split into (K|V packed: 1)
    kernel_blocks_per_block: int


class CompatFingerprint(msgspec.Struct, frozen=True):
    """Everything that makes KV bytes interchangeable between two instances."""

    page_format: int
    key_scheme: str
    vllm_version: str
    model: str
    model_revision: str | None
    model_files: str  # digest of config/weight file names, sizes and mtimes (local paths)
    weights: str  # "checkpoint", or "dummy" (vLLM's load_format=dummy: random weights)
    hf_config: str  # digest of the effective HF config (overrides, rope scaling included)
    architecture: str
    dtype: str
    kv_cache_dtype: str
    calculate_kv_scales: bool
    quantization: str | None
    tokenizer: str | None
    tokenizer_revision: str | None
    block_size: int
    num_layers: int
    num_kv_heads: int  # per TP rank
    head_size: int
    tp_size: int
    pp_size: int
    dcp_size: int
    kv_layout: KVLayoutSpec | None = None  # None until the workers reported theirs

    def digest(self) -> bytes:
        """16-byte namespace of keys and registry entries."""
        return hashlib.sha256(msgspec.msgpack.encode(self)).digest()[:16]

    def with_layout(self, layout: KVLayoutSpec) -> CompatFingerprint:
        return msgspec.structs.replace(self, kv_layout=layout)

    def differences(self, other: CompatFingerprint) -> list[tuple[str, Any, Any]]:
        """(field, ours, theirs) for every field that differs; layout fields get a prefix."""
        diffs: list[tuple[str, Any, Any]] = []
        for name in self.__struct_fields__:
            mine, theirs = getattr(self, name), getattr(other, name)
            if name == "kv_layout" and mine is not None and theirs is not None:
                for sub in mine.__struct_fields__:
                    a, b = getattr(mine, sub), getattr(theirs, sub)
                    if a != b:
                        diffs.append((f"kv_layout.{sub}", a, b))
            elif mine != theirs:
                diffs.append((name, mine, theirs))
        return diffs

    def describe_differences(self, other: CompatFingerprint) -> str:
        return ", ".join(f"{n} ({a!r} here, {b!r} there)" for n, a, b in self.differences(other))


def sharing_blockers(fp: CompatFingerprint, num_kv_cache_groups: int) -> list[str]:
    """Reasons this configuration cannot share KV at all (empty when it can)."""
    reasons = []
    if num_kv_cache_groups != 1:
        reasons.append(
            f"{num_kv_cache_groups} KV cache groups (hybrid/HMA models are not supported)"
        )
    if fp.calculate_kv_scales:
        reasons.append("calculate_kv_scales=True makes fp8 KV scales differ per instance")
    if fp.pp_size != 1:
        reasons.append(f"pipeline parallel size {fp.pp_size} (only PP=1 is supported)")
    if fp.dcp_size != 1:
        reasons.append(f"decode context parallel size {fp.dcp_size} (only 1 is supported)")
    return reasons


def _model_files_digest(model: str) -> str:
    """Identity of a local model directory's contents; '' for hub names."""
    if not os.path.isdir(model):
        return ""
    h = hashlib.sha256()
    for name in sorted(os.listdir(model)):
        if name.endswith((".json", ".safetensors", ".bin", ".pt", ".model")):
            st = os.stat(os.path.join(model, name))
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:32]


def _normalize_path(name: str | None) -> str | None:
    return os.path.realpath(name) if name and os.path.isdir(name) else name


# Config fields that name or describe a checkpoint without changing any KV byte: the same
# model at "/models/x", "/models/x/" or through a symlink must share.
_HF_CONFIG_IDENTITY_ONLY = ("_name_or_path", "transformers_version", "_commit_hash")


def _hf_config_digest(hf_config: Any) -> str:
    try:
        config = json.loads(hf_config.to_json_string(use_diff=False))
        for key in _HF_CONFIG_IDENTITY_ONLY:
            config.pop(key, None)
        blob = json.dumps(config, sort_keys=True)
    except Exception:  # not a transformers config: fall back to its repr
        blob = repr(hf_config)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _kv_cache_dtype(cache_config: Any) -> str:
    """The KV cache dtype, and the layers it leaves unquantized if any (a suffix, so the
    namespace of configurations without any stays what it was)."""
    skip = getattr(cache_config, "kv_cache_dtype_skip_layers", None)
    dtype = str(cache_config.cache_dtype)
    return f"{dtype} skip {','.join(map(str, skip))}" if skip else dtype


def fingerprint_from_vllm_config(vllm_config: Any) -> CompatFingerprint:
    """The model-level fingerprint of an instance (``kv_layout`` still unset)."""
    import vllm

    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    model = _normalize_path(mc.model)
    return CompatFingerprint(
        page_format=PAGE_FORMAT_VERSION,
        key_scheme=HASH_SCHEME,
        vllm_version=vllm.__version__,
        model=model,
        model_revision=mc.revision,
        model_files=_model_files_digest(mc.model),
        weights="dummy" if str(vllm_config.load_config.load_format) == "dummy" else "checkpoint",
        hf_config=_hf_config_digest(mc.hf_config),
        architecture=str(getattr(mc, "architecture", None) or mc.hf_config.architectures[0]),
        dtype=str(mc.dtype).removeprefix("torch."),
        kv_cache_dtype=_kv_cache_dtype(cc),
        calculate_kv_scales=bool(getattr(cc, "calculate_kv_scales", False)),
        quantization=mc.quantization,
        # Token ids, not text, are keyed, so the tokenizer only has to be named the same way
        # on both sides; it defaults to the model path even with skip_tokenizer_init.
        tokenizer=_normalize_path(mc.tokenizer),
        tokenizer_revision=mc.tokenizer_revision,
        block_size=int(cc.block_size),
        num_layers=int(mc.get_num_layers(pc)),
        num_kv_heads=int(mc.get_num_kv_heads(pc)),
        head_size=int(mc.get_head_size()),
        tp_size=int(pc.tensor_parallel_size),
        pp_size=int(pc.pipeline_parallel_size),
        dcp_size=int(getattr(pc, "decode_context_parallel_size", 1) or 1),
    )
