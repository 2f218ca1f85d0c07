"""The step batch's KV cache buffer (app/generation/kv.py, GrowingLayer) against plain
tensors: whatever room a join, a leave or a step finds or lacks in the buffer, attention reads
exactly the left-padded rows that concatenating would give."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from app.generation.kv import GrowingLayer


def rows(n: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, width, 4, generator=g), torch.randn(n, 2, width, 4, generator=g)


def padded(t: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(t, (0, 0, width - t.shape[-2], 0))  # zeros on the left of the columns


def test_joins_steps_and_leaves_read_as_concatenation() -> None:
    k, v = rows(3, 10, 0)
    layer = GrowingLayer(k, v)
    buffer = layer._k.untyped_storage().data_ptr()
    want_k, want_v = k, v
    for width, n, seed in ((8, 2, 1), (13, 1, 2), (10, 4, 3)):  # narrower, wider, same
        jk, jv = rows(n, width, seed)
        layer.join(jk, jv)
        span = max(want_k.shape[-2], width)
        want_k = torch.cat([padded(want_k, span), padded(jk, span)])
        want_v = torch.cat([padded(want_v, span), padded(jv, span)])
        assert layer.keys is not None and layer.values is not None
        assert torch.equal(layer.keys, want_k) and torch.equal(layer.values, want_v)
        sk, sv = rows(want_k.shape[0], 1, seed + 10)  # a decoding step appends a column
        got_k, got_v = layer.update(sk, sv)
        want_k, want_v = torch.cat([want_k, sk], 2), torch.cat([want_v, sv], 2)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    # 3 + 2 + 1 + 4 rows fit the room a 3-row buffer is built with; the wider joiner grew the
    # running rows' padding on the left, inside the buffer: never rebuilt
    assert layer._k.untyped_storage().data_ptr() == buffer
    layer.keep([0, 2, 5, 9], first=1)  # a leave that also cuts a padding column
    idx = torch.tensor([0, 2, 5, 9])
    want_k, want_v = want_k[idx, :, 1:], want_v[idx, :, 1:]
    assert layer.keys is not None and torch.equal(layer.keys, want_k)
    assert layer._k.untyped_storage().data_ptr() == buffer
    many_k, many_v = rows(GrowingLayer.SPARE_ROWS + 20, 5, 7)  # more than the room left
    layer.join(many_k, many_v)
    span = want_k.shape[-2]
    assert layer.keys is not None and layer.values is not None
    assert torch.equal(layer.keys, torch.cat([want_k, padded(many_k, span)]))
    assert torch.equal(layer.values, torch.cat([want_v, padded(many_v, span)]))
    assert layer._k.untyped_storage().data_ptr() != buffer  # rebuilt, with room again
    assert layer._k.shape[0] > layer.keys.shape[0]


def test_a_joiner_wider_than_the_room_on_the_left_rebuilds_the_buffer() -> None:
    k, v = rows(2, 4, 0)
    layer = GrowingLayer(k, v)
    buffer = layer._k.untyped_storage().data_ptr()
    wide_k, wide_v = rows(1, 4 + GrowingLayer.LEFT + 1, 1)
    layer.join(wide_k, wide_v)
    span = wide_k.shape[-2]
    assert layer.keys is not None and layer.values is not None
    assert torch.equal(layer.keys, torch.cat([padded(k, span), wide_k]))
    assert torch.equal(layer.values, torch.cat([padded(v, span), wide_v]))
    assert layer._k.untyped_storage().data_ptr() != buffer


def test_a_buffer_rebuilt_in_inference_mode_takes_joins_and_leaves_outside_it() -> None:
    """Decoding steps run in inference mode, and one that outgrows the room on the right
    rebuilds the buffer there (an inference tensor); the next join or leave comes from the
    step batch outside it."""
    k, v = rows(2, 6, 0)
    layer = GrowingLayer(k, v)
    want_k = k
    with torch.inference_mode():
        for step in range(GrowingLayer.SPARE + 1):
            sk, sv = rows(2, 1, 100 + step)
            layer.update(sk, sv)
            want_k = torch.cat([want_k, sk], 2)
    assert layer._k.is_inference()
    jk, jv = rows(1, 3, 1)
    layer.join(jk, jv)
    layer.keep([1, 2], first=0)
    assert layer.keys is not None
    span = want_k.shape[-2]
    assert torch.equal(layer.keys, torch.cat([want_k[1:], padded(jk, span)]))
