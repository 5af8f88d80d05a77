"""Column anonymisation for CSV/JSONL rows: drop, salted hash, mask, generalise.

`Anonymizer` applies `data.anonymize` rules to every row as it is read, before anything else
sees the data (splits, preprocessing, tokenizer, fingerprint, logs), and again to each record a
server receives, so a model sees requests exactly as it saw its training rows.

The salt of `hash` never leaves the process: it is read from an environment variable (named by
the rule's `salt_env`), and the package records only that name and a salt id, an HMAC of a
fixed message under the salt, so a server can tell the right salt from a wrong one. The id lets
someone holding the package test a guessed salt, which is why salts must be random and at least
`MIN_SALT_CHARS` long (e.g. `openssl rand -hex 32`).
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shipyard.data.config import ANONYMIZE_OPTIONS, AnonymizeRule
from shipyard.errors import DataError

MIN_SALT_CHARS = 16
_SALT_ID_MESSAGE = b"shipyard anonymize salt id v1"
TEXT_METHODS = frozenset({"hash", "mask"})  # their output is text, never a numeric feature


def salt_id(salt: bytes) -> str:
    """A public id of a salt: HMAC-SHA256 of a fixed message, first 16 hex digits."""
    return hmac.new(salt, _SALT_ID_MESSAGE, hashlib.sha256).hexdigest()[:16]


def read_salt(env: str, column: str) -> bytes:
    """The salt in environment variable `env`; DataError when unset or too short."""
    value = os.environ.get(env, "")
    if not value:
        raise DataError(
            f"anonymize: column {column!r} is hashed with the salt in ${env}, which is not set; "
            f"set it to a random secret of at least {MIN_SALT_CHARS} characters (e.g. "
            "`export " + env + "=$(openssl rand -hex 32)`) and keep it out of configs"
        )
    if len(value) < MIN_SALT_CHARS:
        raise DataError(
            f"anonymize: the salt in ${env} has {len(value)} characters; use a random secret of "
            f"at least {MIN_SALT_CHARS} (e.g. `openssl rand -hex 32`)"
        )
    return value.encode("utf-8")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def hash_value(value: Any, salt: bytes, chars: int) -> str:
    """HMAC-SHA256 of the value's text under `salt`, first `chars` hex digits."""
    return hmac.new(salt, _text(value).encode("utf-8"), hashlib.sha256).hexdigest()[:chars]


def mask_value(
    value: Any, keep_first: int, keep_last: int, char: str, pattern: re.Pattern[str] | None
) -> str:
    """Replace characters by `char`: every match of `pattern`, or all but the kept ends."""
    text = _text(value)
    if pattern is not None:
        return pattern.sub(lambda m: char * len(m.group(0)), text)
    n = len(text)
    first = min(keep_first, n)
    last = min(keep_last, n - first)
    return text[:first] + char * (n - first - last) + text[n - last :]


def generalize_value(value: Any, rule: AnonymizeRule, where: str) -> Any:
    """A coarser value: the bin's lower edge for numbers (step/edges), a prefix for text."""
    if rule.prefix is not None:
        return _text(value)[: rule.prefix]
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise DataError(
            f"anonymize: column {rule.column!r} is generalised by number but has {value!r} "
            f"({where}); fix the value or generalise it with prefix"
        )
    if rule.step is not None:
        out = math.floor(number / rule.step) * rule.step
    else:
        assert rule.edges is not None
        i = bisect.bisect_right(rule.edges, number) - 1
        out = rule.edges[max(i, 0)]
    return int(out) if float(out).is_integer() else out


@dataclass
class _Compiled:
    rule: AnonymizeRule
    salt: bytes | None
    pattern: re.Pattern[str] | None


class Anonymizer:
    """Applies anonymisation rules to rows (lists under a header) or records (dicts).

    Salts are read from the environment on first use, so rules that never hash, or records whose
    hashed columns are not needed, work without one.
    """

    def __init__(
        self, rules: Sequence[AnonymizeRule], expected_salt_ids: Mapping[str, str]
    ) -> None:
        self.rules = list(rules)
        self._expected = dict(expected_salt_ids)  # column -> salt id (when loaded from a package)
        self._compiled: dict[str, _Compiled] = {}

    @classmethod
    def from_description(cls, described: Sequence[Mapping[str, Any]]) -> Anonymizer:
        """Rebuild from `describe()` output (a package's manifest.data["anonymize"])."""
        rules, ids = [], {}
        for item in described:
            item = dict(item)
            sid = item.pop("salt_id", None)
            rule = AnonymizeRule.model_validate(item)
            rules.append(rule)
            if sid is not None:
                ids[rule.column] = str(sid)
        return cls(rules, ids)

    @property
    def dropped(self) -> set[str]:
        return {r.column for r in self.rules if r.method == "drop"}

    @property
    def text_columns(self) -> set[str]:
        """Columns whose anonymised values are text (hash, mask)."""
        return {r.column for r in self.rules if r.method in TEXT_METHODS}

    def describe(self) -> list[dict[str, Any]]:
        """The rules as plain JSON, each hash rule with its salt's id (never the salt)."""
        out = []
        for rule in self.rules:
            keys = {"column", "method", *ANONYMIZE_OPTIONS[rule.method]}
            item = rule.model_dump(mode="json", include=keys, exclude_none=True)
            if rule.method == "hash":
                item["salt_id"] = salt_id(self._get(rule.column).salt or b"")
            out.append(item)
        return out

    def _get(self, column: str) -> _Compiled:
        compiled = self._compiled.get(column)
        if compiled is None:
            rule = next(r for r in self.rules if r.column == column)
            salt = read_salt(rule.salt_env, column) if rule.method == "hash" else None
            expected = self._expected.get(column)
            if salt is not None and expected is not None and salt_id(salt) != expected:
                raise DataError(
                    f"anonymize: the salt in ${rule.salt_env} is not the one column {column!r} "
                    "was hashed with in training; set the training salt"
                )
            pattern = re.compile(rule.pattern) if rule.pattern is not None else None
            compiled = self._compiled[column] = _Compiled(rule, salt, pattern)
        return compiled

    def apply_value(self, column: str, value: Any, where: str) -> Any:
        """The anonymised value of one cell (for a column that has a rule other than drop)."""
        c = self._get(column)
        rule = c.rule
        if rule.method == "hash":
            assert c.salt is not None
            return hash_value(value, c.salt, rule.hash_chars)
        if rule.method == "mask":
            return mask_value(value, rule.keep_first, rule.keep_last, rule.mask_char, c.pattern)
        if rule.method == "generalize":
            return generalize_value(value, rule, where)
        raise AssertionError(rule.method)  # drop is handled by the callers

    def apply_rows(
        self, header: list[str], rows: list[tuple[str, list[Any]]], source: str
    ) -> tuple[list[str], list[tuple[str, list[Any]]]]:
        """Anonymise rows read under `header` (dropped columns leave the header)."""
        missing = [r.column for r in self.rules if r.column not in header]
        if missing:
            raise DataError(
                f"data.anonymize names column(s) {missing} that {source} does not have; "
                f"available columns: {', '.join(header)}"
            )
        transformed = [(i, r.column) for i, r in enumerate(self.rules) if r.method != "drop"]
        index = {name: i for i, name in enumerate(header)}
        keep = [i for i, name in enumerate(header) if name not in self.dropped]
        out_rows = []
        for where, row in rows:
            row = list(row)
            for _, column in transformed:
                j = index[column]
                row[j] = self.apply_value(column, row[j], where)
            out_rows.append((where, [row[i] for i in keep]))
        return [header[i] for i in keep], out_rows

    def apply_record(self, record: Mapping[str, Any], needed: Sequence[str]) -> dict[str, Any]:
        """The `needed` columns of one record (e.g. a server request), anonymised."""
        out = {}
        ruled = {r.column for r in self.rules}
        for column in needed:
            if column not in record:
                raise DataError(
                    f"record lacks column {column!r}; the model reads {', '.join(needed)}"
                )
            value = record[column]
            if column in ruled and column not in self.dropped:
                value = self.apply_value(column, value, "in the request")
            out[column] = value
        return out
