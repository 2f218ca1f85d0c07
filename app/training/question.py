"""The question-encoder half of joint training, as the RAG paper does it: a LoRA on q(x), the
passage vectors d(z) and the index frozen, gradients through the retrieval scores.

For each question the scores are s(z) = q(x) . d(z) and the document prior p(z|x) is their
softmax over the top k; the token/sequence marginal likelihood (losses.py) then sends gradient
to both the generator and q(x) through p(z|x). concat puts every passage in one prompt and does
not use p(z|x), so options.py refuses --question-encoder with it.

Which passages: each question gets a fixed candidate set, fetched once before training with the
frozen encoder (the index's top `candidates`, 20 by default) or given in the data; at every step
the top k are re-picked *within* it by the current q(x). This is the paper's "retrieve with the
current question encoder" restricted to what the base encoder already ranks near the top:
  - d(z) of 20 candidates per question is computed once (the frozen passage encoder re-embeds
    them: the vectors an exact index holds, as the fingerprints agree, whatever the index's
    storage, which may be approximate), and re-picking costs a [C, dim] product per question,
    not a search;
  - a passage the base ranks below 20 cannot enter training; the RAG paper's questions, like
    the ones here, mostly have their gold passage in the base top 20 (94% on the demo corpus).
Scores use the encoder's own scale: MiniLM's vectors are normalized, so scores are cosines and
p(z|x) is close to uniform, as it is at serving time (RagService.prior_weights).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor

from app.retrieval.encoders import TextEncoder
from app.retrieval.question_tower import QuestionTower
from app.training.losses import Sample
from app.training.model import target_modules
from app.training.options import TrainOptions

log = logging.getLogger(__name__)

QUESTION_ADAPTER = "default"


@dataclass
class QuestionTraining:
    tower: QuestionTower
    model: PeftModel  # LoRA around a copy of the tower's transformer
    vectors: list[Tensor]  # per training sample, [C_i, dim] frozen passage vectors
    top_k: int


def add_question_lora(tower: QuestionTower, opts: TrainOptions) -> PeftModel:
    """A trainable LoRA around a copy of the question transformer (the original is untouched)."""
    transformer = tower.copy_transformer()
    layers = None
    if opts.question_last_layers is not None:
        n = int(getattr(transformer.config, "num_hidden_layers", 0))
        layers = list(range(max(0, n - opts.question_last_layers), n))
    torch.manual_seed(opts.seed)
    config = LoraConfig(
        r=opts.rank,
        lora_alpha=opts.alpha,  # type: ignore[arg-type]  # PEFT says int; floats work
        lora_dropout=opts.dropout,
        target_modules=target_modules(transformer, opts.question_target_modules),
        layers_to_transform=layers,
        bias="none",
    )
    model = get_peft_model(transformer, config, adapter_name=QUESTION_ADAPTER)
    assert isinstance(model, PeftModel)
    # the transformer's own folder (PEFT reads its config on save); the manifest holds the
    # encoder fingerprint that serving checks
    model.peft_config[QUESTION_ADAPTER].base_model_name_or_path = getattr(
        transformer.config, "name_or_path", None
    )
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "question-encoder LoRA on %s: %d trainable of %d", config.target_modules, trainable, total
    )
    return model


def candidate_vectors(encoder: TextEncoder, samples: Sequence[Sample]) -> list[Tensor]:
    """d(z) of every sample's candidate passages, [C_i, dim] each, from the frozen encoder.

    Re-embedded rather than read from the index: the index may store them approximately
    (IVF-PQ), and an exact flat index gives these same vectors (equal encoder fingerprints).
    Questions share many candidates, so each distinct passage is embedded once."""
    unique = list({p.id: p for s in samples for p in s.passages}.values())
    row = {p.id: i for i, p in enumerate(unique)}
    vectors = torch.from_numpy(encoder.encode_passages(unique))  # [distinct passages, dim]
    return [vectors[[row[p.id] for p in s.passages]] for s in samples]  # [C_i, dim] each


def pick_top_k(
    q: Tensor,  # [B, dim] question vectors (with gradient when training)
    samples: Sequence[Sample],
    vectors: Sequence[Tensor],  # [C_b, dim] each
    k: int,
) -> tuple[list[Sample], Tensor]:
    """Each question's k best candidates under q, and their scores [B, K] (-inf pads a question
    with fewer than K candidates); the scores keep q's gradient."""
    n_docs = min(k, max(len(s.passages) for s in samples))
    rows: list[Tensor] = []
    picked: list[Sample] = []
    for b, (s, d) in enumerate(zip(samples, vectors, strict=True)):
        scores = d.to(q.device, q.dtype) @ q[b]  # [C_b]
        top = torch.topk(scores.detach(), min(n_docs, len(s.passages))).indices  # [k_b]
        row = scores[top]
        if row.shape[0] < n_docs:
            row = torch.cat([row, row.new_full((n_docs - row.shape[0],), float("-inf"))])
        rows.append(row)
        passages = tuple(s.passages[int(i)] for i in top)
        given = tuple(float(x) for x in row[: len(top)].detach())
        picked.append(Sample(s.question, s.answer, passages, given))
    return picked, torch.stack(rows)  # [B, K]


def retrieve_with(
    tower: QuestionTower,
    model: torch.nn.Module | None,
    samples: Sequence[Sample],
    vectors: Sequence[Tensor],
    k: int,
) -> list[Sample]:
    """Samples holding the top k of their candidates under the given question encoder
    (model=None: the frozen base), scores included; for evaluation."""
    if not samples:
        return []
    with torch.no_grad():
        q = tower.encode([s.question for s in samples], model)  # [B, dim]
        picked, _ = pick_top_k(q, samples, vectors, k)
    return picked


def trainable_parameters(q: QuestionTraining) -> list[torch.nn.Parameter]:
    return [p for p in q.model.parameters() if p.requires_grad]
