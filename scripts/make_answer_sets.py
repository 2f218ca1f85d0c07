"""Question sets for bench/answer_quality.py and the demo adapters, from the demo corpus.

Deterministic (no model, no hub): rerun it and the files come out byte for byte the same.

- answerable: definitional sentences "X is a Y ..." of the corpus (scripts/make_demo_tasks.py's
  extraction) give "What is X?" -> "a Y", with the document and the 100-word passage (the
  index's chunking, so ids match index/demo) that hold the answer;
- unanswerable: questions on topics the corpus lacks, each kept only if none of its key terms
  occurs anywhere in the corpus text (word match, any case): checked by search, not assumed.

Articles are split before questions are drawn: every fifth article (by corpus order) is
held out, so no held-out question, answer or passage appears in the adapters' training data.
Unanswerable questions alternate between train and held-out.

With --tasks-dir it also writes the demo adapters' training data (`lorag adapter train`'s
format, passages given) from the train splits only:
- concise.jsonl: the short answer, over the passage holding it and one from another article;
- cited.jsonl: "X is Y [n]." with n the position of the passage holding it;
- grounded.jsonl: the short answer as concise; and for every third train question, the same
  question over two passages of other articles, and each unanswerable train question over two
  random passages, answered with the service's abstention text.

    .venv/bin/python -m scripts.make_answer_sets --tasks-dir /tmp/lorag-demo-tasks
    # bench/data/{answerable,unanswerable}_{train,heldout}.jsonl (+ the three task files)
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
from collections.abc import Iterable
from pathlib import Path

from app.contracts import Passage
from app.generation.abstain import ABSTAIN_TEXT
from app.retrieval.chunking import chunk_document
from app.retrieval.sources import read_sources
from scripts.make_demo_tasks import Fact, facts_of, question

log = logging.getLogger("make_answer_sets")

HELDOUT_EVERY = 5  # every fifth article is held out
PER_ARTICLE = {"train": 12, "heldout": 3}

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


def _record(f: Fact, passage_id: str) -> dict[str, str]:
    return {
        "question": question(f),
        "answer": f.answer,
        "doc_id": f.passage.doc_id,
        "passage_id": passage_id,
        "passage": f.passage.text,
        "title": f.title,
    }


def answerable(source: Path) -> dict[str, list[dict[str, str]]]:
    sets: dict[str, list[dict[str, str]]] = {"train": [], "heldout": []}
    for n, doc in enumerate(read_sources([source])):
        split = "heldout" if n % HELDOUT_EVERY == 0 else "train"
        seen: set[str] = set()
        taken = 0
        for p in chunk_document(doc.id, doc.title, doc.text, words=100):
            for f in facts_of(p):
                q = question(f)
                # one answer per question, and the subject must be a name, not a stray word
                if q in seen or taken == PER_ARTICLE[split] or len(f.subject) < 3:
                    continue
                seen.add(q)
                sets[split].append(_record(f, p.id))
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


def tasks(
    train: list[dict[str, str]], negatives: list[dict[str, object]], pool: list[Passage], seed: int
) -> dict[str, list[dict[str, object]]]:
    """The three demo tasks over the train split; pool: passages of train articles only."""
    rng = random.Random(seed)
    out: dict[str, list[dict[str, object]]] = {"concise": [], "cited": [], "grounded": []}

    def other(doc_id: str) -> dict[str, str]:
        while True:
            p = rng.choice(pool)
            if p.doc_id != doc_id:
                return {"title": p.title, "text": p.text}

    for n, q in enumerate(train):
        gold = rng.randrange(2)
        shown = [other(q["doc_id"]), other(q["doc_id"])]
        shown[gold] = {"title": q["title"], "text": q["passage"]}
        subject = re.sub(
            r"^(?:In the article on [^,]+, )?\w+ (is|was|are|were) ", "", q["question"]
        )
        verb = q["question"].split()[1] if not q["question"].startswith("In the") else "is"
        sentence = f"{subject.rstrip('?')} {verb} {q['answer']} [{gold + 1}]."
        sentence = sentence[0].upper() + sentence[1:]
        out["concise"].append({"question": q["question"], "answer": q["answer"], "passages": shown})
        out["cited"].append({"question": q["question"], "answer": sentence, "passages": shown})
        out["grounded"].append(
            {"question": q["question"], "answer": q["answer"], "passages": shown}
        )
        if n % 3 == 0:
            lacking = [other(q["doc_id"]), other(q["doc_id"])]
            out["grounded"].append(
                {"question": q["question"], "answer": ABSTAIN_TEXT, "passages": lacking}
            )
    for u in negatives:
        lacking = [other(""), other("")]
        out["grounded"].append(
            {"question": u["question"], "answer": ABSTAIN_TEXT, "passages": lacking}
        )
    for rows in out.values():
        rng.shuffle(rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("index/sources/demo.jsonl"))
    parser.add_argument("--out-dir", type=Path, default=Path("bench/data"))
    parser.add_argument("--tasks-dir", type=Path, default=None)
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
        held = {q["doc_id"] for q in asets["heldout"]}
        pool = [
            p
            for d in read_sources([args.source])
            if d.id not in held
            for p in chunk_document(d.id, d.title, d.text, words=100)
        ]
        args.tasks_dir.mkdir(parents=True, exist_ok=True)
        for task, trows in tasks(asets["train"], usets["train"], pool, args.seed).items():
            n = write(args.tasks_dir / f"{task}.jsonl", trows)
            log.info("task %s: %d examples", task, n)


if __name__ == "__main__":
    main()
