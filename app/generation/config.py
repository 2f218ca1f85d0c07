"""The generation side's configs: which generator to load, and how RAG answers are decoded.

Plain frozen dataclasses with no torch import, so app/settings.py can build them cheaply; each
`__post_init__` refuses a bad value and names the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

DType = Literal["float32", "bfloat16", "float16"]
DTYPE_NAMES: tuple[DType, ...] = get_args(DType)
# how a concat prompt lays out its passages: score, in retrieval order (best first); stable, by
# document then ordinal, so prompts over overlapping passage sets share longer prefixes
ConcatOrder = Literal["score", "stable"]
# what prefill calls compute their matmuls in: the model's dtype, or bfloat16 under autocast
# while the keys, values and decoding steps stay in the model's (app/generation/step_batch.py)
PrefillDType = Literal["model", "bfloat16"]
PREFILL_DTYPES: tuple[PrefillDType, ...] = get_args(PrefillDType)
CONCAT_ORDERS: tuple[ConcatOrder, ...] = get_args(ConcatOrder)


@dataclass(frozen=True)
class GeneratorSpec:
    """What app.generation.loading.load_generator loads: "default", a hub id or a path."""

    spec: str
    cache_dir: Path  # the converted default generator lives here
    device: str = "cpu"
    dtype: DType = "float32"

    def __post_init__(self) -> None:
        if not self.spec:
            raise ValueError("generator spec is empty: name a hub id, a path or 'default'")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {list(DTYPE_NAMES)}")


@dataclass(frozen=True)
class DecodingConfig:
    """The RAG modes' decoding, shared by the whole-batch decoder and the step batch, so the
    two cannot disagree: beams for RAG-Token and RAG-Sequence, and prior pruning."""

    num_beams: int = 1  # 1: greedy
    min_prior: float | None = None  # drop passages whose prior p(z|x) is below this
    # prompt-prefix KV (decoder-only) or identical inputs' encoder outputs (encoder-decoder)
    # kept for reuse; 0: off
    prefix_cache_bytes: int = 0
    prefill_dtype: PrefillDType = "model"

    def __post_init__(self) -> None:
        if self.prefill_dtype not in PREFILL_DTYPES:
            raise ValueError(
                f"prefill_dtype {self.prefill_dtype!r} is not one of {list(PREFILL_DTYPES)}"
            )
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int):
            raise ValueError(f"num_beams must be an integer, got {self.num_beams!r}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0, got {self.prefix_cache_bytes}")
        if self.min_prior is not None and not 0 <= self.min_prior < 1:
            raise ValueError(f"min_prior must be in [0, 1) or None, got {self.min_prior!r}")


@dataclass(frozen=True)
class PromptConfig:
    """How the generator's prompts are laid out (app/generation/prompts.py)."""

    concat_order: ConcatOrder = "score"

    def __post_init__(self) -> None:
        if self.concat_order not in CONCAT_ORDERS:
            raise ValueError(
                f"concat_order {self.concat_order!r} is not one of {list(CONCAT_ORDERS)}"
            )
