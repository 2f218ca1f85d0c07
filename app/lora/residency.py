"""Which adapters stay resident: a memory budget with LRU eviction, pinning, and the policy knobs.

The budget counts the adapters' LoRA weights as the model holds them (parameter count x the
model's element size), not their file size: a float16 file loaded into a float32 model takes
twice its bytes. Copies made by other layers (stacked weights for a batched kernel) are not
counted; the budget bounds PEFT's weights, which is what grows with the number of adapters.

Eviction is planned before anything changes: either the plan frees enough (least recently used
first, skipping pinned adapters, adapters that queued requests hold, and the name being
replaced), or the install is refused with every number in the message and nothing is evicted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.errors import InvalidInputError


@dataclass(frozen=True)
class ResidencyPolicy:
    memory_budget: int | None = None  # bytes of resident LoRA weights; None = unlimited
    lazy_load: bool = True  # /ask may load adapters_dir/<name> on first use
    merge_single: bool = False  # merge the only adapter into the base while it is all traffic

    def __post_init__(self) -> None:
        if self.memory_budget is not None and self.memory_budget < 0:
            raise ValueError(f"memory_budget must be >= 0 bytes, got {self.memory_budget}")

    @classmethod
    def of(
        cls, memory_bytes: int | None, *, lazy_load: bool, merge_single: bool
    ) -> ResidencyPolicy:
        """From settings: a budget of 0 or None means unlimited."""
        return cls(memory_bytes or None, lazy_load, merge_single)


class AdapterBudgetExceeded(InvalidInputError):
    """An install that cannot fit the adapter memory budget even after evicting what may go."""

    def __init__(self, name: str, need: int, budget: int, resident: int, stuck: int) -> None:
        super().__init__(
            f"adapter {name!r} needs {need} bytes but the adapter memory budget is {budget} "
            f"bytes: {resident} are resident, of which {stuck} cannot be evicted (pinned or "
            "in use by queued requests); nothing was evicted"
        )
        self.name = name
        self.need = need
        self.budget = budget


@dataclass(frozen=True)
class Resident:
    """What eviction planning needs of one resident adapter."""

    name: str
    bytes: int
    last_use: int  # a tick: larger = more recent (install or batch)
    pinned: bool
    held: bool  # queued requests name it


def plan_eviction(
    residents: Sequence[Resident], name: str, need: int, budget: int | None
) -> list[str]:
    """Names to evict, least recently used first, so that installing `need` bytes as `name`
    keeps the resident total within budget. A resident `name` is being replaced: its bytes
    are freed by the swap. Raises AdapterBudgetExceeded when no plan fits."""
    if budget is None:
        return []
    others = [r for r in residents if r.name != name]
    used = sum(r.bytes for r in others)
    if used + need <= budget:
        return []
    movable = sorted(
        (r for r in others if not r.pinned and not r.held), key=lambda r: (r.last_use, r.name)
    )
    stuck = used - sum(r.bytes for r in movable)
    if stuck + need > budget:
        raise AdapterBudgetExceeded(name, need, budget, used, stuck)
    plan: list[str] = []
    for r in movable:
        if used + need <= budget:
            break
        plan.append(r.name)
        used -= r.bytes
    return plan
