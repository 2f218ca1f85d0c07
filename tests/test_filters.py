"""The metadata filter grammar: refusals by name, and the same answer from its Python predicate
(the FAISS store's) and its SQL (the Postgres store's) on a real PostgreSQL, document by
document, over filters that probe types, missing keys and ranges."""

from __future__ import annotations

import json

import psycopg
import pytest
from psycopg.types.json import Jsonb

from app.errors import InvalidInputError
from app.retrieval.filters import parse

DOCS: dict[str, dict[str, object]] = {
    "a": {"lang": "en", "year": 1999, "draft": False, "score": 0.5},
    "b": {"lang": "de", "year": 2005, "draft": True},
    "c": {"lang": "en", "year": 2010.0, "tag": None},
    "d": {"lang": "fr", "year": "2005"},  # a string year: no range matches it
    "e": {"year": 1, "draft": 1},  # 1 is not true
    "f": {},
}

FILTERS: list[tuple[dict[str, object], set[str]]] = [
    ({"lang": "en"}, {"a", "c"}),
    ({"year": 2010}, {"c"}),  # 2010 equals 2010.0
    ({"year": "2005"}, {"d"}),
    ({"draft": True}, {"b"}),
    ({"draft": 1}, {"e"}),
    ({"tag": None}, {"c"}),
    ({"lang": {"$in": ["de", "fr"]}}, {"b", "d"}),
    ({"lang": {"$ne": "en"}}, {"b", "d", "e", "f"}),
    ({"year": {"$gte": 2005}}, {"b", "c"}),
    ({"year": {"$gt": 1, "$lt": 2006}}, {"a", "b"}),
    ({"year": {"$lte": 1}}, {"e"}),
    ({"lang": "en", "year": {"$lt": 2000}}, {"a"}),
    ({"score": {"$gt": 0.25}}, {"a"}),
    ({"nothing": {"$ne": 3}}, set(DOCS)),
    ({}, set(DOCS)),
]


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        ({"$or": [{"a": 1}]}, "'\\$or'"),
        ({"lang": {"$regex": "e.*"}}, "'\\$regex'.*'lang'|'lang'.*'\\$regex'"),
        ({"year": {"$gt": "2000"}}, "'year'.*\\$gt"),
        ({"year": {"$gt": True}}, "'year'.*\\$gt"),
        ({"lang": ["en"]}, "'lang'"),
        ({"lang": {"$in": []}}, "'lang'.*\\$in"),
        ({"lang": {"$in": [["en"]]}}, "'lang'.*\\$in"),
        ({"lang": {}}, "'lang'"),
        ([{"lang": "en"}], "JSON object"),
    ],
)
def test_bad_filters_are_refused_by_name(raw: object, names: str) -> None:
    with pytest.raises(InvalidInputError, match=names):
        parse(raw)


def test_predicate_and_sql_agree_on_every_document(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE d (id text PRIMARY KEY, metadata jsonb NOT NULL)")
        for doc_id, meta in DOCS.items():
            conn.execute("INSERT INTO d VALUES (%s, %s)", (doc_id, Jsonb(meta)))
        for raw, expected in FILTERS:
            f = parse(raw)
            by_python = {d for d, m in DOCS.items() if f is None or f.matches(m)}
            where, params = f.sql("metadata") if f is not None else ("true", [])
            rows = conn.execute(f"SELECT id FROM d WHERE {where}", params).fetchall()
            by_sql = {r[0] for r in rows}
            assert by_python == expected, json.dumps(raw)
            assert by_sql == expected, json.dumps(raw)
