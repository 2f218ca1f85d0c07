"""Tiny, seeded models and real PEFT adapters for tests (shared by every test module).

Two kinds, each architecture's config built by one function (t5_config, bart_config,
llama_config) whose arguments say what differs:

- saved models (tiny_t5, tiny_bart, tiny_llama, tiny_gpt2): complete model folders (config,
  safetensors weights, generation config and a ByT5 tokenizer, which needs no vocab file), so
  tests load them through the same code paths as real checkpoints;
- in-memory RAG models (rag_config, rag_bart_config, rag_llama) for the tensor-level tests
  against transformers' RAG models and brute force: 48 ids with BART's special ids, no tokenizer.

Weights are initialized with a large spread so that outputs depend on the input and on the
adapter; with the default tiny init every row decodes to the same token.
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
    DPRConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    RagConfig,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 259  # ByT5 without extra ids: 3 specials + 256 bytes, so every output token is text
PAD, EOS = 0, 1  # ByT5Tokenizer's ids

# The in-memory RAG models' ids, which the tests feed them directly (no tokenizer).
RAG_VOCAB, RAG_BOS, RAG_PAD, RAG_EOS = 48, 0, 1, 2  # BART's special ids

# A minimal chat template (ChatML-like, as SmolLM2 uses) for testing the chat path.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def t5_config(
    *, vocab: int = VOCAB, pad: int = PAD, eos: int = EOS, width: int = 32, init_factor: float = 4.0
) -> T5Config:
    """A 2+2-layer T5 (d_model `width`, 4 heads) that starts decoding at pad, as T5 does."""
    return T5Config(
        vocab_size=vocab,
        d_model=width,
        d_ff=2 * width,
        d_kv=width // 4,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=pad,
        eos_token_id=eos,
        decoder_start_token_id=pad,
        initializer_factor=init_factor,
    )


def bart_config(
    *,
    vocab: int = VOCAB,
    pad: int = PAD,
    bos: int = PAD,
    eos: int = EOS,
    decoder_start: int = PAD,
    width: int = 64,
    positions: int = 1024,
    dropout: float = 0.1,
) -> BartConfig:
    """A 2+2-layer BART (d_model `width`, 4 heads) that forces no token at either end."""
    return BartConfig(
        vocab_size=vocab,
        d_model=width,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=2 * width,
        decoder_ffn_dim=2 * width,
        max_position_embeddings=positions,
        pad_token_id=pad,
        eos_token_id=eos,
        bos_token_id=bos,
        decoder_start_token_id=decoder_start,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        dropout=dropout,  # BART's default; training runs with it
        init_std=0.3,  # large enough that the input (the passage) changes the answer
    )


def llama_config(
    *,
    vocab: int = VOCAB,
    pad: int = PAD,
    bos: int | None = None,
    eos: int = EOS,
    width: int = 32,
    positions: int = 2048,
    init_range: float = 0.5,
) -> LlamaConfig:
    """A 2-layer llama (hidden `width`, GQA 4/2 heads), its embeddings not tied."""
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        pad_token_id=pad,
        eos_token_id=eos,
        bos_token_id=bos,
        initializer_range=init_range,
        tie_word_embeddings=False,
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
    return _save(T5ForConditionalGeneration(t5_config(width=width)), tmp_path / name)


def tiny_bart(
    tmp_path: Path, *, seed: int = 0, name: str = "tiny-bart", dropout: float = 0.1
) -> Path:
    """A 2+2-layer BART (d_model 64) saved under tmp_path/name."""
    torch.manual_seed(seed)
    return _save(BartForConditionalGeneration(bart_config(dropout=dropout)), tmp_path / name)


def tiny_llama(
    tmp_path: Path,
    *,
    seed: int = 0,
    name: str = "tiny-llama",
    chat: bool = False,
    width: int = 32,
    init_range: float = 0.5,
) -> Path:
    """A 2-layer llama (hidden `width`, GQA 4/2 heads); chat=True saves a chat template too."""
    torch.manual_seed(seed)
    cfg = llama_config(width=width, init_range=init_range)
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


def rag_bart_config() -> BartConfig:
    """tiny_bart's BART at d_model 32 with 64 positions, on the RAG ids; it starts decoding at
    EOS, as BART does."""
    return bart_config(
        vocab=RAG_VOCAB,
        pad=RAG_PAD,
        bos=RAG_BOS,
        eos=RAG_EOS,
        decoder_start=RAG_EOS,
        width=32,
        positions=64,
    )


def rag_config(arch: str, n_docs: int) -> RagConfig:
    """transformers' RAG around a BART ("bart") or T5 generator on the RAG ids, with a 1-layer
    DPR question encoder (built, never run: the tests pass the doc scores themselves)."""
    if arch == "bart":
        gen = rag_bart_config()
    else:
        # 6.0, not tiny_t5's 4.0: the spread the RAG oracle tests were written on, kept so that
        # they check the same numbers (they pass on 4.0 too)
        gen = t5_config(vocab=RAG_VOCAB, pad=RAG_PAD, eos=RAG_EOS, init_factor=6.0)
        gen.bos_token_id = None  # transformers' RAG-Sequence get_nll reads it; T5 has none
    question = DPRConfig(
        vocab_size=RAG_VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    return RagConfig.from_question_encoder_generator_configs(question, gen, n_docs=n_docs)


def favour_eos(bart: PreTrainedModel) -> None:
    """Raise a RAG BART's EOS logit, so that answers end at different lengths."""
    with torch.no_grad():
        bart.final_logits_bias[0, RAG_EOS] = 2.5


def rag_llama(*, seed: int = 0, eos_scale: float = 1.0) -> LlamaForCausalLM:
    """tiny_llama's llama on the RAG ids (64 positions, initializer range 0.3, large enough that
    the passage changes the answer); eos_scale > 1 makes EOS likelier by scaling its output row."""
    torch.manual_seed(seed)
    cfg = llama_config(
        vocab=RAG_VOCAB, pad=RAG_PAD, bos=RAG_BOS, eos=RAG_EOS, positions=64, init_range=0.3
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight[RAG_EOS] *= eos_scale
    return model


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
    layers: list[int] | None = None,
) -> Path:
    """Save a real PEFT LoRA adapter for the model in model_dir, with random A and B.

    init_lora_weights=False makes B non-zero, so the adapter changes the output.
    target_modules=None lets PEFT pick its defaults for the architecture; layers=None puts
    it in every layer (else PEFT's layers_to_transform).
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
        layers_to_transform=layers,
    )
    peft_model = get_peft_model(model, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir)
    return out_dir
