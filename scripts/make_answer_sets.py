"""Question sets for bench/answer_quality.py and the demo adapters, from the demo corpus.

Deterministic (no model, no hub): rerun it and the files come out byte for byte the same.

- answerable, two shapes from the corpus's definitional sentences "X is a Y ..."
  (scripts/make_demo_tasks.py's extraction), each with the document and the 100-word passage
  (the index's chunking, so ids match index/demo) that hold the answer:
  - forward: "What is X?" -> "a Y";
  - reverse, from "X is the Y ...": "What is the Y ...?" -> "X", a name, as "What is the capital
    of Alaska?" wants (the forward shape alone taught the adapters to answer every "What is
    ...?" with a noun phrase, "the capital of Alaska");
- unanswerable: questions on topics the corpus lacks, each kept only if none of its key terms
  occurs anywhere in the corpus text (word match, any case): checked by search, not assumed.

Articles are split before questions are drawn: every fifth article (by corpus order) is
held out, so no held-out question, answer or passage appears in the adapters' training data.
Unanswerable questions alternate between train and held-out.

With --tasks-dir it also writes the demo adapters' training data (`lorag adapter train`'s
format, passages given) from the train splits only. Each question's passages are what the
server would show it: the default encoder's top 5 over index/demo in score order, of train
articles only (so no held-out passage is in the data either). A question whose passage holding
the answer is not among them is left out (its answer is not there to learn to read, and a
forced place would teach a citation the server never shows):
- concise.jsonl: the short answer;
- cited.jsonl: the answer with "[n]", n the position of the passage holding it, each question
  in score order and in `--cited-orders` - 1 shuffled orders (default 1). `--cited short` (the
  default) answers as concise does, "Juneau [1]."; `--cited sentence` as a sentence, "Juneau
  is the capital of Alaska [1]." (which the 135M generator learned to begin with the question's
  subject: "Alaska is the capital of Alaska [1].");
- grounded.jsonl: the short answer as concise; and for every third train question
  (`--lacking-every`), the same question over the top 5 of other articles (the passages a
  search finds when the corpus lacks the answer), and each unanswerable train question over its
  own top 5 (`--unanswerable-copies` times), answered with the service's abstention text.

    .venv/bin/python -m scripts.make_answer_sets --tasks-dir /tmp/lorag-demo-tasks
    # bench/data/{answerable,unanswerable}_{train,heldout}.jsonl (+ the three task files; these
    # load the default encoder and index/demo: run `lorag prepare` first)
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from app.contracts import Passage
from app.generation.abstain import ABSTAIN_TEXT
from app.retrieval.chunking import chunk_document
from app.retrieval.sources import read_sources
from scripts.make_demo_tasks import (
    CUT,
    DEFINITION,
    PRONOUNS,
    VAGUE,
    facts_of,
    question,
    short_phrase,
)

log = logging.getLogger("make_answer_sets")

HELDOUT_EVERY = 5  # every fifth article is held out
PER_ARTICLE = {"train": 12, "heldout": 3}  # forward questions; reverse ones: REVERSE_PER_ARTICLE
REVERSE_PER_ARTICLE = {"train": 6, "heldout": 2}
TOP_K = 5  # the passages each training question is shown: the server's default top_k
MAX_RELATION_WORDS = 10
# words that end a reverse question's relation ("the highest mountain in North America")
RELATION_CUT = (CUT - {"in", "of", "on", "at", "for", "to", "from", "by", "with"}) | {
    "because",
    "including",
}
# a relation must end in a noun: not a superlative or adjective left without one ("the Earth's
# largest", "the 30th-most extensive")
NOT_A_NOUN = re.compile(r"(?:est|most|extensive|populous|famous)$")
NOT_NAMES = {"examples", "example", "others", "many", "some", "several", "each"}
PERSON_NOUNS = {"son", "daughter", "child", "wife", "husband", "niece", "nephew", "grandson",
                "granddaughter", "father", "mother", "brother", "sister", "bishop", "king",
                "queen", "president", "founder", "head", "leader", "author", "protagonist",
                "hero", "heroine", "player", "poet", "writer", "composer", "member", "man",
                "woman", "person", "philosopher", "scientist", "general"}  # fmt: skip

# (question, key terms: none may occur in the corpus)
OFF_CORPUS: list[tuple[str, list[str]]] = [
    ("Who wrote Hamlet?", ["Hamlet"]),
    ("What is the boiling point of water at sea level?", ["boiling point"]),
    ("Who painted the Mona Lisa?", ["Mona Lisa"]),
    ("What is the capital of Japan?", ["Japan", "Tokyo"]),
    ("How many players are on a cricket team?", ["cricket"]),
    ("What is photosynthesis?", ["photosynthesis"]),
    ("Who discovered penicillin?", ["penicillin"]),
    ("What is the tallest mountain in Africa?", ["Kilimanjaro"]),
    ("When did the Berlin Wall fall?", ["Berlin Wall"]),
    ("What language is spoken in Brazil?", ["Brazil"]),
    ("Who composed the Four Seasons?", ["Vivaldi", "Four Seasons"]),
    ("What is the chemical formula of table salt?", ["NaCl", "table salt"]),
    ("How does a refrigerator work?", ["refrigerator"]),
    ("Who invented the telephone?", ["telephone"]),
    ("What is the population of Canada?", ["Canada"]),
    ("What is a black hole?", ["black hole"]),
    ("Who was the first woman to win a Nobel Prize?", ["Marie Curie", "Curie"]),
    ("What is the speed of sound in air?", ["speed of sound"]),
    ("What does DNA stand for?", ["DNA", "deoxyribonucleic"]),
    ("Who directed Jurassic Park?", ["Jurassic Park", "Spielberg"]),
    ("What is the capital of Australia?", ["Canberra", "Australia"]),
    ("What is the largest planet in the solar system?", ["Jupiter"]),
    ("How many bones are in the human body?", ["bones in the human body"]),
    ("Who founded Microsoft?", ["Microsoft"]),
    ("What is the currency of Switzerland?", ["Swiss franc", "Switzerland"]),
    ("What is the main ingredient of guacamole?", ["guacamole", "avocado"]),
    ("Who wrote Pride and Prejudice?", ["Pride and Prejudice", "Jane Austen"]),
    ("What is the freezing point of mercury?", ["freezing point"]),
    ("How tall is the Eiffel Tower?", ["Eiffel"]),
    ("What is a volcano?", ["volcano", "volcanoes"]),
    ("Who is the author of The Hobbit?", ["Hobbit", "Tolkien"]),
    ("What sport does Lionel Messi play?", ["Messi"]),
    ("What is the longest river in South America?", ["Amazon River"]),
    ("When was the printing press invented?", ["printing press"]),
    ("What is the function of the liver?", ["liver"]),
    ("Who was Napoleon Bonaparte?", ["Napoleon"]),
    ("What is the capital of Kenya?", ["Kenya", "Nairobi"]),
    ("How do vaccines work?", ["vaccine", "vaccines"]),
    ("What is quantum entanglement?", ["entanglement"]),
    ("Who built the Great Wall of China?", ["Great Wall"]),
    ("What is the recipe for pancakes?", ["pancake", "pancakes"]),
    ("What is the main export of Chile?", ["Chile"]),
    ("Who won the 2010 FIFA World Cup?", ["FIFA"]),
    ("What is a tsunami?", ["tsunami"]),
    ("What is the capital of Norway?", ["Norway", "Oslo"]),
    ("Who wrote the Odyssey?", ["Odyssey"]),
    ("What is the Pythagorean theorem?", ["Pythagorean"]),
    ("How many moons does Mars have?", ["Phobos", "Deimos"]),
    ("What is the capital of Peru?", ["Peru", "Lima"]),
    ("Who was Cleopatra?", ["Cleopatra"]),
    ("What are the rules of chess?", ["chess"]),
    ("What is the capital of Egypt?", ["Cairo"]),
    ("Who invented the light bulb?", ["light bulb", "Edison"]),
    ("What does a cardiologist treat?", ["cardiologist", "cardiology"]),
    ("What is the national animal of Scotland?", ["Scotland", "unicorn"]),
    ("How long is a marathon?", ["marathon"]),
    ("What is the smallest country in Europe?", ["Vatican"]),
    ("Who discovered gravity?", ["Isaac Newton", "Newton"]),
    ("What is an earthquake?", ["earthquake", "earthquakes"]),
    ("What is the capital of Argentina?", ["Argentina", "Buenos Aires"]),
    ("Who won the 1998 Tour de France?", ["Tour de France"]),
    ("What is a blockchain?", ["blockchain"]),
    ("What is sushi made of?", ["sushi"]),
    ("Who is Taylor Swift?", ["Taylor Swift"]),
    ("What is the Higgs boson?", ["Higgs"]),
    ("How do I reset my router?", ["router"]),
    ("What is Bitcoin?", ["Bitcoin"]),
    ("What is the plot of Star Wars?", ["Star Wars"]),
    ("Who wrote Harry Potter?", ["Harry Potter", "Rowling"]),
    ("What is a smartphone?", ["smartphone"]),
    ("What is yoga?", ["yoga"]),
    ("Who is the CEO of Tesla?", ["Tesla"]),
    ("What is the capital of Thailand?", ["Thailand", "Bangkok"]),
    ("What is a kangaroo?", ["kangaroo"]),
    ("How is cheese made?", ["cheese"]),
    ("Who was Genghis Khan?", ["Genghis"]),
    ("What is a hurricane?", ["hurricane"]),
    ("What is the Taj Mahal?", ["Taj Mahal"]),
    ("Who is Beyonce?", ["Beyonce", "Beyoncé"]),
    ("What do penguins eat?", ["penguin", "penguins"]),
    ("What is the offside rule in football?", ["offside"]),
    ("Who painted The Starry Night?", ["Starry Night", "van Gogh"]),
    ("What is a croissant?", ["croissant"]),
    ("What is the capital of Vietnam?", ["Vietnam", "Hanoi"]),
    ("How does Wi-Fi work?", ["Wi-Fi", "wireless network"]),
    ("What is a koala?", ["koala"]),
]


def _word_re(term: str) -> re.Pattern[str]:
    return re.compile(r"\b" + re.escape(term) + r"\b", re.IGNORECASE)


def absent(terms: Iterable[str], texts: list[str]) -> bool:
    patterns = [_word_re(t) for t in terms]
    return not any(p.search(text) for p in patterns for text in texts)


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    sentence: str  # the answer as a sentence ("X is Y"): `--cited sentence`'s, before "[n]"
    passage: Passage
    shape: str  # "forward" or "reverse"


def forward(p: Passage) -> Iterator[Question]:
    for f in facts_of(p):
        if len(f.subject) < 3:  # the subject must be a name, not a stray word
            continue
        sentence = f"{f.subject} {f.verb} {f.answer}"
        yield Question(question(f), f.answer, sentence, p, "forward")


def _relation(obj: str) -> str | None:
    """ "the Y ..." up to the first clause word, at most MAX_RELATION_WORDS and at least 3 words,
    ending in a noun."""
    kept = short_phrase(obj, cut=RELATION_CUT, most=MAX_RELATION_WORDS, least=3)
    if kept is None or NOT_A_NOUN.search(kept.split()[-1]):
        return None
    return kept


def reverse(p: Passage) -> Iterator[Question]:
    """ "X is the Y ..." -> "What is the Y ...?" -> "X", where X is a name (capitalized words)."""
    for m in DEFINITION.finditer(p.text):
        subj, verb, obj = m["subj"], m["verb"], m["obj"]
        words = subj.split()
        lowered = {w.lower() for w in words}
        if not obj.startswith("the ") or (VAGUE | NOT_NAMES).intersection(lowered):
            continue
        if (
            words[0].lower() in PRONOUNS
            or words[0] == "The"
            or not all(w[0].isupper() for w in words)
        ):
            continue
        relation = _relation(obj)
        if relation is None or subj.lower() in relation.lower():
            continue
        wh = "Who" if PERSON_NOUNS.intersection(relation.lower().split()) else "What"
        yield Question(f"{wh} {verb} {relation}?", subj, f"{subj} {verb} {relation}", p, "reverse")


def _record(q: Question) -> dict[str, str]:
    return {
        "question": q.question,
        "answer": q.answer,
        "sentence": q.sentence,
        "shape": q.shape,
        "doc_id": q.passage.doc_id,
        "passage_id": q.passage.id,
        "passage": q.passage.text,
        "title": q.passage.title,
    }


def answerable(source: Path) -> dict[str, list[dict[str, str]]]:
    sets: dict[str, list[dict[str, str]]] = {"train": [], "heldout": []}
    for n, doc in enumerate(read_sources([source])):
        split = "heldout" if n % HELDOUT_EVERY == 0 else "train"
        seen: set[str] = set()
        for shape, limit in ((forward, PER_ARTICLE), (reverse, REVERSE_PER_ARTICLE)):
            taken = 0
            for p in chunk_document(doc.id, doc.title, doc.text, words=100):
                for q in shape(p):
                    # one answer per question
                    if q.question in seen or taken == limit[split] or len(q.answer) < 3:
                        continue
                    seen.add(q.question)
                    sets[split].append(_record(q))
                    taken += 1
    return sets


def unanswerable(texts: list[str]) -> dict[str, list[dict[str, object]]]:
    sets: dict[str, list[dict[str, object]]] = {"train": [], "heldout": []}
    kept = 0
    for q, terms in OFF_CORPUS:
        if not absent(terms, texts):
            log.info("dropped (the corpus mentions %s): %s", terms, q)
            continue
        sets["heldout" if kept % 2 == 0 else "train"].append({"question": q, "absent": terms})
        kept += 1
    return sets


def write(path: Path, rows: Iterable[dict[str, object]] | Iterable[dict[str, str]]) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    return n


Shown = list[dict[str, str]]


def tasks(
    train: list[dict[str, str]],
    negatives: list[dict[str, object]],
    top: Callable[[str, str | None], list[Passage]],
    seed: int,
    cited: str = "short",
    cited_orders: int = 2,
    lacking_every: int = 3,
    unanswerable_copies: int = 1,
) -> dict[str, list[dict[str, object]]]:
    """The three demo tasks over the train split. top(question, without_doc): the TOP_K
    passages a search shows the question, best first, of train articles (and not of
    without_doc's article)."""
    rng = random.Random(seed)
    out: dict[str, list[dict[str, object]]] = {"concise": [], "cited": [], "grounded": []}

    def shown(passages: list[Passage]) -> Shown:
        return [{"title": p.title, "text": p.text} for p in passages]

    for n, q in enumerate(train):
        hits = top(q["question"], None)
        ids = [p.id for p in hits]
        if q["passage_id"] not in ids:  # the search misses the answer: nothing to learn from
            continue
        gold = ids.index(q["passage_id"])
        ps = shown(hits)
        said = q["sentence"] if cited == "sentence" else q["answer"]
        said = said[0].upper() + said[1:]
        sentence = f"{said} [{gold + 1}]."
        out["concise"].append({"question": q["question"], "answer": q["answer"], "passages": ps})
        out["cited"].append({"question": q["question"], "answer": sentence, "passages": ps})
        # and the same passages shuffled: in score order the answer's passage is first 2 times
        # in 3, so "[1]" alone would score 0.65; shuffled, only reading finds the passage
        for _ in range(cited_orders - 1):
            order = rng.sample(range(len(ps)), len(ps))
            moved = f"{said} [{order.index(gold) + 1}]."
            out["cited"].append(
                {"question": q["question"], "answer": moved, "passages": [ps[i] for i in order]}
            )
        out["grounded"].append({"question": q["question"], "answer": q["answer"], "passages": ps})
        if n % lacking_every == 0:
            lacking = shown(top(q["question"], q["doc_id"]))
            out["grounded"].append(
                {"question": q["question"], "answer": ABSTAIN_TEXT, "passages": lacking}
            )
    for u in negatives * unanswerable_copies:
        question_text = str(u["question"])
        out["grounded"].append(
            {
                "question": question_text,
                "answer": ABSTAIN_TEXT,
                "passages": shown(top(question_text, None)),
            }
        )
    for rows in out.values():
        rng.shuffle(rows)
    return out


def searcher(index: Path, held: set[str]) -> Callable[[str, str | None], list[Passage]]:
    """top(question, without_doc) over the built index with the default encoder."""
    from app.retrieval.encoders import load_encoder
    from app.retrieval.store import PassageIndex

    encoder = load_encoder("default", "sentence-transformers")
    passages = PassageIndex.load(index)

    def top(text: str, without: str | None) -> list[Passage]:
        depth = 512  # deep enough that TOP_K of train articles (not `without`) remain
        hits = passages.search(encoder.encode_questions([text]), depth)[0]
        leave_out = held | {without}
        kept = [h.passage for h in hits if h.passage.doc_id not in leave_out]
        if len(kept) < TOP_K:
            raise AssertionError(f"fewer than {TOP_K} train passages in the top {depth}: {text}")
        return kept[:TOP_K]

    return top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("index/sources/demo.jsonl"))
    parser.add_argument("--out-dir", type=Path, default=Path("bench/data"))
    parser.add_argument("--tasks-dir", type=Path, default=None)
    parser.add_argument("--index", type=Path, default=Path("index/demo"), help="for --tasks-dir")
    parser.add_argument(
        "--reverse-copies", type=int, default=1, help="each reverse question this many times"
    )
    parser.add_argument(
        "--cited", choices=("short", "sentence"), default="short", help="cited.jsonl's answers"
    )
    parser.add_argument(
        "--cited-orders",
        type=int,
        default=2,
        help="each cited question in score order and this many orders in all (shuffles)",
    )
    parser.add_argument(
        "--lacking-every",
        type=int,
        default=3,
        help="grounded: every Nth train question also over other articles' passages",
    )
    parser.add_argument(
        "--unanswerable-copies",
        type=int,
        default=1,
        help="grounded: each unanswerable train question this many times",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    texts = [f"{d.title}\n{d.text}" for d in read_sources([args.source])]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    asets, usets = answerable(args.source), unanswerable(texts)
    for split, rows in asets.items():
        n = write(args.out_dir / f"answerable_{split}.jsonl", rows)
        log.info("answerable %s: %d", split, n)
    for split, urows in usets.items():
        n = write(args.out_dir / f"unanswerable_{split}.jsonl", urows)
        log.info("unanswerable %s: %d", split, n)
    if args.tasks_dir is not None:
        held = {d.id for n, d in enumerate(read_sources([args.source])) if n % HELDOUT_EVERY == 0}
        top = searcher(args.index, held)
        args.tasks_dir.mkdir(parents=True, exist_ok=True)
        reverse = [q for q in asets["train"] if q["shape"] == "reverse"]
        train = asets["train"] + reverse * (args.reverse_copies - 1)
        for task, trows in tasks(
            train,
            usets["train"],
            top,
            args.seed,
            cited=args.cited,
            cited_orders=args.cited_orders,
            lacking_every=args.lacking_every,
            unanswerable_copies=args.unanswerable_copies,
        ).items():
            n = write(args.tasks_dir / f"{task}.jsonl", trows)
            log.info("task %s: %d examples", task, n)


if __name__ == "__main__":
    main()
