"""Fast per-row LoRA for mixed-adapter batches (Punica/S-LoRA style, on top of a PeftModel).

PEFT's `adapter_names` loops over the distinct adapters inside every LoRA layer, indexing the
batch once per adapter; with many adapters in a batch that Python loop runs ~100 times per
decoding step and costs more than the LoRA FLOPs. Here each LoRA Linear layer's adapters are
stacked into two tensors (app/lora/stacks.py) and a batch is applied with, per layer:
- all rows base: the base layer only;
- all rows on one adapter: two plain matmuls at that adapter's rank;
- otherwise: the rows' A and B gathered once per generate call (then cached), and two batched
  matmuls, whatever the number of distinct adapters;
- except, at decoding steps (one token per row), when the batch holds few distinct adapters
  (at most a third as many as rows): the D adapters' A and B side by side, two plain matmuls
  over all of them and a per-row mask, h = (x @ A_all.T) * mask, delta = h @ B_all. That reads
  D adapters instead of n gathered rows, and computes D times the (tiny) LoRA arithmetic.
Outputs equal PEFT's `adapter_names`: exactly for a one-adapter batch (the same matmuls), up to
float rounding for a mixed one (batched matmuls accumulate in another order; 1e-12 in float64).

Mechanism: each LoRA layer's `forward` is replaced, on the instance, by one that reads the rows
set by `BatchedLora.rows()`; outside `rows()` it calls PEFT's own forward unchanged, so plain
PeftModel calls and PEFT's `adapter_names` still work. LoRA layers the stacks cannot express
exactly (Embedding, Conv, quantized Linear, DoRA and other variants, LoRA bias) run PEFT's own
mixed-batch forward with the rows' names, so every model still gets correct per-row results.

Rows follow generate's batch expansion: a layer that sees k*B rows for a B-row call (beams,
num_return_sequences: generate repeats each row k times in place, `repeat_interleave`) gives
row j the adapter of row j // k, while the encoder of a seq2seq model still sees B rows.

The trade-off: the stacks duplicate the adapters' weights, and the per-call gather cache holds
B rows' A and B for every layer (bounded by `gather_cache_bytes`; beyond it rows are gathered at
each step instead); the dense products' cache, the D adapters' A and B, likewise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora.layer import LoraLayer

from app.contracts import BASE_ADAPTER
from app.errors import AdapterNotFound
from app.lora.stacks import LayerStack, Pair, build_stack, is_stackable

log = logging.getLogger(__name__)

BASE = BASE_ADAPTER
DEFAULT_GATHER_CACHE_BYTES = 512 * 2**20
# From this rank up, a mixed batch computes h = x @ A.T per row (bmm(x, A_rows.T)); below it
# A @ x.T (bmm(A_rows, x.T)). MKL's batched kernel for A @ x.T falls off a cliff at r 16 (one
# thread, 16 rows, d_in 512, weights from memory: decode 120 us vs 54, prefill 382 vs 259),
# while up to r 12 A @ x.T is the faster one in prefill (184 vs 232 us at r 8) and equal in decode.
BMM_XA_RANK = 16
# A decoding step of a mixed batch uses the dense products when rows >= DENSE_ROWS_PER_ADAPTER *
# distinct adapters. Measured per decode step (48 LoRA layers of a T5-small decoder, 16 rows,
# rank 8, one thread, caches flushed between steps): LoRA's added time, bmm of gathered rows
# against dense, 2 adapters 3.8 vs 1.4 ms, 4: 4.5 vs 2.6, 8: 3.7 vs 4.1, 16: 3.6 vs 7.6.
DENSE_ROWS_PER_ADAPTER = 3


# the rows' A [n, r, d_in], B [n, r, d_out] and scaling [n, 1, 1], gathered from a LayerStack
Gathered = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class _Layer:
    """One patched LoRA layer: its module, PEFT's forward, and its stack (if stackable)."""

    module: LoraLayer
    orig: Callable[..., torch.Tensor]  # PEFT's bound forward
    i: int  # index of this layer's entry in a _Batch's per-layer plans
    stackable: bool = False
    base: torch.nn.Module | None = None  # module.base_layer, read once per refresh
    plain_base: bool = False  # base is exactly nn.Linear: call F.linear directly
    stack: LayerStack | None = None


@dataclass
class _Batch:
    """The rows of the model call in progress, and what each layer does with them."""

    names: list[str]  # [B] adapter name per row, BASE for none
    slots: torch.Tensor  # [B] stack slot per row (0 = base)
    mode: str  # "base" | "single" | "mixed"
    # per layer (by _Layer.i): the (A, B, scaling) in "single" mode, the stack in "mixed" mode,
    # None where the layer adds nothing to these rows; in "mixed" mode also the one scaling of
    # the batch's adapters in that layer, or None where they differ (then scaled per row)
    pairs: list[Pair | None]
    stacks: list[LayerStack | None]
    alphas: list[float | None]
    cache_gathers: bool
    epoch: int = 0  # BatchedLora.epoch when planned: a refresh makes the plan stale
    # the batch's distinct adapter slots (no base), when decoding steps use the dense products
    dense_slots: torch.Tensor | None = None
    cache_dense: bool = True  # keep their A and B for the plan (within gather_cache_bytes)
    _index: dict[int, torch.Tensor] = field(default_factory=dict)
    _names: dict[int, list[str]] = field(default_factory=dict)
    _gathered: dict[tuple[int, int], Gathered] = field(default_factory=dict)
    _dense: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def expansion(self, n: int) -> int:
        """How many times generate repeated each row, for a layer that sees n rows."""
        b = len(self.names)
        if n % b:
            raise ValueError(
                f"a LoRA layer got {n} rows, not a multiple of the {b} rows given to rows()"
            )
        return n // b

    def index(self, n: int) -> torch.Tensor:
        """[n] slot of each of n rows (the B rows, each repeated n // B times in place)."""
        idx = self._index.get(n)
        if idx is None:
            k = self.expansion(n)
            idx = self.slots if k == 1 else self.slots.repeat_interleave(k)
            self._index[n] = idx
        return idx

    def names_for(self, n: int) -> list[str]:
        """[n] adapter names for PEFT's own mixed-batch forward (the fallback layers)."""
        names = self._names.get(n)
        if names is None:
            k = self.expansion(n)
            names = [name for name in self.names for _ in range(k)]
            self._names[n] = names
        return names

    def gathered(self, i: int, stack: LayerStack, n: int) -> Gathered:
        """The n rows' A, B and scaling in layer i (see Gathered), cached for the call."""
        got = self._gathered.get((i, n))
        if got is None:
            idx = self.index(n)
            got = (
                stack.a.index_select(0, idx),
                stack.b.index_select(0, idx),
                stack.scale.index_select(0, idx).view(n, 1, 1),
            )
            if self.cache_gathers:
                self._gathered[(i, n)] = got
        return got

    def dense(self, i: int, stack: LayerStack) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's distinct adapters' A [D*r, d_in] and B [D*r, d_out] in layer i."""
        got = self._dense.get(i)
        if got is None:
            assert self.dense_slots is not None
            a = stack.a.index_select(0, self.dense_slots)
            b = stack.b.index_select(0, self.dense_slots)
            got = (a.view(-1, a.shape[-1]), b.view(-1, b.shape[-1]))
            if self.cache_dense:
                self._dense[i] = got
        return got

    def mask(self, i: int, stack: LayerStack, n: int, scaled: bool) -> torch.Tensor:
        """[n, D*r]: row j's block of columns (its adapter's) 1, or its scaling when scaled;
        0 elsewhere and for base rows."""
        got = self._masks.get((i, n))
        if got is None:
            assert self.dense_slots is not None
            idx = self.index(n)  # [n] slot per row
            hit = idx[:, None] == self.dense_slots[None, :]  # [n, D]
            value = stack.scale.index_select(0, idx)[:, None] if scaled else 1.0
            blocks = hit.to(stack.dtype) * value
            got = blocks.repeat_interleave(stack.a.shape[1], dim=1)  # [n, D*r]
            self._masks[(i, n)] = got
        return got


RowPlan = _Batch  # a plan() for rows(): opaque to callers


class BatchedLora:
    """Per-row LoRA adapters for a PeftModel, applied as stacked, batched matmuls.

    Usage (on the model thread):
        lora = BatchedLora(peft_model)
        with lora.rows(["a", "__base__", "b"]):
            out = peft_model.generate(**enc)   # no adapter_names: rows() sets them
        lora.refresh()                          # after installing or deleting an adapter

    State: `rows()` stores the current batch on this object and every patched layer reads it.
    That is safe because the engine runs one batch at a time on one model thread; `rows()`
    refuses to nest, and the object must not be shared by threads calling the model at once.
    """

    def __init__(
        self, peft_model: PeftModel, *, gather_cache_bytes: int = DEFAULT_GATHER_CACHE_BYTES
    ) -> None:
        self.model = peft_model
        self.gather_cache_bytes = gather_cache_bytes
        self._layers: dict[int, _Layer] = {}  # id(module) -> patched layer
        self._slots: dict[str, int] = {}  # adapter name -> stack slot (from 1)
        self._known: set[str] = set()  # every adapter name some LoRA layer holds
        self._config_names: frozenset[str] = frozenset()
        self._slot_bytes = 0  # bytes of one slot's A and B over all stacks
        self._batch: _Batch | None = None
        self.epoch = 0  # bumped by every refresh(): plans made before it are stale
        self.refresh()

    # ---- public API ------------------------------------------------------------------------

    def refresh(self) -> None:
        """Find the model's LoRA layers and rebuild the stacks from their current weights.

        Call it (on the model thread) after an adapter is installed, deleted or its weights
        changed. rows() also calls it when the set of installed adapter names has changed.
        """
        if self._batch is not None:
            raise RuntimeError("BatchedLora.refresh() inside rows()")
        self.epoch += 1
        found = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        alive = {id(m) for m in found}
        for key in [k for k in self._layers if k not in alive]:  # gone (e.g. after unload)
            del self._layers[key]
        for module in found:
            if id(module) not in self._layers:
                self._layers[id(module)] = self._patch(module)
        for i, layer in enumerate(self._layers.values()):
            layer.i = i
        known: set[str] = set()
        for module in found:
            known |= set(module.lora_A) | set(module.lora_embedding_A)
        self._known = known
        self._slots = {name: s for s, name in enumerate(sorted(known), start=1)}
        n_slots = len(self._slots) + 1
        self._slot_bytes = 0
        for layer in self._layers.values():
            layer.stackable = is_stackable(layer.module)
            layer.base = layer.module.base_layer
            layer.plain_base = type(layer.base) is torch.nn.Linear
            layer.stack = (
                build_stack(layer.module, self._slots, n_slots) if layer.stackable else None
            )
            if layer.stack is not None:
                per_slot = layer.stack.a[0].numel() + layer.stack.b[0].numel()
                self._slot_bytes += per_slot * layer.stack.a.element_size()
        self._config_names = frozenset(self.model.peft_config)
        fallback = sum(1 for layer in self._layers.values() if not layer.stackable)
        log.debug(
            "BatchedLora: %d LoRA layers (%d via PEFT's own mixed batch), adapters %s",
            len(self._layers),
            fallback,
            sorted(known),
        )

    def plan(self, adapter_names: Sequence[str | None]) -> RowPlan:
        """What rows() does for these rows, computed once: a decoding loop whose rows stay
        the same for many model calls passes the plan to rows() at each call, and the rows'
        gathered A and B are kept between the calls. A plan is stale after refresh().
        Raises as rows() does."""
        if frozenset(self.model.peft_config) != self._config_names:
            self.refresh()
        return self._plan(adapter_names)

    def fresh(self, plan: RowPlan) -> bool:
        """Whether plan still matches the stacks (no refresh() since it was made)."""
        return plan.epoch == self.epoch and frozenset(self.model.peft_config) == self._config_names

    @contextmanager
    def rows(self, adapter_names: Sequence[str | None] | RowPlan) -> Iterator[None]:
        """Give row i of the model calls inside adapter_names[i] (None or BASE: the base model),
        or the rows of a plan().

        Do not also pass PEFT's `adapter_names` to those calls. Raises AdapterNotFound for a
        name no LoRA layer holds, ValueError for an empty batch, a model in training mode,
        merged adapters (as PEFT does) or a stale plan.
        """
        if self._batch is not None:
            raise RuntimeError("BatchedLora.rows() does not nest")
        if isinstance(adapter_names, _Batch):
            if not self.fresh(adapter_names):
                raise ValueError("a BatchedLora plan made before the adapters changed")
            self._batch = adapter_names
        else:
            self._batch = self.plan(adapter_names)
        try:
            yield
        finally:
            self._batch = None

    def close(self) -> None:
        """Give every LoRA layer back PEFT's own forward."""
        if self._batch is not None:
            raise RuntimeError("BatchedLora.close() inside rows()")
        for layer in self._layers.values():
            layer.module.__dict__.pop("forward", None)
        self._layers.clear()

    # ---- internals ---------------------------------------------------------------------------

    def _patch(self, module: LoraLayer) -> _Layer:
        # PEFT's forward, bound (the module is not patched yet)
        orig: Callable[..., torch.Tensor] = cast(torch.nn.Module, module).forward
        layer = _Layer(module=module, orig=orig, i=-1)

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            batch = self._batch
            if batch is None:
                return orig(x, *args, **kwargs)
            return _apply(layer, batch, x, args, kwargs)

        # an instance attribute shadows the class method; nn.Module.__call__ calls it
        module.__dict__["forward"] = forward
        return layer

    def _plan(self, adapter_names: Sequence[str | None]) -> _Batch:
        if not adapter_names:
            raise ValueError("rows() needs at least one row")
        if self.model.training:
            raise ValueError("per-row adapters need the model in eval mode (dropout off)")
        names = [BASE if n is None else n for n in adapter_names]
        for name in names:
            if name != BASE and name not in self._known:
                raise AdapterNotFound(name)
        slot_list = [self._slots.get(n, 0) for n in names]  # BASE -> 0
        distinct = set(slot_list)
        if distinct == {0}:
            mode = "base"
        elif len(distinct) == 1:
            mode = "single"
        else:
            mode = "mixed"
        single = slot_list[0]  # the one slot, in "single" mode
        n_layers = len(self._layers)
        pairs: list[Pair | None] = [None] * n_layers
        stacks: list[LayerStack | None] = [None] * n_layers
        alphas: list[float | None] = [None] * n_layers
        device: torch.device | None = None
        for layer in self._layers.values():
            module = layer.module
            if module.merged:
                raise ValueError(
                    "per-row adapters need unmerged adapters; merged: "
                    f"{', '.join(module.merged_adapters)}"
                )
            stack = layer.stack
            if stack is None or module.disable_adapters:
                continue
            device = stack.a.device
            if mode == "single":
                pairs[layer.i] = stack.pairs[single]
            elif mode == "mixed" and not stack.present.isdisjoint(distinct):
                stacks[layer.i] = stack
                scalings = {stack.scalings[s] for s in stack.present & distinct}
                alphas[layer.i] = scalings.pop() if len(scalings) == 1 else None
        slots = torch.tensor(slot_list, dtype=torch.long, device=device)
        cache = len(names) * self._slot_bytes <= self.gather_cache_bytes
        adapters = sorted(distinct - {0})
        dense = None
        if mode == "mixed" and len(names) >= DENSE_ROWS_PER_ADAPTER * len(adapters):
            dense = torch.tensor(adapters, dtype=torch.long, device=device)
        cache_dense = len(adapters) * self._slot_bytes <= self.gather_cache_bytes
        return _Batch(
            names,
            slots,
            mode,
            pairs,
            stacks,
            alphas,
            cache_gathers=cache,
            epoch=self.epoch,
            dense_slots=dense,
            cache_dense=cache_dense,
        )


def _apply(
    layer: _Layer, batch: _Batch, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor:
    """A LoRA layer's forward for the rows of `batch`: x [n, ..., d_in] -> [n, ..., d_out]."""
    if "adapter_names" in kwargs:
        raise ValueError("inside BatchedLora.rows(), do not pass PEFT's adapter_names too")
    if not layer.stackable:
        return layer.orig(x, *args, adapter_names=batch.names_for(x.shape[0]), **kwargs)
    base = cast(torch.nn.Module, layer.base)
    if layer.plain_base and not args and not kwargs:
        linear = cast(torch.nn.Linear, base)
        result = F.linear(x, linear.weight, linear.bias)
    else:
        result = base(x, *args, **kwargs)
    if batch.mode == "single":
        pair = batch.pairs[layer.i]
        if pair is None:
            return result
        a, b, scaling = pair  # [r, d_in], [r, d_out]
        xa = x if x.dtype == a.dtype else x.to(a.dtype)
        h = F.linear(xa.reshape(-1, a.shape[1]), a)  # [N, r]
        if result.dtype == b.dtype and result.is_contiguous():
            result.view(-1, b.shape[1]).addmm_(h, b, alpha=scaling)
            return result
        return result + ((h @ b) * scaling).view(result.shape).to(result.dtype)
    stack = batch.stacks[layer.i]
    if stack is None:  # "base" mode, or none of the batch's adapters is in this layer
        return result
    n = x.shape[0]
    alpha = batch.alphas[layer.i]
    if batch.dense_slots is not None and x.numel() == n * stack.a.shape[2]:  # a decoding step
        a_all, b_all = batch.dense(layer.i, stack)
        xa = x if x.dtype == stack.dtype else x.to(stack.dtype)
        # h = x @ A_all.T, masked to each row's own adapter (and scaled where scalings differ)
        h = F.linear(xa.reshape(n, -1), a_all).mul_(batch.mask(layer.i, stack, n, alpha is None))
        scale = 1.0 if alpha is None else alpha
        if result.dtype == stack.dtype and result.is_contiguous():
            result.view(n, -1).addmm_(h, b_all, alpha=scale)
            return result
        return result + ((h @ b_all) * scale).view(result.shape).to(result.dtype)
    a_rows, b_rows, scale_rows = batch.gathered(layer.i, stack, n)
    xa = x if x.dtype == stack.dtype else x.to(stack.dtype)
    x3 = xa.reshape(n, -1, a_rows.shape[2])  # [n, T, d_in]
    if a_rows.shape[1] < BMM_XA_RANK:
        h = torch.bmm(a_rows, x3.transpose(1, 2)).transpose(1, 2)  # [n, T, r]
    else:
        h = torch.bmm(x3, a_rows.transpose(1, 2))  # [n, T, r]
    if alpha is None:  # the batch's adapters scale differently here: scale the small h
        h = h * scale_rows
        alpha = 1.0
    if result.dtype == stack.dtype and result.is_contiguous():
        result.view(n, -1, b_rows.shape[2]).baddbmm_(h, b_rows, alpha=alpha)
        return result
    delta = torch.bmm(h, b_rows) * alpha  # [n, T, d_out]
    return result + delta.view(result.shape).to(result.dtype)
