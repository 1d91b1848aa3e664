"""A small Llama with seeded normal weights, written at run time (no download).

vLLM's ``load_format="dummy"`` draws near-zero weights, under which the output hardly
depends on the KV cache, so a test that compares imported against recomputed KV could not
fail. These weights are large enough that a wrong page changes the greedy tokens.
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

    def normal(*size: int, std: float) -> torch.Tensor:
        return torch.randn(*size, generator=g) * std

    s = shape
    q_out, kv_out = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    weights = {
        "model.embed_tokens.weight": normal(s.vocab_size, s.hidden_size, std=1.0),
        "model.norm.weight": torch.ones(s.hidden_size),
        "lm_head.weight": normal(s.vocab_size, s.hidden_size, std=0.2),
    }
    for i in range(s.num_hidden_layers):
        p = f"model.layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": normal(q_out, s.hidden_size, std=0.3),
            p + "self_attn.k_proj.weight": normal(kv_out, s.hidden_size, std=0.3),
            p + "self_attn.v_proj.weight": normal(kv_out, s.hidden_size, std=0.3),
            p + "self_attn.o_proj.weight": normal(s.hidden_size, q_out, std=0.15),
            p + "mlp.gate_proj.weight": normal(s.intermediate_size, s.hidden_size, std=0.1),
            p + "mlp.up_proj.weight": normal(s.intermediate_size, s.hidden_size, std=0.1),
            p + "mlp.down_proj.weight": normal(s.hidden_size, s.intermediate_size, std=0.1),
            p + "input_layernorm.weight": torch.ones(s.hidden_size),
            p + "post_attention_layernorm.weight": torch.ones(s.hidden_size),
        })
    save_file(weights, os.path.join(path, "model.safetensors"))
    _write_word_tokenizer(path, s.vocab_size)
    return path


def _write_word_tokenizer(path: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
             "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 4096},
            f,
        )


def words(token_ids: list[int]) -> str:
    """The text that the tiny tokenizer turns back into ``token_ids``."""
    return " ".join(f"w{t}" for t in token_ids)
