"""Tests of core.data.opensearch: importing the real OpenSearch ESCI sample into the official layout."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import expect_data_error
from core.data.esci import EXAMPLES_FILE, PRODUCTS_FILE, SOURCES_FILE, load_esci
from core.data.opensearch import JUDGMENTS_FILE, PRODUCTS_ZIP, QUERYSET_FILE, import_opensearch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLE = SHARED / "esci_us_opensearch_150q"
SOURCES = SHARED / "esci_query_sources" / SOURCES_FILE

needs_sample = pytest.mark.skipif(
    not (SAMPLE / JUDGMENTS_FILE).is_file(),
    reason=f"the OpenSearch ESCI sample is not at {SAMPLE} (shared/data next to the repo)",
)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    if not (SAMPLE / JUDGMENTS_FILE).is_file():
        pytest.skip(f"the OpenSearch ESCI sample is not at {SAMPLE}")
    out = tmp_path_factory.mktemp("imp") / "esci"
    summary = import_opensearch(SAMPLE, out)
    return out, summary


def _copy_sample(tmp_path: Path) -> Path:
    """A writable copy of the sample (with the sources sibling), to break on purpose."""
    src = tmp_path / "data" / SAMPLE.name
    shutil.copytree(SAMPLE, src)
    if SOURCES.is_file():
        (tmp_path / "data" / "esci_query_sources").mkdir()
        shutil.copy(SOURCES, tmp_path / "data" / "esci_query_sources" / SOURCES_FILE)
    return src


@needs_sample
def test_summary(imported):
    out, s = imported
    assert s["n_queries"] == 150
    assert s["n_examples"] == 6678
    assert s["n_products"] == 6597  # 6,764 documents, 167 not judged
    assert s["unjudged_products"] == 167
    assert s["labels"] == {"E": 3389, "S": 1898, "C": 305, "I": 1086}
    assert s["examples"] == str(out / f"{EXAMPLES_FILE}.parquet")
    assert s["products"] == str(out / f"{PRODUCTS_FILE}.parquet")
    if SOURCES.is_file():
        assert s["sources"] == str(out / SOURCES_FILE)
        assert s["n_sources"] == 150
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{EXAMPLES_FILE}.parquet", f"{PRODUCTS_FILE}.parquet"] + ([SOURCES_FILE] if s["sources"] else [])
    )
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # temp dir removed


@needs_sample
def test_files_have_the_official_schema(imported):
    out, _ = imported
    ex = pq.read_table(out / f"{EXAMPLES_FILE}.parquet")
    assert ex.column_names == [
        "example_id",
        "query",
        "query_id",
        "product_id",
        "product_locale",
        "esci_label",
        "small_version",
        "large_version",
        "split",
    ]
    assert str(ex.schema.field("example_id").type) == "int64"
    pr = pq.read_table(out / f"{PRODUCTS_FILE}.parquet")
    assert pr.column_names == [
        "product_id",
        "product_locale",
        "product_title",
        "product_description",
        "product_bullet_point",
        "product_brand",
        "product_color",
    ]
    assert pr.num_rows == len(pr["product_id"].unique()) == 6597


@needs_sample
def test_load_esci_reads_the_import(imported):
    out, _ = imported
    df = load_esci(out)
    assert len(df) == 6678
    assert df["query"].nunique() == 150 and df["query_id"].nunique() == 150
    assert df["esci_label"].value_counts().to_dict() == {"E": 3389, "S": 1898, "I": 1086, "C": 305}
    assert set(df["product_locale"]) == {"us"} and set(df["split"]) == {"train"}
    assert (df["small_version"] == 1).all() and (df["large_version"] == 1).all()
    assert df["example_id"].tolist() == list(range(6678))
    # sorted by (query_id, product_id)
    assert df[["query_id", "product_id"]].equals(
        df[["query_id", "product_id"]].sort_values(["query_id", "product_id"], ignore_index=True)
    )
    assert (df["product_title"] != "").all()
    assert (df["product_description"] == "").sum() > 3000  # ESCI-S: many empty descriptions
    towels = df[df["query"] == "t towels kitchen"]
    assert set(towels["query_id"]) == {100064}
    b07 = towels[towels["product_id"] == "B07NCQWCQS"]
    assert b07["esci_label"].item() == "E"
    if SOURCES.is_file():
        per_query = df.drop_duplicates("query_id")["source"].value_counts().to_dict()
        assert per_query == {"parse_pattern": 57, "negations": 38, "other": 37, "behavioral": 18}
    assert len(load_esci(out, task=1, split="train", locales=["us"])) == 6678


@needs_sample
def test_ids_are_stable_across_imports(imported, tmp_path):
    out, _ = imported
    again = tmp_path / "again"
    import_opensearch(SAMPLE, again)
    a = pd.read_parquet(out / f"{EXAMPLES_FILE}.parquet")
    b = pd.read_parquet(again / f"{EXAMPLES_FILE}.parquet")
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / f"{PRODUCTS_FILE}.parquet"), pd.read_parquet(again / f"{PRODUCTS_FILE}.parquet")
    )
    # re-importing over an existing folder replaces the files
    import_opensearch(SAMPLE, again)
    pd.testing.assert_frame_equal(a, pd.read_parquet(again / f"{EXAMPLES_FILE}.parquet"))


@needs_sample
def test_explicit_sources_and_no_sources(tmp_path):
    # a sources table that lacks most ids: only matching rows are written
    src_csv = tmp_path / "sources.csv"
    src_csv.write_text("query_id,source\n100064,negations\n5,other\n")
    out = tmp_path / "a"
    s = import_opensearch(SAMPLE, out, sources_csv=src_csv)
    assert s["n_sources"] == 1
    assert (out / SOURCES_FILE).read_text() == "query_id,source\n100064,negations\n"
    df = load_esci(out)
    assert set(df.loc[df["query_id"] == 100064, "source"]) == {"negations"}
    assert df.loc[df["query_id"] != 100064, "source"].isna().all()

    # no sibling sources folder: no sources file, and a stale one is removed
    lone = tmp_path / "lone" / SAMPLE.name
    shutil.copytree(SAMPLE, lone)
    s = import_opensearch(lone, out)
    assert s["sources"] is None and s["n_sources"] == 0
    assert not (out / SOURCES_FILE).exists()
    assert "source" not in load_esci(out).columns


# --------------------------------------------------------------------------- errors
@needs_sample
@pytest.mark.parametrize("name", [JUDGMENTS_FILE, QUERYSET_FILE, PRODUCTS_ZIP])
def test_error_missing_source_file(tmp_path, name):
    src = _copy_sample(tmp_path)
    (src / name).unlink()
    expect_data_error(tmp_path, lambda: import_opensearch(src, tmp_path / "out"), str(src), "missing file(s)", name)


def test_error_missing_source_folder(tmp_path):
    expect_data_error(
        tmp_path,
        lambda: import_opensearch(tmp_path / "nope", tmp_path / "out"),
        str(tmp_path / "nope"),
        "does not exist",
    )


@needs_sample
def test_error_missing_explicit_sources(tmp_path):
    expect_data_error(
        tmp_path,
        lambda: import_opensearch(SAMPLE, tmp_path / "out", tmp_path / "s.csv"),
        str(tmp_path / "s.csv"),
        "does not exist",
    )


def _edit_judgments(src: Path, edit) -> None:
    path = src / JUDGMENTS_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@needs_sample
def test_error_unknown_rating(tmp_path):
    src = _copy_sample(tmp_path)
    _edit_judgments(src, lambda d: d["judgmentRatings"][0]["ratings"][1].update(rating="50.000"))
    expect_data_error(
        tmp_path,
        lambda: import_opensearch(src, tmp_path / "out"),
        str(src / JUDGMENTS_FILE),
        "query 't towels kitchen'",
        "unknown rating '50.000'",
    )


@needs_sample
def test_error_query_id_not_unique(tmp_path):
    """A judged product of another query breaks the intersection: named in the error."""
    src = _copy_sample(tmp_path)
    _edit_judgments(
        src, lambda d: d["judgmentRatings"][0]["ratings"].append({"docId": "B07CXG6C9W", "rating": "0.000"})
    )  # the Kindle, judged for other queries
    expect_data_error(
        tmp_path,
        lambda: import_opensearch(src, tmp_path / "out"),
        str(src / PRODUCTS_ZIP),
        "query 't towels kitchen'",
        "exactly one id",
        "shared: none",
    )


@needs_sample
def test_error_judged_asin_without_document(tmp_path):
    src = _copy_sample(tmp_path)
    _edit_judgments(
        src, lambda d: d["judgmentRatings"][3]["ratings"].append({"docId": "B0NOTTHERE", "rating": "1.000"})
    )
    expect_data_error(
        tmp_path,
        lambda: import_opensearch(src, tmp_path / "out"),
        str(src / PRODUCTS_ZIP),
        "no product document for 1 judged docId(s)",
        "B0NOTTHERE",
    )


@needs_sample
def test_error_bad_json_and_zip(tmp_path):
    src = _copy_sample(tmp_path)
    (src / JUDGMENTS_FILE).write_text('{"judgmentRatings": [')
    expect_data_error(
        tmp_path,
        lambda: import_opensearch(src, tmp_path / "out"),
        str(src / JUDGMENTS_FILE),
        "cannot read: invalid JSON",
    )
    src2 = _copy_sample(tmp_path / "b")
    (src2 / PRODUCTS_ZIP).write_bytes(b"not a zip")
    expect_data_error(
        tmp_path, lambda: import_opensearch(src2, tmp_path / "out"), str(src2 / PRODUCTS_ZIP), "cannot read:"
    )


@needs_sample
def test_error_keeps_existing_output(imported, tmp_path):
    """A failed re-import leaves the previous files untouched."""
    out, _ = imported
    target = tmp_path / "keep"
    shutil.copytree(out, target)
    src = _copy_sample(tmp_path / "src")
    with zipfile.ZipFile(src / PRODUCTS_ZIP) as zf:
        name = zf.namelist()[0]
        lines = zf.read(name).decode().splitlines()
    with zipfile.ZipFile(src / PRODUCTS_ZIP, "w") as zf:
        zf.writestr(name, "\n".join(lines[:-3] + ["{broken"]))
    expect_data_error(tmp_path, lambda: import_opensearch(src, target), str(src / PRODUCTS_ZIP), "invalid JSON on line")
    assert len(load_esci(target)) == 6678


@needs_sample
def test_test_fraction_holds_out_whole_queries(imported, tmp_path):
    out, s = imported
    assert s["n_test_queries"] == 0 and s["n_test_examples"] == 0
    assert set(pq.read_table(out / f"{EXAMPLES_FILE}.parquet")["split"].to_pylist()) == {"train"}
    held = tmp_path / "holdout"
    s2 = import_opensearch(SAMPLE, held, test_fraction=0.2, seed=0)
    ex = pd.read_parquet(held / f"{EXAMPLES_FILE}.parquet")
    per_query = ex.groupby("query_id")["split"].nunique()
    assert (per_query == 1).all()  # no query split across train and test
    test_q = set(ex.loc[ex["split"] == "test", "query_id"])
    assert len(test_q) == s2["n_test_queries"] == 30
    assert (ex["split"] == "test").sum() == s2["n_test_examples"]
    base = pd.read_parquet(out / f"{EXAMPLES_FILE}.parquet")
    assert ex.drop(columns="split").equals(base.drop(columns="split"))  # same ids and rows
    again = tmp_path / "again"
    import_opensearch(SAMPLE, again, test_fraction=0.2, seed=0)
    assert pd.read_parquet(again / f"{EXAMPLES_FILE}.parquet")["split"].equals(ex["split"])
    other = tmp_path / "other"
    import_opensearch(SAMPLE, other, test_fraction=0.2, seed=1)
    assert set(pd.read_parquet(other / f"{EXAMPLES_FILE}.parquet").query("split == 'test'")["query_id"]) != test_q
    df = load_esci(held, split="test")
    assert set(df["query_id"]) == test_q


def test_test_fraction_out_of_range(tmp_path):
    from core.errors import WorkbenchError

    with pytest.raises(WorkbenchError, match="test_fraction"):
        import_opensearch(tmp_path, tmp_path / "out", test_fraction=1.0)
