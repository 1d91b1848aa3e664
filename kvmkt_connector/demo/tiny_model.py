"""A small Llama with seeded normal weights, written at run time (no download).

vLLM's ``load_format="dummy"`` draws near-zero weights, under which the output hardly
depends on the KV cache, so a test that compares imported against recomputed KV could not
fail. These weights are large enough that a wrong page changes the greedy tokens, yet
well-conditioned: q and k are scaled so attention logits have a standard deviation near 2.
(Much sharper attention makes the model chaotic: bf16 rounding differences between two
prefills of the same tokens then change greedy tokens on their own.)
A word-level tokenizer ("w0 w1 ...") makes the model usable from ``vllm serve`` too.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TinyLlamaShape:
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    vocab_size: int = 512
    max_position_embeddings: int = 4096


# A Llama-3-8B-like attention geometry (8 KV heads x 128: 64 KiB pages of 16 bf16 tokens) in
# a model small enough to start fast: for the GPU tests and the GPU demo.
GPU_TEST_SHAPE = TinyLlamaShape(
    hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, vocab_size=8192, max_position_embeddings=32768,
)


def write_tiny_llama(path: str, seed: int = 0, shape: TinyLlamaShape = TinyLlamaShape()) -> str:
    """Write config, safetensors weights and tokenizer into ``path``; return ``path``."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="float32",
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=1, eos_token_id=2, **asdict(shape),
    )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    g = torch.Generator().manual_seed(seed)

    def normal(out_features: int, in_features: int, std_at_128: float) -> torch.Tensor:
        # std scales with 1/sqrt(fan-in) so wider models behave like the 128-wide one
        std = std_at_128 * (128 / in_features) ** 0.5
        return torch.randn(out_features, in_features, generator=g) * std

    s = shape
    q_out, kv_out = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    weights = {
        "model.embed_tokens.weight": torch.randn(s.vocab_size, s.hidden_size, generator=g),
        "model.norm.weight": torch.ones(s.hidden_size),
        "lm_head.weight": normal(s.vocab_size, s.hidden_size, 0.2),
    }
    for i in range(s.num_hidden_layers):
        p = f"model.layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": normal(q_out, s.hidden_size, 0.125),
            p + "self_attn.k_proj.weight": normal(kv_out, s.hidden_size, 0.125),
            p + "self_attn.v_proj.weight": normal(kv_out, s.hidden_size, 0.3),
            p + "self_attn.o_proj.weight": normal(s.hidden_size, q_out, 0.15),
            p + "mlp.gate_proj.weight": normal(s.intermediate_size, s.hidden_size, 0.1),
            p + "mlp.up_proj.weight": normal(s.intermediate_size, s.hidden_size, 0.1),
            p + "mlp.down_proj.weight": normal(s.hidden_size, s.intermediate_size, 0.1 * 2**0.5),
            p + "input_layernorm.weight": torch.ones(s.hidden_size),
            p + "post_attention_layernorm.weight": torch.ones(s.hidden_size),
        })
    save_file(weights, os.path.join(path, "model.safetensors"))
    write_word_tokenizer(path, s.vocab_size)
    return path


_WORD_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def word(token_id: int) -> str:
    """The word of ``token_id`` in the word-level tokenizer: its id in base 62, at most 3
    characters for a 128k vocabulary. Short on purpose: vLLM's server refuses a prompt of
    more characters than 7 a token allows (a 16k-token prompt of "w123456" words is
    refused at max_model_len 16,640)."""
    digits = []
    while True:
        token_id, d = divmod(token_id, 62)
        digits.append(_WORD_ALPHABET[d])
        if token_id == 0:
            return "".join(reversed(digits))


def write_word_tokenizer(path: str, vocab_size: int, max_len: int = 4096) -> None:
    """A WordLevel tokenizer: ids 0-2 special, ``word(i)`` is token ``i``; decode joins
    words with spaces, so decode -> encode is the identity on any id sequence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({word(i): i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
             "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": max_len},
            f,
        )


def words(token_ids: list[int]) -> str:
    """The text that the word tokenizer turns back into ``token_ids``."""
    return " ".join(word(t) for t in token_ids)


def write_llama3_8b_config(path: str, num_layers: int = 32) -> str:
    """A Llama-3-8B-shaped model directory with no weights, for ``load_format="dummy"``:
    right for timing (TTFT, KV bytes), useless for judging outputs."""
    os.makedirs(path, exist_ok=True)
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
        intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_hidden_layers=num_layers, vocab_size=128256, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, torch_dtype="bfloat16", bos_token_id=128000,
        eos_token_id=128001, tie_word_embeddings=False,
    )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return path
