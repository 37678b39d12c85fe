"""Tiny random models for tests, CI notebooks and quick experiments, built offline from configs.

``load_model("tiny:llama")`` (or ``tiny_model("llama")``) returns a few-layer random model with a byte-level
tokenizer and a chat template, so every code path runs in seconds without downloading anything.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer() -> PreTrainedTokenizerBase:
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


def _common(vocab: int) -> dict[str, Any]:
    # Special ids inside the tiny vocabulary: 256 = pad, 257 = <|im_end|> (eos), 258 = <|im_start|>.
    return dict(
        vocab_size=vocab,
        pad_token_id=256,
        bos_token_id=258,
        eos_token_id=257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )


def tiny_config(family: str, vocab: int) -> PretrainedConfig:
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
        return tf.GPT2Config(
            vocab_size=vocab,
            n_embd=64,
            n_layer=4,
            n_head=4,
            n_positions=512,
            bos_token_id=258,
            eos_token_id=257,
            pad_token_id=256,
            tie_word_embeddings=False,
        )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**{k: v for k, v in c.items() if k != "num_key_value_heads"}, tie_word_embeddings=False)
    return _arch_config(family, vocab)


def _small(vocab: int) -> dict[str, Any]:
    """Smaller still (d = 32, 2 blocks) for the architecture-coverage families."""
    return dict(_common(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2)


def _arch_config(family: str, vocab: int) -> PretrainedConfig:
    import transformers as tf

    c = _small(vocab)
    if family == "mixtral":
        return tf.MixtralConfig(**c, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2_moe":  # moe_intermediate_size == d: the fused (E, d, d) tensor is square on purpose
        return tf.Qwen2MoeConfig(
            **c,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        )
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(  # type: ignore[call-arg]  # head_dim: accepted as an extra config attribute
            **c, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48
        )
    if family == "gpt_oss":  # fused experts stored transposed (E, inter, d) with per-expert biases
        return tf.GptOssConfig(
            **dict(c, intermediate_size=48),
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=16,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    if family == "mamba":
        return tf.MambaConfig(
            vocab_size=vocab,
            hidden_size=32,
            state_size=8,
            num_hidden_layers=2,
            expand=2,
            conv_kernel=4,
            pad_token_id=256,
            bos_token_id=258,
            eos_token_id=257,
        )
    if family == "mamba2":
        return tf.Mamba2Config(
            vocab_size=vocab,
            hidden_size=32,
            state_size=8,
            num_hidden_layers=2,
            expand=2,
            head_dim=8,
            num_heads=8,
            n_groups=1,
            conv_kernel=4,
            chunk_size=16,
            pad_token_id=256,
            bos_token_id=258,
            eos_token_id=257,
        )
    if family == "jamba":  # blocks: 0 Mamba+MoE, 1 attention+MLP, 2 Mamba+MLP, 3 attention+MoE
        return tf.JambaConfig(
            **dict(c, num_hidden_layers=4),
            num_experts=4,
            num_experts_per_tok=2,
            expert_layer_period=3,
            expert_layer_offset=0,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=4,
        )
    if family == "falcon_h1":  # non-unit muP output multipliers, so verify_writers sees "scaled" writers
        return tf.FalconH1Config(  # type: ignore[call-arg]  # head_dim: as for qwen3_moe
            **c,
            head_dim=8,
            mamba_d_ssm=64,
            mamba_n_heads=8,
            mamba_d_head=8,
            mamba_n_groups=1,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_chunk_size=16,
            attention_out_multiplier=0.5,
            ssm_out_multiplier=0.75,
            mlp_multipliers=[1.0, 0.8],
        )
    if family in ("llava", "gemma3_vlm"):
        text = dict(c, vocab_size=vocab + 4)
        special: dict[str, Any] = dict(pad_token_id=256, bos_token_id=258, eos_token_id=257)
        if family == "llava":
            vision = tf.CLIPVisionConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=8,
                patch_size=4,
            )
            return tf.LlavaConfig(
                # image_token_id: the config's attribute_map alias of image_token_index
                vision_config=vision,
                text_config=tf.LlamaConfig(**text),
                image_token_id=vocab,  # type: ignore[call-arg]
                **special,
            )
        siglip = tf.SiglipVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
        )
        text_config = tf.Gemma3TextConfig(**text, head_dim=16, query_pre_attn_scalar=16, sliding_window=16)
        return tf.Gemma3Config(
            text_config=text_config,
            vision_config=siglip,
            mm_tokens_per_image=4,
            image_token_index=vocab,
            boi_token_index=vocab + 1,
            eoi_token_index=vocab + 2,
            **special,
        )
    raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(ALL_FAMILIES)}")


# Dense decoder-only families: every block has exactly one attention and one MLP writer (d = 64, 4 blocks).
TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox")
# Architecture coverage (d = 32, 2–4 blocks): MoE with fused experts, SSMs and hybrids, vision-language stacks.
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")
SSM_FAMILIES = ("mamba", "mamba2", "jamba", "falcon_h1")
VLM_FAMILIES = ("llava", "gemma3_vlm")
ALL_FAMILIES = TINY_FAMILIES + MOE_FAMILIES + SSM_FAMILIES + VLM_FAMILIES


def randomize_norms(model: nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    """Add ``scale · N(0, 1)`` noise to every norm's weight in place.

    Random inits leave norm gains at exactly 1 (Gemma: ``1 + 0``), which hides effects that real checkpoints show,
    such as a sandwich norm rotating a write that was orthogonal to a direction.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if "norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.ndim == 1:
                weight.add_(scale * torch.randn(weight.shape, generator=gen).to(weight.dtype))


def tiny_model(
    family: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, random_norms: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)``: a random ``family`` model small enough for unit tests (see ``ALL_FAMILIES``).

    ``random_norms``: perturb norm gains away from 1 (``randomize_norms``), closer to trained checkpoints.
    Vision-language families return the full conditional-generation model (text-only inputs work).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    tokenizer = tiny_tokenizer()
    config = tiny_config(family, len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if family in VLM_FAMILIES else AutoModelForCausalLM
    model = auto.from_config(config, dtype=dtype)
    if random_norms:
        randomize_norms(model, seed=seed)
    model.eval().requires_grad_(False)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.hereticlab_source = f"tiny:{family}"
    return model, tokenizer
