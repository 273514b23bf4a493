"""Tests of core.scoring.submission: writers, the validator (every error), atomic writes, the CLI."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from conftest import snapshot, write_official
from core.errors import DataError
from core.scoring.submission import (
    atomic_write,
    load_test_examples,
    validate_submission,
    write_task1,
    write_task2,
    write_task3,
)


@pytest.fixture(scope="module")
def test_examples(sample_frames):
    """The real sample's last 30 queries as the test split (example_id, query_id, product_id, esci_label)."""
    ex = sample_frames[0]
    qs = sorted(ex["query_id"].unique())[-30:]
    return ex[ex["query_id"].isin(qs)][["example_id", "query_id", "product_id", "esci_label"]].reset_index(drop=True)


@pytest.fixture()
def files(tmp_path, test_examples):
    rng = np.random.default_rng(0)
    t = test_examples.assign(score=rng.random(len(test_examples)))
    return {
        1: write_task1(tmp_path / "t1.csv", t),
        2: write_task2(tmp_path / "t2.csv", t["example_id"], t["esci_label"]),
        3: write_task3(tmp_path / "t3.csv", t["example_id"], t["esci_label"] == "S"),
    }, t


def test_round_trip_all_tasks(files, test_examples):
    paths, t = files
    for task, path in paths.items():
        s = validate_submission(path, task, test_examples)
        assert s["rows"] == len(test_examples)
    t1 = pd.read_csv(paths[1])
    assert list(t1.columns) == ["query_id", "product_id"]
    for qid, grp in t1.groupby("query_id", sort=False):  # best first within each query
        scores = t.set_index(["query_id", "product_id"]).loc[[(qid, p) for p in grp["product_id"]], "score"]
        assert scores.is_monotonic_decreasing
    assert t1["query_id"].is_monotonic_increasing
    t2 = pd.read_csv(paths[2])
    assert list(t2.columns) == ["example_id", "esci_label"]
    names = {"E": "exact", "S": "substitute", "C": "complement", "I": "irrelevant"}
    assert (t2["esci_label"].to_numpy() == t["esci_label"].map(names).to_numpy()).all()
    t3 = pd.read_csv(paths[3])
    assert list(t3.columns) == ["example_id", "substitute_label"]
    assert set(t3["substitute_label"]) == {"substitute", "no_substitute"}
    assert ((t3["substitute_label"] == "substitute").to_numpy() == (t["esci_label"] == "S").to_numpy()).all()


def test_test_examples_from_an_official_folder(tmp_path, sample_frames, files, test_examples):
    ex, pr = sample_frames
    ex = ex.copy()
    ex["split"] = np.where(ex["example_id"].isin(test_examples["example_id"]), "test", "train")
    folder = write_official(tmp_path / "data", ex, pr)
    got = load_test_examples(folder, 1)
    assert sorted(got["example_id"]) == sorted(test_examples["example_id"])
    paths, _ = files
    assert validate_submission(paths[1], 1, folder)["queries"] == 30
    ex["large_version"] = np.where(ex["example_id"] % 2 == 0, 1, 0)  # Task 2/3 test set = large_version rows
    write_official(folder, ex, pr)
    with pytest.raises(DataError, match="example_id.s. not in the test examples"):
        validate_submission(paths[2], 2, folder)
    with pytest.raises(DataError, match="no test examples"):
        load_test_examples(write_official(tmp_path / "d2", ex.assign(split="train"), pr), 1)


def _edit(path, fn):
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    fn(df).to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    "task,edit,parts",
    [
        (
            1,
            lambda d: d.rename(columns={"product_id": "asin"}),
            ["columns must be exactly query_id,product_id", "asin"],
        ),
        (2, lambda d: d[["esci_label", "example_id"]], ["columns must be exactly example_id,esci_label"]),
        (2, lambda d: d.iloc[1:], ["1 test example_id(s) missing"]),
        (3, lambda d: pd.concat([d, d.iloc[:2]]), ["2 duplicate example_id(s)"]),
        (
            2,
            lambda d: pd.concat([d, d.iloc[:1].assign(example_id="999999")]),
            ["1 example_id(s) not in the test examples", "999999"],
        ),
        (
            2,
            lambda d: d.assign(esci_label=np.where(np.arange(len(d)) < 3, "E", d["esci_label"])),
            ["3 unknown esci_label value(s) 'E'", "allowed: complement, exact, irrelevant, substitute"],
        ),
        (
            3,
            lambda d: d.assign(substitute_label=np.where(np.arange(len(d)) < 2, "", d["substitute_label"])),
            ["2 empty/NaN value(s) in substitute_label"],
        ),
        (
            2,
            lambda d: d.assign(example_id=np.where(np.arange(len(d)) < 1, "NaN", d["example_id"])),
            ["1 empty/NaN value(s) in example_id", "1 test example_id(s) missing"],
        ),
        (
            2,
            lambda d: d.assign(example_id=np.where(np.arange(len(d)) < 1, "12a", d["example_id"])),
            ["non-integer example_id values, e.g. '12a'"],
        ),
        (1, lambda d: d[d["query_id"] != d["query_id"].iloc[0]], ["1 test query(ies) missing (each would score 0)"]),
        (1, lambda d: pd.concat([d, d.iloc[:1]]), ["1 duplicate (query_id, product_id) row(s)"]),
        (
            1,
            lambda d: d.assign(product_id=np.where(np.arange(len(d)) < 1, "B000NOPE", d["product_id"])),
            ["1 test (query_id, product_id) pair(s) missing", "1 pair(s) not in the test examples", "B000NOPE"],
        ),
    ],
)
def test_each_validator_error(files, test_examples, task, edit, parts):
    paths, _ = files
    path = _edit(paths[task], edit)
    with pytest.raises(DataError) as info:
        validate_submission(path, task, test_examples)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    for part in parts:
        assert part in msg, (part, msg)


def test_unreadable_and_missing_files(tmp_path, test_examples):
    with pytest.raises(DataError, match="submission file not found"):
        validate_submission(tmp_path / "nope.csv", 1, test_examples)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty.csv: cannot read as CSV"):
        validate_submission(tmp_path / "empty.csv", 2, test_examples)
    (tmp_path / "header.csv").write_text("example_id,esci_label\n")
    with pytest.raises(DataError, match="no rows"):
        validate_submission(tmp_path / "header.csv", 2, test_examples)
    with pytest.raises(DataError, match="test examples file not found"):
        validate_submission(tmp_path / "header.csv", 2, tmp_path / "missing.parquet")


def test_a_write_that_fails_halfway_leaves_no_file(tmp_path, test_examples):
    target = tmp_path / "out" / "t2.csv"

    def half(tmp):
        with open(tmp, "w") as fh:
            fh.write("example_id,esci_label\n1,exact\n")
        raise OSError("disk full")

    before = snapshot(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half)
    assert not target.exists()
    assert [p for p in snapshot(tmp_path) if p not in before] == ["out"]  # no temp file left
    # an existing file keeps its previous content
    write_task2(target, test_examples["example_id"], test_examples["esci_label"])
    good = target.read_bytes()
    with pytest.raises(OSError):
        atomic_write(target, half)
    assert target.read_bytes() == good and sorted(p.name for p in target.parent.iterdir()) == ["t2.csv"]
    # a writer-level failure (bad labels) also leaves nothing
    with pytest.raises(DataError, match="unknown ESCI label"):
        write_task2(tmp_path / "bad.csv", [1, 2], ["E", "X"])
    assert not (tmp_path / "bad.csv").exists()


def test_cli_validate(files, test_examples, tmp_path, monkeypatch, capsys):
    from workbench.cli import main

    paths, _ = files
    ex_file = tmp_path / "test.parquet"
    test_examples.to_parquet(ex_file, index=False)
    monkeypatch.setattr(
        sys, "argv", ["workbench", "submission", "validate", str(paths[3]), "--task", "3", "--examples", str(ex_file)]
    )
    main()
    assert f"valid Task 3 submission ({len(test_examples)} rows)" in capsys.readouterr().out
    _edit(paths[3], lambda d: d.iloc[5:])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "5 test example_id(s) missing" in err
