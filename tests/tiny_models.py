"""Tiny causal LMs built from configs (no downloads): Llama, Qwen2 and GPT-2 shapes."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128


# Llama and Qwen2 share one tiny decoder shape (GQA: 4 query heads, 2 key/value heads).
_DECODER_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
_GPT2_SHAPE = dict(
    vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1
)


def _build(model_class, config_class, seed: int, settings: dict) -> PreTrainedModel:
    torch.manual_seed(seed)
    return model_class(config_class(**settings)).eval()


def tiny_llama(seed: int = 0, **overrides) -> PreTrainedModel:
    return _build(LlamaForCausalLM, LlamaConfig, seed, {**_DECODER_SHAPE, "tie_word_embeddings": False, **overrides})


def tiny_qwen2(seed: int = 0, **overrides) -> PreTrainedModel:
    return _build(Qwen2ForCausalLM, Qwen2Config, seed, {**_DECODER_SHAPE, "tie_word_embeddings": True, **overrides})


def tiny_gpt2(seed: int = 0, **overrides) -> PreTrainedModel:
    return _build(GPT2LMHeadModel, GPT2Config, seed, {**_GPT2_SHAPE, **overrides})


BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}

# Attention and MLP projections of each architecture (GPT-2 uses transformers' Conv1D).
LINEAR_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
EMBED_TARGETS = {"llama": ["embed_tokens", "lm_head"], "qwen2": ["embed_tokens"], "gpt2": ["wte"]}
# Norms: RMSNorm in Llama and Qwen2, torch's LayerNorm (with a bias) in GPT-2.
NORM_TARGETS = {"llama": ["input_layernorm", "norm"], "qwen2": ["input_layernorm", "norm"], "gpt2": ["ln_1", "ln_f"]}


def token_batch(batch: int = 3, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


def tiny_tokenizer():
    """A character-level fast tokenizer (100 tokens, fits VOCAB), built offline with `tokenizers`."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {
        token: i
        for i, token in enumerate(specials + list(string.ascii_letters + string.digits + string.punctuation + " \n"))
    }
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
