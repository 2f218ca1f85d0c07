"""The step batch's KV cache: one cache for every running row, and the surgery on it.

Rows of different lengths share one cache by left padding: every row's self-attention keys end
at the same column, and the mask says which columns are real. The encoder side of a seq2seq row
(its encoder states, cross-attention keys and values, mask) is padded on the right, as
generate() pads a batch's prompts. Joins merge two states (`merge`), leaves keep some rows
(`select`), beam steps copy rows into others (`reorder`).

Between joins and leaves a step appends its keys and values in place, into spare columns of
the self-attention cache (`GrowingLayer`), instead of transformers' concatenation of the whole
cache at every step (for 16 rows of SmolLM2 with ~700-token prompts that copy is ~0.5 GB a
step); a join writes its rows into spare rows of the same buffer, and a leave moves the rows
after it up, so neither copies the running rows whole. Layers of other kinds (sliding
windows) are left as they are: they support whole batches (rows leave, beams reorder) but not
joins, and their padding columns are never cut.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer, EncoderDecoderCache


@dataclass
class State:
    """The running rows' tensors, row i of each for batch row i."""

    cache: Cache
    mask: torch.Tensor  # [B, T] self-attention mask (causal: prompt + answer; seq2seq: answer)
    last: torch.Tensor  # [B] the token each row feeds next
    enc_hidden: torch.Tensor | None = None  # [B, S, d] seq2seq encoder output
    enc_mask: torch.Tensor | None = None  # [B, S]

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    def self_layers(self) -> list[Any]:
        cache = self.cache
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        return list(getattr(cache, "layers", []))

    def cross_layers(self) -> list[Any]:
        if isinstance(self.cache, EncoderDecoderCache):
            return list(getattr(self.cache.cross_attention_cache, "layers", []))
        return []

    def plain(self) -> bool:
        """Whether every layer is a plain (growable, paddable) dynamic layer."""
        layers = self.self_layers() + self.cross_layers()
        return bool(layers) and all(type(x) in (DynamicLayer, GrowingLayer) for x in layers)


class GrowingLayer(DynamicLayer):
    """A self-attention cache layer in a buffer with room around what it holds: spare columns
    on the right, which each step's keys and values are appended into in place; spare rows
    below, which joining rows are written into (`join`); and a few columns on the left, which
    let a joiner wider than the running rows in (the running rows' padding grows there). So a
    join copies the joiners' keys and values only, not the running rows' (for 16 rows of
    SmolLM2 at ~750 columns, ~0.5 GB a join). Attention reads a view of the rows and columns
    in use; a buffer that is outgrown is rebuilt (`stack`), with room again.

    Memory: the spare rows and columns are allocated but not written until used, so the
    operating system commits their pages only then.

    Every method that writes runs in inference mode: a buffer (re)built inside it, by a
    decoding step outgrowing its room, is an inference tensor, which a join or a leave outside
    it could not write otherwise."""

    SPARE = 64  # columns of room on the right at each (re)build; doubled when outgrown
    LEFT = 32  # columns of room on the left at each (re)build
    SPARE_ROWS = 8  # rows of room below at each (re)build, at least; half the rows if more

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self._k = self._v = keys.new_empty(0)  # the buffers [R, H, C, D]
        self._rows = 0  # rows in use, the leading ones
        self._at = 0  # the first column in use
        self._n = 0  # columns in use, from _at
        self.adopt(keys, values)

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, spare: int = SPARE) -> None:
        """Hold these keys and values [B, H, T, D], with room for `spare` more columns."""
        self.stack([(keys, values)], keys.shape[-2], spare)

    @torch.inference_mode()
    def stack(
        self, parts: list[tuple[torch.Tensor, torch.Tensor]], width: int, spare: int = SPARE
    ) -> None:
        """Hold the parts' rows one after another, each left padded (zeros) to width columns,
        in a new buffer with room around them: one copy of each part."""
        keys, values = parts[0]
        rows = sum(k.shape[0] for k, _ in parts)
        h, d, dv = keys.shape[1], keys.shape[-1], values.shape[-1]
        capacity = rows + max(self.SPARE_ROWS, rows // 2)
        columns = self.LEFT + width + spare
        self._k = keys.new_empty(capacity, h, columns, d)
        self._v = values.new_empty(capacity, h, columns, dv)
        self._rows, self._at, self._n = 0, self.LEFT, width
        for k, v in parts:
            self._write(k, v)
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    @torch.inference_mode()
    def join(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append rows keys, values [J, H, T, D] (left padded, like every row, to the wider
        of T and the running rows' columns): into the spare rows where they fit, else into a
        new buffer."""
        rows, width = keys.shape[0], keys.shape[-2]
        grow = max(0, width - self._n)  # the running rows' padding grows on the left
        if self._rows + rows > self._k.shape[0] or grow > self._at:
            self.stack([self._in_use(), (keys, values)], self._n + grow)
            return
        if grow:
            self._at -= grow
            self._n += grow
            self._k[: self._rows, :, self._at : self._at + grow].zero_()
            self._v[: self._rows, :, self._at : self._at + grow].zero_()
        self._write(keys, values)

    def _write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Rows keys, values [J, H, T, D] (T <= the columns in use) into the next free rows,
        ending at the last column in use, zeros before (padding the mask hides, kept finite)."""
        a, b = self._rows, self._rows + keys.shape[0]
        start, end = self._at, self._at + self._n
        gap = end - keys.shape[-2]
        self._k[a:b, :, start:gap].zero_()
        self._v[a:b, :, start:gap].zero_()
        self._k[a:b, :, gap:end] = keys
        self._v[a:b, :, gap:end] = values
        self._rows = b
        self._view()

    def _in_use(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the rows and columns in use: [B, H, T, D] each."""
        end = self._at + self._n
        return self._k[: self._rows, :, self._at : end], self._v[: self._rows, :, self._at : end]

    def _view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What attention reads: the rows and columns in use."""
        keys, values = self._in_use()
        self.keys, self.values = keys, values
        return keys, values

    @torch.inference_mode()
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[-2]
        end = self._at + self._n
        if end + n > self._k.shape[-2]:
            self.adopt(*self._in_use(), max(n, self._n))
            end = self._at + self._n
        self._k[: self._rows, :, end : end + n] = key_states
        self._v[: self._rows, :, end : end + n] = value_states
        self._n += n
        return self._view()

    @torch.inference_mode()
    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Rows dst become copies of rows src, spare columns included."""
        self._k[dst] = self._k[src]
        self._v[dst] = self._v[src]

    @torch.inference_mode()
    def keep(self, rows: list[int], first: int) -> None:
        """Rows `rows` of the layer, without its first `first` columns in use, in place: the
        rows that move are copied into the leading rows; the buffer and its room stay (a leave,
        which would otherwise copy every remaining row twice). More rows than it holds (beams
        fanning out after a prefill) take a new buffer."""
        if len(rows) > self._rows:
            idx = torch.tensor(rows, dtype=torch.long, device=self._k.device)
            keys, values = (t[:, :, first:].index_select(0, idx) for t in self._in_use())
            self.adopt(keys, values)
            return
        moved = [(i, j) for i, j in enumerate(rows) if i != j]
        if all(a < b for a, b in itertools.pairwise(rows)):
            # rows leaving: each kept row moves up, read before any write reaches it. Row by
            # row, not copy_rows' gathered copy: bench/kv_surgery timed the gather (index_put)
            # slower than the old two copies, the loop at 0.45x of them
            # Only the columns in use: the room around them is written before it is read
            end = self._at + self._n
            for i, j in moved:
                self._k[i, :, self._at : end].copy_(self._k[j, :, self._at : end])
                self._v[i, :, self._at : end].copy_(self._v[j, :, self._at : end])
        elif moved:  # beams reordered too: through a gathered copy
            device = self._k.device
            self.copy_rows(
                torch.tensor([i for i, _ in moved], dtype=torch.long, device=device),
                torch.tensor([j for _, j in moved], dtype=torch.long, device=device),
            )
        self._rows = len(rows)
        self._at += first
        self._n -= first
        self._view()


def grow_in_place(state: State) -> None:
    """Give state's plain self-attention layers in-place appends (GrowingLayer)."""
    cache = state.cache
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    layers = getattr(cache, "layers", [])
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer:
            layers[i] = GrowingLayer(*_kv(layer))


def cast(state: State, dtype: torch.dtype) -> None:
    """Give a prefill's keys, values and encoder output the dtype decoding runs in (in place;
    a no-op where they have it)."""
    for layer in state.self_layers() + state.cross_layers():
        keys, values = _kv(layer)
        if keys.dtype != dtype or values.dtype != dtype:
            _set(layer, keys.to(dtype), values.to(dtype))
    if state.enc_hidden is not None and state.enc_hidden.dtype != dtype:
        state.enc_hidden = state.enc_hidden.to(dtype)


def check_filled(state: State) -> None:
    """Refuse a cache the prefill left without keys (before anything is merged into it)."""
    layers = state.self_layers() + state.cross_layers()
    if not layers:
        raise TypeError(f"a cache of type {type(state.cache).__name__} has no layers to step")
    for layer in layers:
        _kv(layer)


def merge(old: State, new: State) -> None:
    """Append new's rows to old's (in place), padding both to the wider of the two."""
    width = max(old.mask.shape[1], new.mask.shape[1])
    for a, b in zip(old.self_layers(), new.self_layers(), strict=True):
        _merge_layer(a, b, width, left=True)
    old.mask = _cat_padded(old.mask, new.mask, width, left=True)
    old.last = torch.cat([old.last, new.last])
    if old.enc_hidden is not None and new.enc_hidden is not None:
        assert old.enc_mask is not None and new.enc_mask is not None
        span = max(old.enc_mask.shape[1], new.enc_mask.shape[1])
        for a, b in zip(old.cross_layers(), new.cross_layers(), strict=True):
            _merge_layer(a, b, span, left=False)
        old.enc_hidden = _cat_padded(old.enc_hidden, new.enc_hidden, span, left=False, dim=-2)
        old.enc_mask = _cat_padded(old.enc_mask, new.enc_mask, span, left=False)


def select(state: State, keep: list[int]) -> State:
    """Rows `keep` of state (in place), with the padding columns no row needs any more cut
    (plain layers only: a sliding window's columns are not the mask's)."""
    idx = torch.tensor(keep, dtype=torch.long, device=state.mask.device)
    mask = state.mask.index_select(0, idx)
    cut = state.plain()
    real = mask.any(0)
    first = int(real.nonzero()[0]) if cut and bool(real.any()) else 0  # all-padding columns
    state.mask = mask[:, first:]
    for layer in state.self_layers():
        if isinstance(layer, GrowingLayer):
            layer.keep(keep, first)
        else:
            _set(layer, *(t.index_select(0, idx)[:, :, first:] for t in _kv(layer)))
    if state.last.numel():  # (a fresh prefill's state has no next tokens yet)
        state.last = state.last.index_select(0, idx)
    if state.enc_hidden is not None and state.enc_mask is not None:
        enc_mask = state.enc_mask.index_select(0, idx)
        used = enc_mask.any(0)
        end = int(used.nonzero()[-1]) + 1 if cut and bool(used.any()) else enc_mask.shape[1]
        state.enc_mask = enc_mask[:, :end]
        state.enc_hidden = state.enc_hidden.index_select(0, idx)[:, :end]
        for layer in state.cross_layers():
            _set(layer, *(t.index_select(0, idx)[:, :, :end] for t in _kv(layer)))
    return state


def compact(state: State) -> State:
    """Each row's real self-attention columns moved to the end, in order (in place): a prefill
    after cached prefixes leaves a hole between a row's past and its new tokens, which would
    otherwise widen the whole batch's cache by the longest prefix. Causal models only: a key
    carries its position from when it was computed, so where its column sits does not matter,
    only which columns the mask keeps."""
    mask = state.mask.bool()  # [B, T]
    width = int(mask.sum(1).max())
    # real columns first, each row's in order: a stable sort of (not real)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]  # [B, W]
    real = mask.gather(1, order)  # [B, W] real columns, then the row's padding
    shift = width - real.sum(1)  # [B] left padding each row needs
    cols = torch.arange(width, device=mask.device)[None, :] - shift[:, None]  # [B, W]
    take = order.gather(1, cols.clamp(min=0))  # [B, W] the column each new column reads
    state.mask = (cols >= 0).long()
    for layer in state.self_layers():
        keys, values = _kv(layer)
        idx = take[:, None, :, None]
        _set(
            layer,
            keys.gather(2, idx.expand(-1, keys.shape[1], -1, keys.shape[3])),
            values.gather(2, idx.expand(-1, values.shape[1], -1, values.shape[3])),
        )
    return state


def reorder(state: State, keep: list[int]) -> None:
    """Row i becomes a copy of row keep[i], in place, for the rows that change: a beam step,
    whose new beams continue beams of the same request and passage, so the encoder side
    (cross-attention, encoder states) is the same for both rows and stays."""
    moved = [(i, j) for i, j in enumerate(keep) if i != j]
    if not moved:
        return
    dst = torch.tensor([i for i, _ in moved], dtype=torch.long, device=state.mask.device)
    src = torch.tensor([j for _, j in moved], dtype=torch.long, device=state.mask.device)
    with torch.inference_mode():  # the cache is made of inference tensors
        state.mask[dst] = state.mask[src]
        for layer in state.self_layers():
            if isinstance(layer, GrowingLayer):
                layer.copy_rows(dst, src)
            else:
                keys, values = _kv(layer)
                keys[dst] = keys[src]
                values[dst] = values[src]


def _kv(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise TypeError(f"a {type(layer).__name__} cache layer the prefill did not fill")
    return keys, values


def _set(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    if isinstance(layer, GrowingLayer):
        layer.adopt(keys, values)
    else:
        layer.keys, layer.values = keys, values


def _merge_layer(a: Any, b: Any, size: int, *, left: bool) -> None:
    """Layer a's keys and values followed by b's (new rows), both padded to size columns."""
    (ak, av), (bk, bv) = _kv(a), _kv(b)
    if isinstance(a, GrowingLayer) and left:
        a.join(bk, bv)
    else:
        _set(a, _cat_padded(ak, bk, size, left=left), _cat_padded(av, bv, size, left=left))


def _cat_padded(
    a: torch.Tensor, b: torch.Tensor, size: int, *, left: bool, dim: int = -2
) -> torch.Tensor:
    """a and b padded along dim to size, stacked along the batch dimension."""
    if a.dim() == 2:
        dim = -1
    return torch.cat([_pad_to(a, dim, size, left=left), _pad_to(b, dim, size, left=left)])


def _pad_to(t: torch.Tensor, dim: int, size: int, *, left: bool) -> torch.Tensor:
    """t zero-padded along dim (counted from the end, negative) to size."""
    gap = size - t.shape[dim]
    if gap == 0:
        return t
    pad = [0, 0] * (-dim - 1) + ([gap, 0] if left else [0, gap])
    return F.pad(t, pad)
