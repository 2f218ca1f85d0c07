"""EngineConfig: how the engine batches and schedules (the LORAG_* engine settings)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 8  # most rows decoded together (a RAG request: one per passage, beam)
    batch_wait_ms: float = 5.0  # how long a forming batch waits to fill
    expect_wait_ms: float = 0.0  # ... and for announced rows still retrieving their passages
    step_batching: bool = True  # rows join and leave between steps (needs a StepBatch)
    prefill_tokens_per_step: int = 0  # prompt tokens prefilled per step boundary; 0: no limit

    def __post_init__(self) -> None:
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int):
            raise ValueError(f"max_batch_size must be an integer, got {self.max_batch_size!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        for name in ("batch_wait_ms", "expect_wait_ms"):
            value = getattr(self, name)
            if not value >= 0:  # also refuses NaN
                raise ValueError(f"{name} must be >= 0 ms, got {value!r}")
        if self.prefill_tokens_per_step < 0:
            raise ValueError(
                f"prefill_tokens_per_step must be >= 0 (0: no limit), "
                f"got {self.prefill_tokens_per_step}"
            )
