"""The generator to train: the full-precision base (LoRA) or a 4-bit NF4 base (QLoRA), wrapped
with a fresh LoRA adapter.

QLoRA (Dettmers et al. 2023) keeps the frozen base in 4-bit NormalFloat with double-quantized
scales and trains LoRA A/B in full precision on top. The adapter's weights do not depend on how
the base was stored, so the saved folder serves on the full-precision base like any other (with
the small mismatch of having been fit to the quantized weights; RESULTS.md measures it).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from app.contracts import GeneratorKind
from app.errors import InvalidInputError
from app.generation.generator import Generator
from app.generation.loading import (
    DEFAULT_MODEL_ID,
    DEFAULT_SPEC,
    load_generator,
    prepare_default_generator,
)
from app.lora.validate import TASK_TYPES
from app.model_loads import MODEL_LOADS
from app.training.options import TrainOptions

log = logging.getLogger(__name__)

ADAPTER = "default"  # PEFT's name for the one adapter being trained
_ATTENTION_HINTS = ("attn", "attention")  # module path parts of attention blocks in HF models


def resolve_base(spec: str, cache_dir: Path) -> tuple[str, str]:
    """(what from_pretrained reads, the model id to record) for a generator spec."""
    if spec == DEFAULT_SPEC:
        return str(prepare_default_generator(cache_dir)), DEFAULT_MODEL_ID
    return spec, str(Path(spec).resolve()) if Path(spec).exists() else spec


def base_fingerprint(source: str) -> str | None:
    """sha256 (first 16 hex) of a local model folder's config and weight files; None for hub ids."""
    folder = Path(source)
    files = [*sorted(folder.glob("*.safetensors")), folder / "config.json"]
    if not folder.is_dir() or not all(f.is_file() for f in files):
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def load_base(opts: TrainOptions, cache_dir: Path) -> Generator:
    """The base generator, full precision, or NF4 4-bit with double quantization for --qlora."""
    if not opts.qlora:
        return load_generator(opts.base, cache_dir=cache_dir)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    source, model_id = resolve_base(opts.base, cache_dir)
    config = AutoConfig.from_pretrained(source)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    with MODEL_LOADS:
        model = cls.from_pretrained(source, quantization_config=quant, device_map={"": "cpu"})
    # casts norms/embeddings to fp32 and lets gradients reach the first LoRA layer's input;
    # checkpointing off: on a CPU, memory is not what limits a 135M model, compute is
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return Generator(model, tokenizer, model_id=model_id, device=torch.device("cpu"))


def target_modules(model: torch.nn.Module, spec: str) -> list[str]:
    """Leaf names of the linear layers to adapt: "attention", "all-linear" or "a,b,c"."""
    linears = {
        name: name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)  # bitsandbytes' Linear4bit is one too
    }
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    heads = {n for n, m in model.named_modules() if m is output}
    if spec == "attention":
        chosen = {
            leaf
            for name, leaf in linears.items()
            if any(h in part.lower() for part in name.split(".")[:-1] for h in _ATTENTION_HINTS)
        }
    elif spec == "all-linear":
        chosen = {leaf for name, leaf in linears.items() if name not in heads}
    else:
        chosen = {t.strip() for t in spec.split(",") if t.strip()}
        missing = sorted(t for t in chosen if t not in linears.values())
        if missing:
            raise InvalidInputError(
                f"target module(s) {missing} are not linear layers of the base model; "
                f"it has {sorted(set(linears.values()))}"
            )
    if not chosen:
        raise InvalidInputError(f"target_modules {spec!r} selects no linear layer of the base")
    return sorted(chosen)


def _num_blocks(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("num_hidden_layers", "num_layers", "decoder_layers", "n_layer"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise InvalidInputError("cannot tell how many layers the base has; drop --last-layers")


def add_lora(generator: Generator, opts: TrainOptions, *, kind: GeneratorKind) -> None:
    """Wrap generator.model in a PeftModel holding one fresh, trainable LoRA adapter."""
    model = generator.model
    layers = None
    if opts.last_layers is not None:
        n = _num_blocks(model)
        layers = list(range(max(0, n - opts.last_layers), n))
    torch.manual_seed(opts.seed)  # LoRA A's init
    config = LoraConfig(
        r=opts.rank,
        lora_alpha=opts.alpha,  # type: ignore[arg-type]  # PEFT says int; floats work
        lora_dropout=opts.dropout,
        target_modules=target_modules(model, opts.target_modules),
        layers_to_transform=layers,
        bias="none",
        task_type=TASK_TYPES[kind],
    )
    peft_model = get_peft_model(model, config, adapter_name=ADAPTER)
    assert isinstance(peft_model, PeftModel)
    peft_model.peft_config[ADAPTER].base_model_name_or_path = generator.model_id
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info(
        "LoRA r=%d on %s: %d trainable of %d", opts.rank, config.target_modules, trainable, total
    )
    generator.model = peft_model
