"""RAG decoding and losses through a PEFT model: per-row adapters and LoRA training.

Each question's B*K rows carry that question's adapter in `adapter_names`; a mixed batch must
equal each question decoded alone with its adapter. The adapters are first shown to differ.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor
from transformers import BartForConditionalGeneration

from app.generation.family import family_for
from app.generation.rag import IGNORE_INDEX
from app.generation.rag_loss import rag_nll
from tests.tensor_rag import (
    causal_rag_token_generate,
    rag_sequence_generate,
    rag_sequence_nll,
    rag_token_generate,
    rag_token_nll,
)
from tests.tiny import RAG_EOS, RAG_PAD, RAG_VOCAB, favour_eos, rag_bart_config, rag_llama

VOCAB, PAD, EOS = RAG_VOCAB, RAG_PAD, RAG_EOS
K = 3


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: intra-op thread hand-offs cost more than the math (6x on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _lora(model: Any, targets: list[str]) -> PeftModel:
    torch.manual_seed(100)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft = get_peft_model(model, config, adapter_name="qa")
    torch.manual_seed(101)
    peft.add_adapter("chat", config)
    return peft.eval()


def _bart() -> PeftModel:
    torch.manual_seed(0)
    model = BartForConditionalGeneration(rag_bart_config())
    favour_eos(model)
    return _lora(model, ["q_proj", "v_proj", "fc1"])


def _inputs(batch: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch * K, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:], ids[1, 6:] = 0, PAD
    return ids, mask, torch.randn(batch, K, generator=g)


SEQ2SEQ = {"eos_token_id": EOS, "pad_token_id": PAD, "decoder_start_token_id": EOS}


def _decode(
    mode: str, model: PeftModel, ids: Tensor, mask: Tensor, scores: Tensor, names: list[str]
) -> Any:
    common: dict[str, Any] = {"n_docs": K, "max_new_tokens": 6, "adapter_names": names, **SEQ2SEQ}
    if mode == "token":
        return rag_token_generate(model, ids, mask, scores, **common)
    if mode == "token-beam":
        return rag_token_generate(model, ids, mask, scores, num_beams=3, **common)
    if mode == "token-pruned":  # rows are compacted: adapter names must follow their rows
        return rag_token_generate(model, ids, mask, scores, min_prior=0.2, **common)
    if mode == "sequence-pruned":
        return rag_sequence_generate(model, ids, mask, scores, min_prior=0.2, **common)
    return rag_sequence_generate(
        model, ids, mask, scores, num_beams=2, decoding="thorough", **common
    )


@pytest.mark.parametrize(
    "mode", ["token", "token-beam", "token-pruned", "sequence", "sequence-pruned"]
)
def test_mixed_adapter_batch_equals_single_adapter_runs(mode: str) -> None:
    model = _bart()
    ids, mask, scores = _inputs(3, seed=1)
    plan = ["qa", "chat", "__base__"]
    names = [plan[b] for b in range(3) for _ in range(K)]
    mixed = _decode(mode, model, ids, mask, scores, names)
    if mode.endswith("pruned"):  # some passages were pruned, so rows moved
        pruned = torch.isinf(mixed.doc_logprob)
        assert 0 < int(pruned.sum()) < 6 and bool((mixed.doc_posterior[pruned] == 0).all())
    # precondition: the adapters change the answer distribution of every question
    for b in range(3):
        rows = slice(b * K, (b + 1) * K)
        alone = {
            name: _decode(mode, model, ids[rows], mask[rows], scores[b : b + 1], [name] * K)
            for name in plan
        }
        logprobs = [float(alone[name].logprob[0]) for name in plan]
        assert len({round(x, 3) for x in logprobs}) == 3, logprobs
        own = alone[plan[b]]
        width = own.sequences.shape[1]
        assert torch.equal(mixed.sequences[b, :width], own.sequences[0])
        assert bool((mixed.sequences[b, width:] == PAD).all())
        torch.testing.assert_close(mixed.logprob[b], own.logprob[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            mixed.doc_posterior[b], own.doc_posterior[0], atol=1e-5, rtol=1e-5
        )


def _labels(batch: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(3, VOCAB, (batch, 5), generator=g)
    labels[:, -1] = EOS
    labels[0, 3:] = IGNORE_INDEX
    return labels


@pytest.mark.parametrize("loss_fn", [rag_token_nll, rag_sequence_nll])
def test_loss_with_mixed_adapters_equals_single_adapter_losses(loss_fn: Any) -> None:
    model = _bart()
    ids, mask, scores = _inputs(2, seed=2)
    labels = _labels(2, seed=3)
    common = {"n_docs": K, "decoder_start_token_id": EOS, "pad_token_id": PAD}
    with torch.no_grad():
        mixed = loss_fn(
            model, ids, mask, scores, labels, adapter_names=["qa"] * K + ["chat"] * K, **common
        )
        alone = [
            loss_fn(model, ids[b * K : (b + 1) * K], mask[b * K : (b + 1) * K], scores[b : b + 1],
                    labels[b : b + 1], adapter_names=[name] * K, **common)
            for b, name in enumerate(["qa", "chat"])
        ]  # fmt: skip
        swapped = loss_fn(
            model, ids, mask, scores, labels, adapter_names=["chat"] * K + ["qa"] * K, **common
        )
    assert abs(float(swapped - mixed)) > 1e-3  # the adapters differ
    torch.testing.assert_close(mixed, torch.stack(alone).mean(), atol=1e-5, rtol=1e-5)


def _train(model: PeftModel, loss: Any, steps: int) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(params, lr=0.05)
    history = []
    for step in range(steps):
        opt.zero_grad()
        value = loss()
        value.backward()
        if step == 0:
            grads = [p.grad for p in params]
            assert all(g is not None for g in grads)
            assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
        opt.step()
        history.append(float(value))
    return history


@pytest.mark.parametrize("loss_fn", [rag_token_nll, rag_sequence_nll])
def test_loss_trains_lora_weights(loss_fn: Any) -> None:
    model = _bart()
    model.set_adapter("qa")  # trainable: adapter qa only; the base stays frozen
    ids, mask, scores = _inputs(2, seed=4)
    labels = _labels(2, seed=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    history = _train(
        model,
        lambda: loss_fn(
            model, ids, mask, scores, labels, n_docs=K, decoder_start_token_id=EOS, pad_token_id=PAD
        ),
        steps=6,
    )
    assert history[-1] < history[0] - 0.5, history
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def _llama() -> PeftModel:
    return _lora(rag_llama(), ["q_proj", "v_proj", "up_proj"])


def test_causal_mixed_adapters_and_training() -> None:
    model = _llama()
    ids, mask, scores = _inputs(2, seed=6)
    common: dict[str, Any] = {
        "n_docs": K,
        "max_new_tokens": 6,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
    }
    mixed = causal_rag_token_generate(
        model, ids, mask, scores, adapter_names=["qa"] * K + ["chat"] * K, **common
    )
    for b, name in enumerate(["qa", "chat"]):
        rows = slice(b * K, (b + 1) * K)
        other_name = ["chat", "qa"][b]
        own = causal_rag_token_generate(
            model, ids[rows], mask[rows], scores[b : b + 1], adapter_names=[name] * K, **common
        )
        other = causal_rag_token_generate(
            model,
            ids[rows],
            mask[rows],
            scores[b : b + 1],
            adapter_names=[other_name] * K,
            **common,
        )
        assert abs(float(own.logprob[0] - other.logprob[0])) > 1e-3  # the adapters differ
        width = own.sequences.shape[1]
        assert torch.equal(mixed.sequences[b, :width], own.sequences[0])
        torch.testing.assert_close(mixed.logprob[b], own.logprob[0], atol=1e-5, rtol=1e-5)

    model.set_adapter("chat")
    labels = _labels(2, seed=7)
    for mode in ("token", "sequence"):
        history = _train(
            model,
            lambda mode=mode: rag_nll(
                family_for(model), model, ids, mask, scores, labels, mode=mode, n_docs=K
            ),
            steps=6,
        )
        assert history[-1] < history[0] - 0.5, (mode, history)
