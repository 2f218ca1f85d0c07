"""Tiny, seeded models and real PEFT adapters for tests (shared by every test module).

The builders save complete model folders (config, safetensors weights, generation config and
a ByT5 tokenizer, which needs no vocab file), so tests load them through the same code paths
as real checkpoints. Weights are initialized with a large spread so that outputs depend on the
input and on the adapter; with the default tiny init every row decodes to the same token.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BartConfig,
    BartForConditionalGeneration,
    ByT5Tokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 259  # ByT5 without extra ids: 3 specials + 256 bytes, so every output token is text
PAD, EOS = 0, 1  # ByT5Tokenizer's ids

# A minimal chat template (ChatML-like, as SmolLM2 uses) for testing the chat path.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _save(model: PreTrainedModel, out: Path, *, chat_template: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    tok = ByT5Tokenizer(extra_ids=0)
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(out)
    return out


def tiny_t5(tmp_path: Path, *, seed: int = 0, name: str = "tiny-t5", width: int = 32) -> Path:
    """A 2+2-layer T5 (d_model `width`) saved under tmp_path/name."""
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=width,
        d_ff=2 * width,
        d_kv=width // 4,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
        initializer_factor=4.0,
    )
    return _save(T5ForConditionalGeneration(cfg), tmp_path / name)


def tiny_bart(tmp_path: Path, *, seed: int = 0, name: str = "tiny-bart") -> Path:
    """A 2+2-layer BART (d_model 64) saved under tmp_path/name."""
    torch.manual_seed(seed)
    cfg = BartConfig(
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=1024,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=PAD,
        decoder_start_token_id=PAD,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        init_std=0.3,
    )
    return _save(BartForConditionalGeneration(cfg), tmp_path / name)


def tiny_llama(
    tmp_path: Path,
    *,
    seed: int = 0,
    name: str = "tiny-llama",
    chat: bool = False,
    width: int = 32,
) -> Path:
    """A 2-layer llama (hidden `width`, GQA 4/2 heads); chat=True saves a chat template too."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
        initializer_range=0.5,
        tie_word_embeddings=False,
    )
    return _save(
        LlamaForCausalLM(cfg), tmp_path / name, chat_template=CHAT_TEMPLATE if chat else None
    )


def tiny_gpt2(tmp_path: Path, *, seed: int = 0, name: str = "tiny-gpt2") -> Path:
    """A 2-layer GPT-2 (n_embd 32): Conv1D layers (weights [in, out]) and learned positions."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=1024,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        initializer_range=0.5,
    )
    return _save(GPT2LMHeadModel(cfg), tmp_path / name)


# every backend family and position scheme the generation tests run on
BUILDERS: dict[str, Callable[..., Path]] = {
    "t5": tiny_t5,
    "bart": tiny_bart,
    "llama": tiny_llama,
    "llama-chat": lambda p: tiny_llama(p, chat=True, name="tiny-llama-chat"),
    "gpt2": tiny_gpt2,
}


def load_tiny(model_dir: Path) -> PreTrainedModel:
    """The saved tiny model, in eval mode (the reference side of tests)."""
    cfg = AutoConfig.from_pretrained(model_dir)
    cls = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    model: PreTrainedModel = cls.from_pretrained(model_dir)
    return model.eval()


def save_lora_adapter(
    model_dir: Path,
    out_dir: Path,
    *,
    r: int = 8,
    seed: int,
    target_modules: list[str] | None = None,
    lora_alpha: float | None = None,
) -> Path:
    """Save a real PEFT LoRA adapter for the model in model_dir, with random A and B.

    init_lora_weights=False makes B non-zero, so the adapter changes the output.
    target_modules=None lets PEFT pick its defaults for the architecture.
    """
    model = load_tiny(model_dir)
    task = "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r,
        lora_alpha=lora_alpha if lora_alpha is not None else r,
        target_modules=target_modules,
        init_lora_weights=False,
        task_type=task,
    )
    peft_model = get_peft_model(model, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir)
    return out_dir
