"""Make index/sources/demo.jsonl from the Wikipedia sample inside the gensim 4.4.0 wheel.

The wheel carries
gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2,
a 2016 English Wikipedia export (CC BY-SA). This script keeps its real articles (no
redirects, namespace 0), strips the wiki markup with a few regular expressions (templates,
references, tables, files and categories dropped; links and emphasis turned into their text;
the article is cut at "See also"/"References"), keeps articles with substantial text, caps each
at --max-words words (at a paragraph end) so the demo index builds in a minute or two on two
cores, and writes one JSON object per line: {"id", "title", "text", "url"}.

gensim is not a dependency of lorag; get the wheel once and unzip the one file:

    pip download --no-deps gensim==4.4.0 -d /tmp/g
    unzip -o /tmp/g/gensim-4.4.0-*.whl 'gensim/test/test_data/enwiki-*' -d /tmp/g
    python scripts/make_demo_corpus.py /tmp/g/gensim/test/test_data/enwiki-*.bz2

The stripping is deliberately simple (no full wikitext parser): it is good enough for readable
100-word passages, not for a faithful rendering.
"""

from __future__ import annotations

import argparse
import bz2
import html
import json
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger("make_demo_corpus")

SOURCE_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
STOP_SECTIONS = {
    "see also",
    "references",
    "notes",
    "external links",
    "further reading",
    "bibliography",
    "sources",
    "footnotes",
    "citations",
    "notes and references",
    "references and notes",
}
DROPPED_TAGS = ("ref", "gallery", "math", "timeline", "imagemap", "score", "syntaxhighlight",
                "source", "pre", "chem", "references")  # fmt: skip
LINK_PREFIXES_DROPPED = ("file:", "image:", "category:", "media:", "wikipedia:", "wp:")
_INTERLANGUAGE = re.compile(r"^:?[a-z]{2,3}(-[a-z]+)?:")
_TEMPLATE = re.compile(r"\{\{([^{}]*)\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")


@dataclass(frozen=True)
class Article:
    page_id: str
    revision: str
    title: str
    wikitext: str


def iter_articles(path: Path) -> Iterator[Article]:
    """Pages of namespace 0 that are not redirects."""
    with bz2.open(path, "rb") as handle:
        for _, element in ET.iterparse(handle):
            if not element.tag.endswith("}page"):
                continue
            ns = element.tag[: -len("page")]
            redirect = element.find(f"{ns}redirect") is not None
            text = element.findtext(f"{ns}revision/{ns}text") or ""
            if element.findtext(f"{ns}ns") == "0" and not redirect:
                yield Article(
                    page_id=element.findtext(f"{ns}id") or "",
                    revision=element.findtext(f"{ns}revision/{ns}id") or "",
                    title=element.findtext(f"{ns}title") or "",
                    wikitext=text,
                )
            element.clear()


def _template(match: re.Match[str]) -> str:
    """Keep the text of a few inline templates ({{convert|5|km}} -> "5 km"); drop the rest."""
    parts = [p.strip() for p in match.group(1).split("|")]
    name = parts[0].lower()
    args = [p for p in parts[1:] if "=" not in p]
    if name in ("convert", "cvt") and len(args) >= 2:
        return f"{args[0]} {args[1]}"
    if name in ("lang", "transl") and args:
        return args[-1]
    if name.startswith("lang-") and args:
        return args[0]
    if name in ("nowrap", "nobr", "small", "big", "smallcaps", "em", "mvar", "math") and args:
        return args[0]
    return ""


def _link(match: re.Match[str]) -> str:
    target, _, label = match.group(1).partition("|")
    lowered = target.strip().lower()
    if lowered.startswith(LINK_PREFIXES_DROPPED) or _INTERLANGUAGE.match(lowered):
        return ""
    return (label.rpartition("|")[2] if label else target).strip()


def _repeat(pattern: re.Pattern[str], repl: object, text: str) -> str:
    """Apply innermost-first until nothing matches (templates and links nest)."""
    while True:
        new = pattern.sub(repl, text)  # type: ignore[call-overload]
        if new == text:
            return text
        text = new


def strip_markup(wikitext: str) -> str:
    """Plain paragraphs (separated by blank lines) of an article's body."""
    text = re.sub(r"<!--.*?-->", "", wikitext, flags=re.DOTALL)
    for tag in DROPPED_TAGS:
        text = re.sub(rf"<{tag}\b[^>]*/>", "", text, flags=re.IGNORECASE)
        text = re.sub(rf"<{tag}\b[^>]*>.*?</{tag}\s*>", "", text, flags=re.DOTALL | re.IGNORECASE)
    text = _repeat(_TEMPLATE, _template, text)
    text = _repeat(_TABLE, "", text)
    text = _repeat(_LINK, _link, text)
    text = _EXTERNAL.sub(r"\1", text)
    text = re.sub(r"'{2,5}", "", text)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.IGNORECASE)
    text = re.sub(r"<[^<>]{1,200}>", "", text)
    text = html.unescape(text).replace("\u00a0", " ")
    text = re.sub(r"__[A-Z]+__", "", text)
    return _paragraphs(text)


def _paragraphs(text: str) -> str:
    paragraphs: list[str] = []
    current: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading and heading.group(2).lower() in STOP_SECTIONS:
            break
        # table rows, and image captions whose nested brackets defeated the link pattern
        unparsed_file = line.lower().startswith(tuple("[[" + p for p in LINK_PREFIXES_DROPPED))
        if not line or heading or unparsed_file or line.startswith(("|", "!", "{", "}")):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)
        if line:
            current.append(line)
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(p for p in (_tidy(p) for p in paragraphs) if len(p.split()) >= 5)


def _tidy(paragraph: str) -> str:
    paragraph = re.sub(r"\[\[|\]\]|\{\{|\}\}", "", paragraph)  # brackets of unparsed leftovers
    paragraph = re.sub(r"\(\s*[,;:]?\s*\)", "", paragraph)  # "Albedo () or" after an IPA template
    paragraph = re.sub(r"\(\s*[,;]\s*", "(", paragraph)
    paragraph = re.sub(r"\s+([,.;:!?)])", r"\1", paragraph)
    return re.sub(r"\s{2,}", " ", paragraph).strip()


def cap_words(text: str, max_words: int) -> str:
    """Whole paragraphs while they fit in max_words (at least the first one, cut if needed)."""
    kept: list[str] = []
    count = 0
    for paragraph in text.split("\n\n"):
        n = len(paragraph.split())
        if count + n > max_words:
            if not kept:
                kept.append(" ".join(paragraph.split()[:max_words]))
            break
        kept.append(paragraph)
        count += n
    return "\n\n".join(kept)


def make_records(source: Path, *, min_words: int, max_words: int) -> list[dict[str, str]]:
    records = []
    for article in iter_articles(source):
        text = strip_markup(article.wikitext)
        n = len(text.split())
        if n < min_words or article.title.endswith("(disambiguation)"):
            log.info("skipping %r: %d words", article.title, n)
            continue
        title = article.title
        records.append(
            {
                "id": title.replace(" ", "_"),
                "title": title,
                "text": cap_words(text, max_words),
                "url": "https://en.wikipedia.org/w/index.php?"
                f"title={quote(title.replace(' ', '_'))}&oldid={article.revision}",
            }
        )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help=f"path to {SOURCE_NAME}")
    parser.add_argument("--out", type=Path, default=Path("index/sources/demo.jsonl"))
    parser.add_argument("--min-words", type=int, default=300)
    parser.add_argument("--max-words", type=int, default=4000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    records = make_records(args.source, min_words=args.min_words, max_words=args.max_words)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    words = sum(len(r["text"].split()) for r in records)
    log.warning("wrote %d articles, %d words, to %s", len(records), words, args.out)


if __name__ == "__main__":
    main()
