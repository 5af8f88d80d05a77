"""data.anonymize: each transform by hand, config errors, salts, and a served request transformed
exactly as the training rows were, with the raw values and the salt kept out of every file."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from shipyard.config import load_config
from shipyard.data import DataConfig
from shipyard.data.anonymize import Anonymizer, hash_value, mask_value, salt_id
from shipyard.data.config import AnonymizeRule
from shipyard.data.sources import load_table
from shipyard.errors import ConfigError, DataError, PackageError
from shipyard.package import load_package
from shipyard.serve import ServeSettings, create_app
from shipyard.train import fit

SALT = "0123456789abcdef-test-salt-Qz7"


@pytest.fixture
def salt(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SHIPYARD_ANONYMIZE_SALT", SALT)
    return SALT


def rule(**kw: Any) -> AnonymizeRule:
    return AnonymizeRule.model_validate(kw)


def anon(*rules: AnonymizeRule) -> Anonymizer:
    return Anonymizer(list(rules), {})


# --- each transform by hand ------------------------------------------------------------------


def test_hash_is_hmac_sha256_under_the_salt(salt: str) -> None:
    want = hmac.new(salt.encode(), b"alice@example.org", hashlib.sha256).hexdigest()
    a = anon(rule(column="email", method="hash"))
    assert a.apply_value("email", "alice@example.org", "") == want[:16]
    assert (
        hash_value(42, salt.encode(), 8)
        == hmac.new(salt.encode(), b"42", hashlib.sha256).hexdigest()[:8]
    )
    assert anon(rule(column="e", method="hash", hash_chars=64)).apply_value("e", "x", "") == (
        hmac.new(salt.encode(), b"x", hashlib.sha256).hexdigest()
    )


def test_mask_keeps_the_asked_ends_or_masks_matches() -> None:
    assert mask_value("4111222233334444", 0, 4, "*", None) == "************4444"
    assert mask_value("12345", 2, 0, "#", None) == "12###"
    assert mask_value("ab", 3, 3, "*", None) == "ab"  # nothing left to mask
    a = anon(rule(column="t", method="mask", pattern=r"\d"))
    assert a.apply_value("t", "call 555-1234 now", "") == "call ***-**** now"
    email = anon(rule(column="t", method="mask", pattern=r"[\w.]+@[\w.]+", mask_char="_"))
    assert email.apply_value("t", "mail bo.b@x.io ok", "") == "mail _________ ok"  # 9 characters


def test_generalize_numbers_by_step_or_edges_and_text_by_prefix() -> None:
    by_step = anon(rule(column="age", method="generalize", step=10))
    assert [by_step.apply_value("age", v, "") for v in ("37", 40, "-1", 9.99)] == [30, 40, -10, 0]
    half = anon(rule(column="x", method="generalize", step=0.5))
    assert half.apply_value("x", "1.7", "") == 1.5
    edges = anon(rule(column="age", method="generalize", edges=[18, 30, 65]))
    assert [edges.apply_value("age", v, "") for v in (5, 18, 29.9, 30, 64, 90)] == [
        18,
        18,
        18,
        30,
        30,
        65,
    ]
    zip_code = anon(rule(column="zip", method="generalize", prefix=3))
    assert zip_code.apply_value("zip", "90210", "") == "902"
    with pytest.raises(DataError, match=r"column 'age' is generalised by number but has 'old'"):
        by_step.apply_value("age", "old", "row 3")


def test_rows_drop_and_transform_before_anything_reads_them(salt: str, tmp_path: Path) -> None:
    csv = tmp_path / "people.csv"
    csv.write_text("name,email,age,income,label\nAda,ada@x.org,37,1.5,a\nBo,bo@y.org,62,2.5,b\n")
    config = DataConfig(
        source=str(csv),
        target="label",
        anonymize=[
            rule(column="email", method="drop"),
            rule(column="name", method="hash"),
            rule(column="age", method="generalize", step=10),
        ],
    )
    table = load_table(str(csv), config, "classification", 0)
    # the hashed name is text, so it is not a default feature; email is gone
    assert table.feature_names == ["age", "income"]
    np.testing.assert_array_equal(table.x, [[30, 1.5], [60, 2.5]])


# --- config errors ------------------------------------------------------------------------------


def run_config(tmp_path: Path, **data: Any) -> dict[str, Any]:
    return {
        "name": "people",
        "task": "classification",
        "data": {"source": str(tmp_path / "people.csv"), "target": "label", **data},
        "model": {"name": "mlp", "hidden_sizes": [8]},
    }


@pytest.mark.parametrize(
    ("rules", "extra", "needle"),
    [
        ([{"column": "a", "method": "hash", "step": 2}], {}, "step do not apply to method 'hash'"),
        ([{"column": "a", "method": "generalize"}], {}, "exactly one of step, edges or prefix"),
        ([{"column": "a", "method": "generalize", "edges": [3, 1]}], {}, "strictly ascending"),
        ([{"column": "a", "method": "mask", "pattern": "("}], {}, "is not a regex"),
        ([{"column": "a", "method": "blur"}], {}, "anonymize.0.method"),
        ([{"column": "a", "method": "drop"}] * 2, {}, "more than one rule for column(s) ['a']"),
        ([{"column": "label", "method": "drop"}], {}, "drops ['label'], which the run reads"),
        (
            [{"column": "a", "method": "hash"}],
            {"features": ["a"]},
            "data.features ['a'] are hashed/masked to text",
        ),
        ([{"column": "a", "method": "hash", "salt_env": "1BAD"}], {}, "salt_env"),
    ],
)
def test_config_errors(tmp_path: Path, rules: Any, extra: Any, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(run_config(tmp_path, anonymize=rules, **extra))
    assert needle in str(info.value)


@pytest.mark.parametrize("fmt", ["chat", "prompt-completion"])
def test_instruction_data_cannot_be_anonymised(fmt: str) -> None:
    # instruction examples are not columns: the rules would be recorded but never applied
    with pytest.raises(ValueError, match=f"not on data.format {fmt} examples"):
        DataConfig(source="chats.jsonl", format=fmt, anonymize=[rule(column="a", method="drop")])


def test_data_errors(tmp_path: Path, salt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    csv = tmp_path / "p.csv"
    csv.write_text("a,label\n1,x\n")
    missing = DataConfig(source=str(csv), anonymize=[rule(column="nope", method="drop")])
    with pytest.raises(DataError, match=r"names column\(s\) \['nope'\].*available columns: a"):
        load_table(str(csv), missing, "classification", 0)
    digits = DataConfig(source="builtin:digits", anonymize=[rule(column="a", method="drop")])
    with pytest.raises(DataError, match="works on CSV/JSONL columns"):
        load_table("builtin:digits", digits, "classification", 0)
    hashed = DataConfig(
        source=str(csv), target="label", anonymize=[rule(column="a", method="hash")]
    )
    monkeypatch.setenv("SHIPYARD_ANONYMIZE_SALT", "short")
    with pytest.raises(DataError, match="has 5 characters"):
        load_table(str(csv), hashed, "classification", 0)
    monkeypatch.delenv("SHIPYARD_ANONYMIZE_SALT")
    with pytest.raises(DataError, match=r"\$SHIPYARD_ANONYMIZE_SALT, which is not set"):
        load_table(str(csv), hashed, "classification", 0)


def test_a_package_refuses_another_salt(salt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    described = anon(rule(column="name", method="hash")).describe()
    assert described == [
        {
            "column": "name",
            "method": "hash",
            "salt_env": "SHIPYARD_ANONYMIZE_SALT",
            "hash_chars": 16,
            "salt_id": salt_id(salt.encode()),
        }
    ]
    assert SALT not in json.dumps(described)
    monkeypatch.setenv("SHIPYARD_ANONYMIZE_SALT", "another-salt-of-enough-length")
    with pytest.raises(DataError, match="not the one column 'name' was hashed with"):
        Anonymizer.from_description(described).apply_value("name", "Ada", "")


# --- end to end: train, package, serve ---------------------------------------------------------


def write_people(path: Path) -> None:
    rng = np.random.default_rng(0)
    lines = ["name,email,zip,age,income,label"]
    for i in range(200):
        age = int(rng.integers(18, 90))
        income = float(rng.normal())
        label = "senior" if age >= 50 else "junior"
        lines.append(f"Person{i:03d},p{i:03d}@mail.example,9{i:04d},{age},{income:.3f},{label}")
    path.write_text("\n".join(lines) + "\n")


def test_anonymised_columns_stay_out_of_the_run_and_requests_get_the_same_transform(
    tmp_path: Path, salt: str
) -> None:
    write_people(tmp_path / "people.csv")
    rules = [
        {"column": "name", "method": "hash"},
        {"column": "email", "method": "drop"},
        {"column": "zip", "method": "mask", "keep_first": 1},
        {"column": "age", "method": "generalize", "step": 10},
    ]
    raw = run_config(tmp_path, anonymize=rules)
    raw["train"] = {"epochs": None, "max_steps": 30, "batch_size": 32}
    raw["optim"] = {"name": "adam", "lr": 0.05}
    result = fit(load_config(raw), run_dir=tmp_path / "run")
    assert result.metrics["test"]["accuracy"] >= 0.9

    # no raw value of an anonymised column, and not the salt, in any file of the run or package
    needles = [SALT, "Person0", "@mail.example", "p000@", "90001"]
    for file in (tmp_path / "run").rglob("*"):
        if file.is_file():
            blob = file.read_bytes()
            for needle in needles:
                assert needle.encode() not in blob, (needle, file)

    loaded = load_package(result.run_dir / "package")
    described = loaded.manifest.data["anonymize"]
    assert [(r["column"], r["method"]) for r in described] == [
        (r["column"], r["method"]) for r in rules
    ]
    assert described[0]["salt_id"] == salt_id(SALT.encode())
    assert loaded.input_columns == ["age", "income"]

    records = [
        {"name": "Zed", "email": "z@q.org", "zip": "12345", "age": 57, "income": 0.3},
        {"name": "Yo", "email": "y@q.org", "zip": "54321", "age": "49", "income": -1.0},
    ]
    # the same rows generalised by hand: 57 -> 50, 49 -> 40
    by_hand = loaded.predict([[50, 0.3], [40, -1.0]])
    assert loaded.predict(records) == by_hand
    assert [p["label"] for p in by_hand] == ["senior", "junior"]

    app = create_app(ServeSettings(max_wait_ms=0), preloaded=[loaded])
    with TestClient(app) as client:
        r = client.post("/v1/models/people:predict", json={"instances": records})
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == by_hand
        bad = client.post("/v1/models/people:predict", json={"instances": [{"age": 3}]})
        assert bad.status_code == 400 and "lacks column 'income'" in bad.json()["error"]
        bad = client.post(
            "/v1/models/people:predict", json={"instances": [{"age": "old", "income": 1}]}
        )
        assert bad.status_code == 400 and "generalised by number" in bad.json()["error"]


def test_served_text_is_masked_like_training_text(tmp_path: Path, salt: str) -> None:
    lines = ["text,label"] + [
        f"call {i:03d}-{i * 7 % 1000:03d} {'now' if i % 2 else 'later'},{i % 2}" for i in range(60)
    ]
    (tmp_path / "msgs.csv").write_text("\n".join(lines) + "\n")
    raw = {
        "name": "msgs",
        "task": "classification",
        "data": {
            "source": str(tmp_path / "msgs.csv"),
            "text_column": "text",
            "target": "label",
            "tokenizer": {"kind": "byte"},
            "anonymize": [{"column": "text", "method": "mask", "pattern": r"\d"}],
        },
        "model": {"name": "rnn", "n_embd": 4, "hidden_size": 8, "block_size": 20},
        "train": {"epochs": None, "max_steps": 2, "batch_size": 16},
    }
    result = fit(load_config(raw), run_dir=tmp_path / "run")
    for file in (tmp_path / "run").rglob("*"):
        if file.is_file():
            assert b"call 007-049" not in file.read_bytes(), file
    loaded = load_package(result.run_dir / "package")
    ids = loaded.records_to_array([{"text": "call 555-123 now"}])
    np.testing.assert_array_equal(ids, loaded.encode_texts(["call ***-*** now"]))
    assert loaded.predict([{"text": "call 555-123 now"}]) == loaded.predict(["call ***-*** now"])


def test_a_package_whose_model_reads_a_hashed_column_needs_its_salt(
    tmp_path: Path, salt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = ["user,label"] + [f"user{i},{i % 2}" for i in range(40)]
    (tmp_path / "u.csv").write_text("\n".join(lines) + "\n")
    raw = {
        "name": "users",
        "task": "classification",
        "data": {
            "source": str(tmp_path / "u.csv"),
            "text_column": "user",
            "target": "label",
            "tokenizer": {"kind": "byte"},
            "anonymize": [{"column": "user", "method": "hash"}],
        },
        "model": {"name": "rnn", "n_embd": 4, "hidden_size": 8, "block_size": 16},
        "train": {"epochs": None, "max_steps": 1, "batch_size": 8},
    }
    package = fit(load_config(raw), run_dir=tmp_path / "run").run_dir / "package"
    loaded = load_package(package)
    want = hmac.new(SALT.encode(), b"user7", hashlib.sha256).hexdigest()[:16]
    np.testing.assert_array_equal(
        loaded.records_to_array([{"user": "user7"}]), loaded.encode_texts([want])
    )
    monkeypatch.setenv("SHIPYARD_ANONYMIZE_SALT", "a-different-salt-of-enough-length")
    with pytest.raises(PackageError, match="not the one column 'user' was hashed with"):
        load_package(package)
    monkeypatch.delenv("SHIPYARD_ANONYMIZE_SALT")
    with pytest.raises(PackageError, match="which is not set"):
        load_package(package)
