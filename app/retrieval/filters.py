"""The metadata filter grammar, one definition for every store.

A filter is a JSON object over a document's metadata; its keys combine with AND:

    {"lang": "en"}                          equal (strings, numbers, booleans, null; typed:
                                            true is not 1, and "1" is not 1; 1 equals 1.0)
    {"lang": {"$in": ["en", "de"]}}         equal to one of a non-empty list
    {"lang": {"$ne": "en"}}                 not equal (a document without the key matches)
    {"year": {"$gte": 2000, "$lt": 2010}}   $gt $gte $lt $lte: the value is a number (not a
                                            boolean) and compares so; anything else fails them

Anything else (`$or`, `$regex`, a list or object as a value, a non-number for $gt) raises
InvalidInputError naming the operator and key (HTTP 422). `parse` returns a MetadataFilter
whose `matches` is the FAISS store's predicate (turned into an id selector applied inside the
search) and whose `sql` is the Postgres store's condition over a jsonb column; tests check
both on the same documents.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from app.errors import InvalidInputError

Scalar = str | int | float | bool | None
Op = Literal["$eq", "$in", "$ne", "$gt", "$gte", "$lt", "$lte"]
_RANGE: dict[str, str] = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
OPERATORS = ("$in", "$ne", *_RANGE)


@dataclass(frozen=True)
class Condition:
    key: str
    op: Op
    value: Any  # a Scalar; for $in a tuple of them; for ranges an int or float

    def matches(self, metadata: Mapping[str, Any]) -> bool:
        present = self.key in metadata
        got = metadata.get(self.key)
        if self.op == "$eq":
            return present and _equal(got, self.value)
        if self.op == "$ne":
            return not (present and _equal(got, self.value))
        if self.op == "$in":
            return present and any(_equal(got, v) for v in self.value)
        if not _is_number(got):
            return False
        if self.op == "$gt":
            return bool(got > self.value)
        if self.op == "$gte":
            return bool(got >= self.value)
        if self.op == "$lt":
            return bool(got < self.value)
        return bool(got <= self.value)


@dataclass(frozen=True)
class MetadataFilter:
    conditions: tuple[Condition, ...]

    def matches(self, metadata: Mapping[str, Any]) -> bool:
        return all(c.matches(metadata) for c in self.conditions)

    def sql(self, column: str = "metadata") -> tuple[str, list[Any]]:
        """A boolean SQL condition over the jsonb `column` and its parameters (%s style; the
        jsonb ones as JSON text, cast in the SQL). `column` is the caller's identifier."""
        parts: list[str] = []
        params: list[Any] = []
        for c in self.conditions:
            if c.op in ("$eq", "$ne"):
                # containment is typed equality for scalars (1 = 1.0, true <> 1), as _equal
                expr = f"{column} @> %s::jsonb"
                parts.append(expr if c.op == "$eq" else f"NOT ({expr})")
                params.append(json.dumps({c.key: c.value}))
            elif c.op == "$in":
                parts.append(f"{column} @> ANY(%s::jsonb[])")
                params.append([json.dumps({c.key: v}) for v in c.value])
            else:
                # CASE, not AND: SQL does not promise to test the type before the cast
                parts.append(
                    f"CASE WHEN jsonb_typeof({column} -> %s) = 'number' "
                    f"THEN ({column} ->> %s)::numeric {_RANGE[c.op]} %s ELSE false END"
                )
                params.extend([c.key, c.key, c.value])
        return (" AND ".join(parts) or "true"), params


def parse(raw: object) -> MetadataFilter | None:
    """The filter of a request (None or an empty object: no filter), or InvalidInputError."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InvalidInputError(f"filter must be a JSON object, got {type(raw).__name__}")
    conditions: list[Condition] = []
    for key, cond in raw.items():
        if not isinstance(key, str) or not key:
            raise InvalidInputError(f"filter key {key!r} must be a non-empty string")
        if key.startswith("$"):
            raise InvalidInputError(
                f"filter operator {key!r} is not supported at the top level (keys combine "
                f"with AND; operators go under a key: {', '.join(OPERATORS)})"
            )
        if isinstance(cond, Mapping):
            if not cond:
                raise InvalidInputError(f"filter on {key!r}: empty operator object")
            conditions.extend(_operator(key, str(op), value) for op, value in cond.items())
        else:
            conditions.append(Condition(key, "$eq", _scalar(key, "equality", cond)))
    return MetadataFilter(tuple(conditions)) if conditions else None


def _operator(key: str, op: str, value: object) -> Condition:
    if op == "$in":
        if not isinstance(value, list | tuple) or not value:
            raise InvalidInputError(f"filter on {key!r}: $in needs a non-empty list")
        return Condition(key, "$in", tuple(_scalar(key, op, v) for v in value))
    if op == "$ne":
        return Condition(key, "$ne", _scalar(key, op, value))
    if op in _RANGE:
        if not _is_number(value) or not math.isfinite(float(value)):  # type: ignore[arg-type]
            raise InvalidInputError(f"filter on {key!r}: {op} needs a finite number, got {value!r}")
        return Condition(key, op, value)  # type: ignore[arg-type]
    raise InvalidInputError(
        f"filter on {key!r}: unknown operator {op!r} (supported: {', '.join(OPERATORS)})"
    )


def _scalar(key: str, op: str, value: object) -> Scalar:
    if value is None or isinstance(value, str | bool | int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInputError(f"filter on {key!r}: {op} value {value!r} is not finite")
        return value
    raise InvalidInputError(
        f"filter on {key!r}: {op} compares with a string, number, boolean or null, "
        f"got {type(value).__name__}"
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _equal(got: object, want: object) -> bool:
    """Typed equality, as jsonb's: numbers by value (1 == 1.0), booleans only with booleans."""
    if _is_number(want):
        return _is_number(got) and got == want
    if isinstance(want, bool):
        return isinstance(got, bool) and got is want
    return type(got) is type(want) and got == want
