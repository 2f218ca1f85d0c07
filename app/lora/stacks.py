"""Stack the LoRA adapters of one PEFT Linear layer into two tensors, indexed by a slot.

The stacks are what lets a mixed-adapter batch be applied with one gather and two batched
matmuls per layer (Punica's BGMV, S-LoRA): row i of the batch uses slot idx[i], and the
layer computes  delta[i] = (x[i] @ A[idx[i]].T) @ B[idx[i]]  for every row at once.

Layout choices:
- A keeps PEFT's lora_A.weight layout [r, d_in]: `A_rows @ x.T` is a batched matmul whose inner
  dimension is contiguous in both operands, several times faster on the CPU than `x @ A.T`.
- B is stored transposed, B[s] = lora_B.weight.T  [r, d_out], and not pre-scaled: the scaling
  goes in as the matmul's alpha (`addmm_(h, B, alpha=scaling)`), which rounds as PEFT's
  `lora_B(lora_A(x)) * scaling` does. Folding it into B costs nothing in speed but changes the
  rounding of every B element, which a deep model amplifies (1e-2 on a tiny T5's logits).
- Ranks are padded with zeros to the layer's largest rank. Zero rows of A give exact zeros in
  `h`, which meet zero rows of B, so padding changes no result, only wastes r_max - r columns.
- Slot 0 is the base model (all zeros): base rows in a mixed batch add exact zeros.

The stacks duplicate the adapters' weights (PEFT keeps its own copies for its own paths).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer

Pair = tuple[torch.Tensor, torch.Tensor, float]  # A [r, d_in], B [r, d_out], scaling


@dataclass(frozen=True)
class LayerStack:
    """One LoRA Linear layer's adapters, stacked by slot (slot 0 = base = zeros)."""

    a: torch.Tensor  # [S, r_max, d_in]
    b: torch.Tensor  # [S, r_max, d_out]   lora_B.weight.T
    scale: torch.Tensor  # [S] scaling per slot (0 where the layer lacks the adapter)
    # per slot: (A [r, d_in], B [r, d_out], scaling) at the adapter's own rank, or None where
    # this layer lacks the adapter; the one-adapter fast path uses these (no padding, no gather)
    pairs: tuple[Pair | None, ...]
    present: frozenset[int]  # slots this layer holds
    scalings: dict[int, float]  # slot -> scaling, for the slots this layer holds

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype


def is_stackable(layer: LoraLayer) -> bool:
    """Whether the stacked path computes exactly what PEFT's vanilla LoRA forward does here.

    Plain LoRA Linear layers only: no DoRA/aLoRA/other variants, no LoRA bias. Other LoRA layers
    (Embedding, Conv, quantized Linear) fall back to PEFT's own per-layer mixed batch.
    """
    if type(layer) is not LoraLinear or layer.lora_variant:
        return False
    return all(layer.lora_A[n].bias is None and layer.lora_B[n].bias is None for n in layer.lora_A)


def build_stack(layer: LoraLayer, slots: dict[str, int], n_slots: int) -> LayerStack | None:
    """Stack the adapters `layer` holds into slots; None when it holds none of them."""
    names = [n for n in layer.lora_A if n in slots]
    if not names:
        return None
    weights = {n: _weights(layer, n) for n in names}
    a0, b0 = weights[names[0]]
    d_in, d_out = a0.shape[1], b0.shape[0]
    r_max = max(wa.shape[0] for wa, _ in weights.values())
    with torch.no_grad():
        a = a0.new_zeros(n_slots, r_max, d_in)
        b = a0.new_zeros(n_slots, r_max, d_out)
        scale = a0.new_zeros(n_slots)
        scalings: dict[int, float] = {}
        pairs: list[Pair | None] = [None] * n_slots
        for name in names:
            s = slots[name]
            wa, wb = weights[name]
            r = wa.shape[0]
            a[s, :r] = wa.to(a.dtype)
            b[s, :r] = wb.T.to(b.dtype)
            scalings[s] = float(layer.scaling[name])
            scale[s] = scalings[s]
            # contiguous views: the leading r rows of slot s
            pairs[s] = (a[s, :r], b[s, :r], scalings[s])
    return LayerStack(
        a=a,
        b=b,
        scale=scale,
        pairs=tuple(pairs),
        present=frozenset(scalings),
        scalings=scalings,
    )


def _weights(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_A [r, d_in] and lora_B [d_out, r] weights of adapter `name` in `layer`."""
    a = cast(torch.nn.Linear, layer.lora_A[name])
    b = cast(torch.nn.Linear, layer.lora_B[name])
    return a.weight, b.weight
