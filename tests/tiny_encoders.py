"""Tiny, seeded retrieval encoders for tests: a sentence-transformers folder and DPR encoders.

Both wrap a 2-layer BERT (hidden HIDDEN) over a word-level vocabulary of WORDS, saved to a folder
with a BertTokenizer made from a vocab file written here, so tests load them through
load_encoder, the same path a hub id or a real checkpoint takes. Text made of WORDS tokenizes
without [UNK].
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizer, DPRConfig

WORDS = [
    *("the", "a", "of", "and", "is", "was", "in", "glacier", "ice", "snow", "flows", "piano"),
    *("strings", "hammer", "bread", "yeast", "lake", "eel", "clock", "tide", "who", "what"),
    *("where", "how", "why", "did", "does", "made", "sound", "rises", "forms"),
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
HIDDEN = 32


def save_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIALS + WORDS) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(folder)


def bert_kwargs() -> dict[str, int]:
    """The tiny BERT's shape, shared by the sentence-transformers model and DPR."""
    return {
        "vocab_size": len(SPECIALS) + len(WORDS),
        "hidden_size": HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    }


def tiny_sentence_transformer(root: Path, *, seed: int = 0) -> Path:
    """A real sentence-transformers folder (BERT + mean Pooling + Normalize) at root/tiny-st;
    the bare BERT with its tokenizer lies at root/bert."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    torch.manual_seed(seed)
    BertModel(BertConfig(**bert_kwargs())).save_pretrained(root / "bert")
    save_tokenizer(root / "bert")
    model = SentenceTransformer(
        modules=[Transformer(str(root / "bert")), Pooling(HIDDEN, "mean"), Normalize()],
        device="cpu",
    )
    model.save(str(root / "tiny-st"))
    return root / "tiny-st"


def dpr_folder(root: Path, cls: type, seed: int, projection_dim: int = 0) -> Path:
    """A DPR encoder of class cls (question or context) saved under root, named by its args."""
    torch.manual_seed(seed)
    folder = root / f"{cls.__name__}-{seed}-{projection_dim}"
    cls(DPRConfig(**bert_kwargs(), projection_dim=projection_dim)).save_pretrained(folder)
    save_tokenizer(folder)
    return folder
