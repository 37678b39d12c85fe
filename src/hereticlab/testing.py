"""Tiny random models for tests, CI notebooks and quick experiments, built offline from configs.

``load_model("tiny:llama")`` (or ``tiny_model("llama")``) returns a few-layer random model with a byte-level
tokenizer and a chat template, so every code path runs in seconds without downloading anything.
"""

from __future__ import annotations

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + 3 specials) with a ChatML template, built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|pad|>", eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def _common(vocab: int) -> dict:
    # Special ids inside the tiny vocabulary: 256 = pad, 257 = <|im_end|> (eos), 258 = <|im_start|>.
    return dict(vocab_size=vocab, pad_token_id=256, bos_token_id=258, eos_token_id=257, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def tiny_config(family: str, vocab: int):
    """A small config of ``family``; see ``TINY_FAMILIES``."""
    import transformers as tf

    c = _common(vocab)
    if family == "llama":
        return tf.LlamaConfig(**c, tie_word_embeddings=False)
    if family == "qwen2":
        return tf.Qwen2Config(**c)
    if family == "qwen3":
        return tf.Qwen3Config(**c, head_dim=16)
    if family == "mistral":
        return tf.MistralConfig(**c)
    if family == "gemma2":
        return tf.Gemma2Config(**c, head_dim=16, query_pre_attn_scalar=16, sliding_window=16)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**c, head_dim=16, query_pre_attn_scalar=16, sliding_window=16)
    if family == "phi3":
        return tf.Phi3Config(**c)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=4, n_head=4, n_positions=512,
                             bos_token_id=258, eos_token_id=257, pad_token_id=256,
                             tie_word_embeddings=False)
    raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(TINY_FAMILIES)}")


TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt2")


def tiny_model(family: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: a random ``family`` model small enough for unit tests."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = tiny_config(family, len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.hereticlab_source = f"tiny:{family}"
    return model, tokenizer
