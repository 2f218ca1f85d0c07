"""Read a PEFT LoRA adapter folder and check it against the base model before touching it.

Only `adapter_config.json` + `adapter_model.safetensors` are read. A pickle (`adapter_model.bin`)
is never opened: unpickling runs code from the file. Every check that can fail runs here, on
plain tensors, so that installing into the live model only fails for reasons outside the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from transformers.pytorch_utils import Conv1D

from app.contracts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, GeneratorKind
from app.errors import AdapterInvalid, UnsafePath

log = logging.getLogger(__name__)

CONFIG_NAME = ADAPTER_CONFIG
WEIGHTS_NAME = ADAPTER_WEIGHTS
PICKLE_NAME = "adapter_model.bin"
MAX_CONFIG_BYTES = 1 << 20
TASK_TYPES = {"seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM"}
# Options that add weights other than LoRA's A/B pairs, or that PEFT's per-row adapter_names
# cannot serve (DoRA); refused with the option's name rather than half supported.
UNSUPPORTED = ("use_dora", "modules_to_save", "trainable_token_indices", "target_parameters",
               "layer_replication", "lora_bias", "use_qalora", "use_bdlora",
               "alora_invocation_tokens", "arrow_config")  # fmt: skip
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


@dataclass(frozen=True)
class LinearShape:
    in_features: int
    out_features: int


@dataclass(frozen=True)
class BaseLayout:
    """What validation needs to know of the base model, captured once before any wrapping."""

    kind: GeneratorKind
    model_id: str
    modules: dict[str, str]  # every module name -> its class name
    linears: dict[str, LinearShape]  # the layers LoRA can target

    @classmethod
    def of(cls, model: torch.nn.Module, kind: GeneratorKind, model_id: str) -> BaseLayout:
        modules, linears = {}, {}
        for name, module in model.named_modules():
            if not name:
                continue
            modules[name] = type(module).__name__
            if isinstance(module, torch.nn.Linear):
                linears[name] = LinearShape(module.in_features, module.out_features)
            elif isinstance(module, Conv1D):  # GPT-2 style: weight is [in, out]
                linears[name] = LinearShape(module.weight.shape[0], module.nf)
        return cls(kind, model_id, modules, linears)


@dataclass(frozen=True)
class ValidatedAdapter:
    path: Path  # the resolved folder
    rel: str  # the path as the client gave it, relative to the adapters root
    config: LoraConfig
    state_dict: dict[str, torch.Tensor]  # PEFT's saved keys: base_model.model.<m>.lora_A.weight
    bytes: int
    version: str  # content_version(config, weights): 12 hex digits


def validate_adapter(folder: Path, root: Path, base: BaseLayout, *, rel: str) -> ValidatedAdapter:
    """Parse and check the adapter in folder (already resolved under root); rel names it in
    messages. Raises AdapterInvalid naming the file, option, layer or tensor at fault."""
    if not folder.is_dir():
        raise AdapterInvalid(f"adapter path {rel!r} is not a folder")
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not weights_file.is_file():
        if (folder / PICKLE_NAME).exists():
            raise AdapterInvalid(
                f"adapter {rel!r} has only {PICKLE_NAME} (a pickle, never loaded here): "
                f"safetensors is required; save it with safe_serialization=True as {WEIGHTS_NAME}"
            )
        raise AdapterInvalid(f"adapter {rel!r} has no {WEIGHTS_NAME}")
    if not config_file.is_file():
        raise AdapterInvalid(f"adapter {rel!r} has no {CONFIG_NAME}")
    for f in (config_file, weights_file):
        if root.resolve() not in f.resolve().parents:
            raise UnsafePath(f"{f.name} in adapter {rel!r} links outside the adapters root")

    config = _read_config(config_file, rel)  # refuses an oversized file before it is read
    config_bytes = config_file.read_bytes()
    _check_config(config, base, rel)
    targeted = _targeted_layers(config, base, rel)
    data = weights_file.read_bytes()
    version = content_version(config_bytes, data)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise AdapterInvalid(
            f"{WEIGHTS_NAME} in adapter {rel!r} is corrupt or truncated: {e}"
        ) from e
    _check_tensors(tensors, config, targeted, base, rel)
    named = config.base_model_name_or_path
    if named and Path(named).name != Path(base.model_id).name:
        # Informational only: the same base goes by a hub id, a local path or a converted
        # cache folder, so names differ across machines; the shape checks above are the guard.
        log.info("adapter %r names base %r; serving on %r", rel, named, base.model_id)
    return ValidatedAdapter(folder, rel, config, tensors, len(data), version)


def content_version(config: bytes, weights: bytes) -> str:
    """An adapter's version: the sha256 of its adapter_config.json and its safetensors (first 12
    hex digits). Both change what it computes (lora_alpha scales the same weights), so a folder
    rewritten in place, or another replica's out-of-date copy, never passes for the same version."""
    digest = hashlib.sha256()
    for part in (config, weights):
        digest.update(len(part).to_bytes(8, "big"))  # length-prefixed: no two splits collide
        digest.update(part)
    return digest.hexdigest()[:12]


def _read_config(path: Path, rel: str) -> LoraConfig:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterInvalid(f"{CONFIG_NAME} in adapter {rel!r} is over {MAX_CONFIG_BYTES} bytes")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterInvalid(f"{CONFIG_NAME} in adapter {rel!r} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise AdapterInvalid(f"{CONFIG_NAME} in adapter {rel!r} is not a JSON object")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise AdapterInvalid(
            f"adapter {rel!r} has peft_type {peft_type!r}; only LORA adapters are supported"
        )
    raw.pop("peft_version", None)  # informational; not a LoraConfig field in every version
    try:
        config = LoraConfig.from_peft_type(**raw)
    except (TypeError, ValueError) as e:
        raise AdapterInvalid(
            f"{CONFIG_NAME} in adapter {rel!r} is not a valid LoRA config: {e}"
        ) from e
    assert isinstance(config, LoraConfig)
    # The saved A/B replace whatever PEFT initializes, so initialize the cheap way: data-driven
    # schemes (PiSSA, OLoRA, LoftQ, EVA, ...) would rewrite base weights or need data.
    config.init_lora_weights = True
    config.inference_mode = True
    return config


def _check_config(config: LoraConfig, base: BaseLayout, rel: str) -> None:
    pattern = config.rank_pattern or {}
    ranks = {"r": config.r, **{f"rank_pattern[{k!r}]": v for k, v in pattern.items()}}
    for what, r in ranks.items():
        if not isinstance(r, int) or r <= 0:
            raise AdapterInvalid(f"adapter {rel!r} has {what}={r!r}; it must be a positive int")
    task = getattr(config.task_type, "value", config.task_type)  # an enum or a str
    if task is not None and task != TASK_TYPES[base.kind]:
        raise AdapterInvalid(
            f"adapter {rel!r} has task_type {task!r}; the {base.kind} base model "
            f"{base.model_id!r} needs {TASK_TYPES[base.kind]!r}"
        )
    for option in UNSUPPORTED:
        if getattr(config, option, None):
            raise AdapterInvalid(f"adapter {rel!r} sets {option}, which lorag does not support")
    if config.bias != "none":
        raise AdapterInvalid(f"adapter {rel!r} has bias={config.bias!r}; only 'none' is supported")
    if not config.target_modules:
        raise AdapterInvalid(f"adapter {rel!r} names no target_modules")


def _targeted_layers(config: LoraConfig, base: BaseLayout, rel: str) -> set[str]:
    """The base layers the config selects; every listed target must select at least one."""
    targeted = {name for name in base.modules if check_target_module_exists(config, name)}
    wanted = config.target_modules or []
    if isinstance(wanted, str):
        if not targeted:
            raise AdapterInvalid(
                f"target_modules pattern {wanted!r} of adapter {rel!r} matches no layer "
                f"of base model {base.model_id!r}"
            )
    else:
        missing = sorted(t for t in wanted if not any(_selects(t, name) for name in targeted))
        if missing:
            raise AdapterInvalid(
                f"target module(s) {missing} of adapter {rel!r} are not in base model "
                f"{base.model_id!r}"
            )
    for name in sorted(targeted):
        if name not in base.linears:
            raise AdapterInvalid(
                f"adapter {rel!r} targets layer {name!r}, a {base.modules[name]}; "
                "only linear layers are supported"
            )
    return targeted


def _selects(target: str, name: str) -> bool:
    return name == target or name.endswith(f".{target}")


def _check_tensors(
    tensors: Mapping[str, torch.Tensor],
    config: LoraConfig,
    targeted: Iterable[str],
    base: BaseLayout,
    rel: str,
) -> None:
    seen: dict[str, set[str]] = {}
    targeted = set(targeted)
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterInvalid(f"adapter {rel!r} holds tensor {key!r}, which is not a LoRA A/B")
        module, ab = m["module"], m["ab"]
        if module not in targeted:
            where = "is not selected by target_modules" if module in base.modules else "is absent"
            raise AdapterInvalid(
                f"tensor {key!r} of adapter {rel!r} is for layer {module!r}, which {where} "
                f"in base model {base.model_id!r}"
            )
        shape = base.linears[module]
        r = _rank(config, module)
        want = (r, shape.in_features) if ab == "A" else (shape.out_features, r)
        if tuple(tensor.shape) != want:
            raise AdapterInvalid(
                f"tensor {key!r} of adapter {rel!r} has shape {tuple(tensor.shape)}; layer "
                f"{module!r} (in_features={shape.in_features}, out_features="
                f"{shape.out_features}) with r={r} needs {want}"
            )
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise AdapterInvalid(f"tensor {key!r} of adapter {rel!r} is not finite floating point")
        seen.setdefault(module, set()).add(ab)
    for module in sorted(targeted):
        lacking = {"A", "B"} - seen.get(module, set())
        if lacking:
            raise AdapterInvalid(
                f"adapter {rel!r} lacks lora_{'/'.join(sorted(lacking))} for layer {module!r}"
            )


def _rank(config: LoraConfig, module: str) -> int:
    if not config.rank_pattern:
        return int(config.r)
    key = get_pattern_key(list(config.rank_pattern), module)
    return int(config.rank_pattern.get(key, config.r))


def describe(config: LoraConfig) -> dict[str, Any]:
    """The config fields AdapterInfo reports."""
    targets = config.target_modules
    return {
        "rank": int(config.r),
        "alpha": float(config.lora_alpha),
        "target_modules": [targets] if isinstance(targets, str) else sorted(targets or []),
        "base_model": config.base_model_name_or_path,
    }
