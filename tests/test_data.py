"""Tests of core.data.esci: the official-layout loader (join, filters, sources, errors, fingerprint)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import expect_data_error
from core.data.esci import (
    ESCI_LABELS,
    EXAMPLE_COLUMNS,
    EXAMPLES_FILE,
    OUTPUT_COLUMNS,
    PRODUCT_COLUMNS,
    PRODUCTS_FILE,
    SOURCES_FILE,
    DatasetFiles,
    data_fingerprint,
    find_dataset_files,
    load_esci,
)
from core.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VESPA = SHARED / "esci_vespa_sample"


# --------------------------------------------------------------------------- fixtures
def _examples() -> pd.DataFrame:
    """12 examples, 4 queries, 3 locales, both splits, small/large flags, one ASIN in 2 locales.

    The rows are deliberately not sorted by example_id, to check that file order is kept.
    """
    rows = [
        # example_id, query, query_id, product_id, locale, label, small, large, split
        (10, "usb c cable", 1, "B000000001", "us", "E", 1, 1, "train"),
        (11, "usb c cable", 1, "B000000002", "us", "S", 1, 1, "train"),
        (12, "usb c cable", 1, "B000000003", "us", "I", 1, 1, "train"),
        (20, "cable usb c", 2, "B000000001", "es", "E", 0, 1, "train"),
        (21, "cable usb c", 2, "B000000004", "es", "C", 0, 1, "train"),
        (30, "ケーブル", 3, "B000000005", "jp", "E", 1, 1, "test"),
        (31, "ケーブル", 3, "B000000006", "jp", "I", 1, 1, "test"),
        (40, "book", 4, "0393356418", "us", "E", 0, 0, "test"),
        (41, "book", 4, "B000000002", "us", "S", 0, 0, "test"),
        (5, "usb c cable", 1, "B000000004", "us", "C", 1, 1, "train"),
        (6, "cable usb c", 2, "B000000002", "es", "I", 0, 1, "train"),
        (7, "ケーブル", 3, "B000000001", "jp", "S", 1, 1, "test"),
    ]
    return pd.DataFrame(rows, columns=list(EXAMPLE_COLUMNS))


def _products() -> pd.DataFrame:
    rows = [
        ("B000000001", "us", "USB-C cable 1m", "Fast charging", "Braided\nNylon", "Anker", "black"),
        ("B000000001", "es", "Cable USB-C 1m", None, "Trenzado", "Anker", None),
        ("B000000001", "jp", "USB-Cケーブル", "急速充電", None, "Anker", "黒"),
        ("B000000002", "us", "USB-C cable 2m", None, None, None, None),
        ("B000000002", "es", "Cable USB-C 2m", "Carga, rápida", "", "Ugreen", "blanco"),
        ("B000000003", "us", "HDMI cable", 'He said "hi"', "a,b,c", "Amazon", "grey"),
        ("B000000004", "us", "USB-C hub", "7 ports", "x", "Anker", "grey"),
        ("B000000004", "es", "Hub USB-C", "7 puertos", "x", "Anker", "gris"),
        ("B000000005", "jp", "充電器", "", "", "Anker", ""),
        ("B000000006", "jp", "マウス", "無線", "静音", "NA", "null"),
        ("0393356418", "us", "A book", "A novel", "Paperback", "Norton", None),
        ("B000000099", "us", "Unjudged product", "x", "x", "x", "x"),
    ]
    return pd.DataFrame(rows, columns=list(PRODUCT_COLUMNS))


def _sources() -> pd.DataFrame:
    return pd.DataFrame({"query_id": [1, 2, 3, 999], "source": ["other", "negations", "behavioral", "nlqec"]})


def _write(d: Path, examples=None, products=None, sources=None, fmt="parquet") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    examples = _examples() if examples is None else examples
    products = _products() if products is None else products
    for stem, frame in ((EXAMPLES_FILE, examples), (PRODUCTS_FILE, products)):
        if frame is False:
            continue
        if fmt == "parquet":
            frame.to_parquet(d / f"{stem}.parquet", index=False)
        else:
            frame.to_csv(d / f"{stem}.csv", index=False)
    if sources is not None:
        sources.to_csv(d / SOURCES_FILE, index=False)
    return d


@pytest.fixture()
def release(tmp_path) -> Path:
    return _write(tmp_path / "esci", sources=_sources())


# --------------------------------------------------------------------------- files
def test_find_dataset_files_prefers_parquet(tmp_path):
    d = _write(tmp_path / "both", sources=_sources())
    _write(d, fmt="csv")
    files = find_dataset_files(d)
    assert files == DatasetFiles(
        examples=d / f"{EXAMPLES_FILE}.parquet",
        products=d / f"{PRODUCTS_FILE}.parquet",
        sources=d / SOURCES_FILE,
    )


def test_find_dataset_files_csv_and_no_sources(tmp_path):
    d = _write(tmp_path / "csv", fmt="csv")
    files = find_dataset_files(str(d))
    assert files.examples.name == f"{EXAMPLES_FILE}.csv"
    assert files.products.name == f"{PRODUCTS_FILE}.csv"
    assert files.sources is None


# --------------------------------------------------------------------------- loading
def test_load_joins_examples_to_products(release):
    df = load_esci(release)
    assert list(df.columns) == list(OUTPUT_COLUMNS) + ["source"]
    assert isinstance(df.index, pd.RangeIndex) and df.index.start == 0
    assert len(df) == 12
    # file order kept (not sorted by example_id)
    assert df["example_id"].tolist() == _examples()["example_id"].tolist()
    for col in ("example_id", "query_id", "small_version", "large_version"):
        assert df[col].dtype == np.int64
    for col in ("query", "product_id", "product_title", "product_description", "source"):
        assert df[col].dtype == "str"
    row = df.set_index("example_id")
    # the same ASIN joins per locale
    assert row.loc[10, "product_title"] == "USB-C cable 1m"
    assert row.loc[20, "product_title"] == "Cable USB-C 1m"
    assert row.loc[7, "product_title"] == "USB-Cケーブル"
    assert row.loc[10, "product_bullet_point"] == "Braided\nNylon"
    assert row.loc[12, "product_description"] == 'He said "hi"'
    # an id that looks numeric keeps its leading zero
    assert row.loc[40, "product_id"] == "0393356418"
    assert row.loc[40, "product_brand"] == "Norton"
    # every joined value equals a plain pandas merge
    expected = _examples().merge(_products(), on=["product_id", "product_locale"], how="left")
    for col in ("product_title", "product_brand"):
        assert df[col].tolist() == expected[col].fillna("").tolist()


def test_null_product_text_becomes_empty_string(release):
    df = load_esci(release).set_index("example_id")
    for col in ("product_description", "product_bullet_point", "product_brand", "product_color"):
        assert not df[col].isna().any(), col
    assert df.loc[11, "product_description"] == ""
    assert df.loc[11, "product_brand"] == ""
    assert df.loc[20, "product_color"] == ""
    assert df.loc[30, "product_description"] == ""


def test_sources_join_leaves_missing_ids_na(tmp_path):
    sources = pd.DataFrame({"query_id": [2, 1, 999], "source": ["negations", "other", "x"]})
    d = _write(tmp_path / "s", sources=sources)
    df = load_esci(d).set_index("example_id")
    assert df.loc[10, "source"] == "other"
    assert df.loc[20, "source"] == "negations"
    assert pd.isna(df.loc[30, "source"])  # query 3 absent from the sources file
    assert pd.isna(df.loc[40, "source"])


def test_no_sources_file_no_source_column(tmp_path):
    df = load_esci(_write(tmp_path / "n"))
    assert "source" not in df.columns


@pytest.mark.parametrize(
    "kwargs, expected_ids",
    [
        ({}, [10, 11, 12, 20, 21, 30, 31, 40, 41, 5, 6, 7]),
        ({"task": 1}, [10, 11, 12, 30, 31, 5, 7]),
        ({"task": 2}, [10, 11, 12, 20, 21, 30, 31, 5, 6, 7]),
        ({"task": 3}, [10, 11, 12, 20, 21, 30, 31, 5, 6, 7]),
        ({"split": "test"}, [30, 31, 40, 41, 7]),
        ({"split": "train"}, [10, 11, 12, 20, 21, 5, 6]),
        ({"locales": ["es"]}, [20, 21, 6]),
        ({"locales": ["us", "jp"]}, [10, 11, 12, 30, 31, 40, 41, 5, 7]),
        ({"locales": "jp"}, [30, 31, 7]),
        ({"task": 1, "split": "train", "locales": ["us"]}, [10, 11, 12, 5]),
    ],
)
def test_filters(release, kwargs, expected_ids):
    df = load_esci(release, **kwargs)
    assert df["example_id"].tolist() == expected_ids
    assert isinstance(df.index, pd.RangeIndex) and df.index[0] == 0
    # text is still joined correctly after filtering
    ref = _examples().merge(_products(), on=["product_id", "product_locale"], how="left")
    ref = ref.set_index("example_id").loc[expected_ids]
    assert df["product_title"].tolist() == ref["product_title"].tolist()


def test_csv_variant_loads_like_parquet(tmp_path):
    a = load_esci(_write(tmp_path / "p", sources=_sources()))
    b = load_esci(_write(tmp_path / "c", sources=_sources(), fmt="csv"))
    pd.testing.assert_frame_equal(a, b)
    # "NA"/"null" are text, not missing values; an empty CSV field is ""
    row = b.set_index("example_id")
    assert (row.loc[31, "product_brand"], row.loc[31, "product_color"]) == ("NA", "null")
    assert row.loc[11, "product_description"] == ""


def test_parquet_with_other_types(tmp_path):
    """int32 ids, dictionary-encoded strings and extra columns are normalised."""
    ex = pa.Table.from_pandas(_examples(), preserve_index=False)
    ex = ex.set_column(0, "example_id", ex["example_id"].cast(pa.int32()))
    ex = ex.set_column(5, "esci_label", ex["esci_label"].dictionary_encode())
    ex = ex.append_column("extra", pa.array(["x"] * len(ex)))
    d = tmp_path / "t"
    d.mkdir()
    pq.write_table(ex, d / f"{EXAMPLES_FILE}.parquet")
    _products().to_parquet(d / f"{PRODUCTS_FILE}.parquet")  # with a pandas index column
    df = load_esci(d)
    assert df["example_id"].dtype == np.int64
    assert df["esci_label"].tolist() == _examples()["esci_label"].tolist()
    assert "extra" not in df.columns


def test_empty_or_missing_queries_are_a_data_error(tmp_path):
    ex = _examples()
    ex.loc[0, "query"] = None  # example_id 10
    ex.loc[5, "query"] = ""  # 30
    ex.loc[7, "query"] = " \t\u3000"  # 40: whitespace only (an ideographic space too)
    d = _write(tmp_path / "q", examples=ex)
    # checked on the whole file, whatever the filters (example 40 is not in the Task 1 selection)
    expect_data_error(
        tmp_path,
        lambda: load_esci(d, task=1, split="train"),
        f"{d / EXAMPLES_FILE}.parquet: 3 examples with an empty or missing query (example_id 10, 30, 40)",
    )
    ex = _examples()
    ex.loc[3, "query"] = None  # example_id 20; an empty CSV field reads as null
    d = _write(tmp_path / "c", examples=ex, fmt="csv")
    expect_data_error(tmp_path, lambda: load_esci(d), "1 example with an empty or missing query (example_id 20)")


# --------------------------------------------------------------------------- fingerprint
def test_fingerprint_is_stable_and_content_sensitive(tmp_path):
    df = load_esci(_write(tmp_path / "f"))
    fp = data_fingerprint(df)
    assert len(fp) == 16 and all(c in "0123456789abcdef" for c in fp)
    assert data_fingerprint(load_esci(tmp_path / "f")) == fp
    assert data_fingerprint(df.astype(object)) == fp  # backing does not matter
    assert data_fingerprint(df.iloc[::-1].iloc[::-1].reset_index(drop=True)) == fp
    assert data_fingerprint(df.drop(columns=["split", "small_version"])) == fp  # not hashed
    changed = df.copy()
    changed.loc[3, "esci_label"] = "I"
    assert data_fingerprint(changed) != fp
    changed = df.copy()
    changed.loc[3, "product_title"] = changed.loc[3, "product_title"] + " "
    assert data_fingerprint(changed) != fp
    # moving a character between neighbouring cells changes it too (lengths are hashed)
    a = pd.DataFrame({"example_id": [1, 2], "query": ["ab", "c"]})
    b = pd.DataFrame({"example_id": [1, 2], "query": ["a", "bc"]})
    assert data_fingerprint(a) != data_fingerprint(b)
    assert data_fingerprint(df.iloc[:5]) != fp


def test_fingerprint_needs_a_known_column():
    with pytest.raises(DataError, match="none of the columns"):
        data_fingerprint(pd.DataFrame({"x": [1]}))


# --------------------------------------------------------------------------- real sample
def _zstd_bytes(path: Path) -> bytes:
    try:
        import zstandard
    except ImportError:
        if not pa.Codec.is_available("zstd"):
            pytest.skip("neither zstandard nor pyarrow's zstd codec is available")
        with pa.CompressedInputStream(pa.OSFile(str(path)), "zstd") as fh:
            return fh.read()
    with open(path, "rb") as fh:
        return zstandard.ZstdDecompressor().stream_reader(fh).read()


def test_vespa_sample_loads(tmp_path):
    if not (VESPA / "test-sample.parquet").is_file():
        pytest.skip(f"shared data not found at {VESPA}")
    docs = [
        json.loads(line)["fields"]
        for line in _zstd_bytes(VESPA / "sample-products.jsonl.zstd").decode().splitlines()
        if line.strip()
    ]
    products = pd.DataFrame(
        {
            "product_id": [d["id"] for d in docs],
            "product_locale": [d["locale"] for d in docs],
            "product_title": [d.get("title") for d in docs],
            "product_description": [d.get("description") for d in docs],
            "product_bullet_point": [d.get("bullets") for d in docs],
            "product_brand": [d.get("brand") for d in docs],
            "product_color": [d.get("color") for d in docs],
        }
    )
    d = tmp_path / "vespa"
    d.mkdir()
    (d / f"{EXAMPLES_FILE}.parquet").write_bytes((VESPA / "test-sample.parquet").read_bytes())
    products.to_parquet(d / f"{PRODUCTS_FILE}.parquet", index=False)

    df = load_esci(d)
    assert len(df) == 16
    assert set(df["query_id"]) == {535}
    assert set(df["query"]) == {"06 bmw 325i radio oem not navigation system"}
    assert set(df["split"]) == {"test"}
    assert df["esci_label"].value_counts().to_dict() == {"I": 7, "S": 6, "E": 3}
    assert (df["product_title"] != "").all()
    assert df.loc[df["product_id"] == "B08VSJGP1N", "product_brand"].item() == "Rimoody"
    assert (df["product_description"] == "").sum() == 9  # null descriptions -> ""
    assert len(load_esci(d, task=1, split="test", locales=["us"])) == 16


# --------------------------------------------------------------------------- errors
def test_error_folder_missing(tmp_path):
    missing = tmp_path / "nope"
    expect_data_error(tmp_path, lambda: load_esci(missing), str(missing), "does not exist")
    expect_data_error(tmp_path, lambda: find_dataset_files(missing), str(missing), "does not exist")


def test_error_folder_is_a_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    expect_data_error(tmp_path, lambda: load_esci(f), str(f), "not a folder")


@pytest.mark.parametrize("which, stem", [("examples", EXAMPLES_FILE), ("products", PRODUCTS_FILE)])
def test_error_required_file_missing(tmp_path, which, stem):
    d = _write(tmp_path / "d", **{which: False})
    msg = expect_data_error(
        tmp_path, lambda: load_esci(d), str(d), f"missing {which} file", f"{stem}.parquet", f"{stem}.csv"
    )
    assert msg.startswith(f"{d}: ")


@pytest.mark.parametrize("stem", [EXAMPLES_FILE, PRODUCTS_FILE])
def test_error_corrupt_parquet(release, stem):
    path = release / f"{stem}.parquet"
    path.write_bytes(b"this is not parquet at all" * 10)
    expect_data_error(release.parent, lambda: load_esci(release), str(path), "cannot read:")


def test_error_truncated_parquet(release):
    path = release / f"{PRODUCTS_FILE}.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_data_error(release.parent, lambda: load_esci(release), str(path), "cannot read:")


def test_error_corrupt_page_in_a_text_column(tmp_path):
    """Damage inside the data pages (not the footer) surfaces while the text is read."""
    pr = pd.concat([_products()] * 200, ignore_index=True)
    pr["product_id"] = [f"B{i:09d}" for i in range(len(pr))]
    ex = _examples().iloc[:1].assign(product_id="B000000000", product_locale="us")
    d = _write(tmp_path / "x", examples=ex, products=pr)
    path = d / f"{PRODUCTS_FILE}.parquet"
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 200] = b"\xff" * 200
    path.write_bytes(bytes(data))
    expect_data_error(tmp_path, lambda: load_esci(str(d)), str(path), "cannot read:")


def test_error_corrupt_csv(tmp_path):
    d = _write(tmp_path / "c", fmt="csv")
    path = d / f"{EXAMPLES_FILE}.csv"
    with open(path, "a") as fh:
        fh.write('99,"unterminated,1\n1,2\n')
    expect_data_error(tmp_path, lambda: load_esci(d), str(path), "cannot read:")


def test_error_csv_bad_integer(tmp_path):
    ex = _examples().astype({"query_id": object})
    ex.loc[2, "query_id"] = "abc"
    d = _write(tmp_path / "c", examples=ex, fmt="csv")
    expect_data_error(
        tmp_path,
        lambda: load_esci(d),
        str(d / f"{EXAMPLES_FILE}.csv"),
        "column query_id: expected integers, found text values, e.g. 'abc'",
    )
    ex = _examples().astype({"example_id": object})
    ex.loc[4, "example_id"] = None  # an empty CSV field
    d2 = _write(tmp_path / "e", examples=ex, fmt="csv")
    expect_data_error(
        tmp_path, lambda: load_esci(d2), str(d2 / f"{EXAMPLES_FILE}.csv"), "missing values in column(s): example_id (1)"
    )


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_error_missing_columns(tmp_path, fmt):
    d = _write(tmp_path / "m", examples=_examples().drop(columns=["esci_label", "split"]), fmt=fmt)
    path = d / f"{EXAMPLES_FILE}.{fmt}"
    expect_data_error(tmp_path, lambda: load_esci(d), str(path), "missing column(s): esci_label, split")
    d2 = _write(tmp_path / "m2", products=_products().drop(columns=["product_color"]), fmt=fmt)
    path2 = d2 / f"{PRODUCTS_FILE}.{fmt}"
    expect_data_error(tmp_path, lambda: load_esci(d2), str(path2), "missing column(s): product_color")


def test_error_unknown_labels(tmp_path):
    ex = _examples()
    ex["esci_label"] = ["exact", "E", "X", "Y", "Z", "W", "V", "E", "S", "C", "I", "exact"]
    d = _write(tmp_path / "l", examples=ex)
    msg = expect_data_error(
        tmp_path,
        lambda: load_esci(d),
        str(d / f"{EXAMPLES_FILE}.parquet"),
        "unknown esci_label",
        "'exact'",
        "and 1 more",
        "in 7 row(s)",
    )
    assert "expected one of E, S, C, I" in msg


def test_error_duplicate_example_id(tmp_path):
    ex = _examples()
    ex.loc[3, "example_id"] = 10
    ex.loc[5, "example_id"] = 11
    d = _write(tmp_path / "x", examples=ex)
    expect_data_error(
        tmp_path,
        lambda: load_esci(d),
        str(d / f"{EXAMPLES_FILE}.parquet"),
        "duplicate example_id",
        "2 repeated row(s)",
        "10, 11",
    )


def test_error_duplicate_product(tmp_path):
    pr = pd.concat([_products(), _products().iloc[[1]]], ignore_index=True)
    d = _write(tmp_path / "p", products=pr)
    expect_data_error(
        tmp_path,
        lambda: load_esci(d),
        str(d / f"{PRODUCTS_FILE}.parquet"),
        "duplicate (product_id, product_locale)",
        "1 repeated row(s)",
        "(B000000001, es)",
    )


def test_error_duplicate_product_non_asin_ids(tmp_path):
    """The generic (non-ASIN) id path detects duplicates and missing products too."""
    ex = _examples()
    ex["product_id"] = "p-" + ex["product_id"]
    pr = _products()
    pr["product_id"] = "p-" + pr["product_id"]
    d = _write(tmp_path / "ok", examples=ex, products=pr)
    assert load_esci(d)["product_id"].iloc[0] == "p-B000000001"
    d2 = _write(tmp_path / "dup", examples=ex, products=pd.concat([pr, pr.iloc[[4]]]))
    expect_data_error(tmp_path, lambda: load_esci(d2), "duplicate (product_id, product_locale)", "(p-B000000002, es)")
    d3 = _write(tmp_path / "miss", examples=ex, products=pr.drop(index=[6]))
    expect_data_error(tmp_path, lambda: load_esci(d3), "no product row for 1 example(s)", "(p-B000000004, us)")


def test_error_missing_products(tmp_path):
    pr = _products()
    pr = pr[~((pr["product_id"] == "B000000004") | (pr["product_locale"] == "jp"))]
    d = _write(tmp_path / "mp", products=pr)
    expect_data_error(
        tmp_path,
        lambda: load_esci(d),
        str(d / f"{PRODUCTS_FILE}.parquet"),
        "no product row for 5 example(s)",
        EXAMPLES_FILE,
        "e.g. (B000000004, es), (B000000005, jp), (B000000006, jp), (B000000004, us), (B000000001, jp)",
    )
    # more than five: only the first five are listed
    pr = _products()
    d2 = _write(tmp_path / "mp2", products=pr[pr["product_id"] == "B000000099"])
    msg = expect_data_error(tmp_path, lambda: load_esci(d2), "no product row for 12 example(s)")
    assert msg.count("(B0") + msg.count("(03") == 5


def test_error_locale_mismatch_is_a_missing_product(tmp_path):
    ex = _examples()
    ex.loc[0, "product_locale"] = "de"
    d = _write(tmp_path / "de", examples=ex)
    expect_data_error(tmp_path, lambda: load_esci(d), "no product row for 1 example(s)", "(B000000001, de)")


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"locales": ["fr"]}, "locales=['fr']"),
        ({"task": 1, "split": "test", "locales": ["es"]}, "task=1, split='test', locales=['es']"),
        ({"split": "validation"}, "split='validation'"),
        ({"locales": []}, "locales=[]"),
    ],
)
def test_error_empty_selection(release, kwargs, named):
    expect_data_error(
        release.parent,
        lambda: load_esci(release, **kwargs),
        str(release / f"{EXAMPLES_FILE}.parquet"),
        "no examples left after filters",
        named,
        "of 12 examples",
    )


@pytest.mark.parametrize("task", [0, 4, "1", True, 1.5])
def test_error_invalid_task(release, task):
    expect_data_error(
        release.parent, lambda: load_esci(release, task=task), str(release), "invalid task", "must be 1, 2 or 3"
    )


def test_error_invalid_task_checked_before_files(tmp_path):
    expect_data_error(tmp_path, lambda: load_esci(tmp_path / "nope", task=9), "invalid task")


def test_error_missing_values_in_key_columns(tmp_path):
    ex = _examples()
    ex["esci_label"] = ex["esci_label"].astype(object)
    ex.loc[1, "esci_label"] = None
    ex.loc[[2, 3], "product_id"] = None
    d = _write(tmp_path / "nv", examples=ex)
    expect_data_error(
        tmp_path,
        lambda: load_esci(d),
        str(d / f"{EXAMPLES_FILE}.parquet"),
        "missing values in column(s): product_id (2), esci_label (1)",
    )
    pr = _products()
    pr.loc[0, "product_locale"] = None
    d2 = _write(tmp_path / "np", products=pr)
    expect_data_error(
        tmp_path,
        lambda: load_esci(d2),
        str(d2 / f"{PRODUCTS_FILE}.parquet"),
        "missing values in column(s): product_locale (1)",
    )


def test_error_non_integer_ids(tmp_path):
    ex = _examples()
    ex["example_id"] = ex["example_id"].astype(float)
    ex.loc[0, "example_id"] = 1.5
    d = _write(tmp_path / "f", examples=ex)
    expect_data_error(
        tmp_path, lambda: load_esci(d), str(d / f"{EXAMPLES_FILE}.parquet"), "column example_id: expected integers"
    )
    ex2 = _examples().astype({"query_id": str})
    ex2.loc[0, "query_id"] = "q1"
    d2 = _write(tmp_path / "s", examples=ex2)
    expect_data_error(tmp_path, lambda: load_esci(d2), "column query_id: expected integers")


def test_whole_number_floats_are_accepted(tmp_path):
    ex = _examples()
    ex["query_id"] = ex["query_id"].astype(float)
    df = load_esci(_write(tmp_path / "w", examples=ex))
    assert df["query_id"].dtype == np.int64


def test_error_empty_examples_file(tmp_path):
    d = _write(tmp_path / "e", examples=_examples().iloc[:0])
    expect_data_error(tmp_path, lambda: load_esci(d), str(d / f"{EXAMPLES_FILE}.parquet"), "no examples")


def test_error_sources_file(tmp_path):
    d = _write(tmp_path / "dup", sources=pd.DataFrame({"query_id": [1, 2, 1], "source": ["a", "b", "c"]}))
    expect_data_error(tmp_path, lambda: load_esci(d), str(d / SOURCES_FILE), "duplicate query_id", "1")
    d2 = _write(tmp_path / "col", sources=pd.DataFrame({"qid": [1], "source": ["a"]}))
    expect_data_error(tmp_path, lambda: load_esci(d2), str(d2 / SOURCES_FILE), "missing column(s): query_id")


def test_errors_are_data_errors_with_path_attribute(tmp_path):
    d = _write(tmp_path / "a", examples=_examples().drop(columns=["query"]))
    with pytest.raises(DataError) as info:
        load_esci(d)
    assert info.value.path == str(d / f"{EXAMPLES_FILE}.parquet")
    assert info.value.problem == "missing column(s): query"


def test_labels_constant():
    assert ESCI_LABELS == ("E", "S", "C", "I")
    assert os.path.basename(SOURCES_FILE) == "shopping_queries_dataset_sources.csv"
