"""Import the OpenSearch ESCI sample (150 US queries, 6,678 judgments) into the official layout.

The sample (``shared/data/esci_us_opensearch_150q``, see its SOURCE.md) ships as

* ``esci_us_judgments.json``: ``{"judgmentRatings": [{"query", "ratings": [{"docId", "rating"}]}]}``
  with ratings "100.000" / "10.000" / "1.000" / "0.000" (the Task 1 gains E=1, S=0.1, C=0.01,
  I=0 times 100);
* ``esci_us_queryset.json``: ``{"querySetQueries": [{"queryText"}]}``;
* ``esci_us_ecommerce_shrunk.ndjson.zip``: one NDJSON file in OpenSearch bulk format (an
  ``{"index": ...}`` line, then a product document with ``asin, title, description,
  bullet_points, brand, color, query_id[]``).

:func:`import_opensearch` writes ``shopping_queries_dataset_examples.parquet``,
``shopping_queries_dataset_products.parquet`` and (when the official sources table is found)
``shopping_queries_dataset_sources.csv``, so that :func:`core.data.esci.load_esci` reads the sample
like the real release.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.data.esci import (
    ESCI_LABELS,
    EXAMPLES_FILE,
    PRODUCTS_FILE,
    SOURCES_FILE,
)
from core.errors import DataError, WorkbenchError

__all__ = ["JUDGMENTS_FILE", "QUERYSET_FILE", "PRODUCTS_ZIP", "RATING_LABELS", "import_opensearch"]

JUDGMENTS_FILE = "esci_us_judgments.json"
QUERYSET_FILE = "esci_us_queryset.json"
PRODUCTS_ZIP = "esci_us_ecommerce_shrunk.ndjson.zip"
#: Rating (as a number) -> ESCI label. The sample stores ratings as strings like "10.000".
RATING_LABELS: dict[float, str] = {100.0: "E", 10.0: "S", 1.0: "C", 0.0: "I"}
#: OpenSearch document field -> official products column.
PRODUCT_FIELDS: dict[str, str] = {
    "product_title": "title",
    "product_description": "description",
    "product_bullet_point": "bullet_points",
    "product_brand": "brand",
    "product_color": "color",
}
LOCALE = "us"
_SHOW = 5


# --------------------------------------------------------------------------- readers
def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"cannot read: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read: {exc}") from None


def _label(rating, path: Path, query: str, doc: str) -> str:
    try:
        value = float(rating)
    except (TypeError, ValueError):
        value = None
    if value not in RATING_LABELS or isinstance(rating, bool):
        raise DataError(
            path,
            f"query {query!r}, docId {doc!r}: unknown rating {rating!r} (expected 100.000, 10.000, 1.000 or 0.000)",
        )
    return RATING_LABELS[value]


def _read_judgments(path: Path) -> dict[str, dict[str, str]]:
    """query -> {asin: label}, in file order."""
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("judgmentRatings"), list):
        raise DataError(path, "expected an object with a 'judgmentRatings' list")
    out: dict[str, dict[str, str]] = {}
    for i, entry in enumerate(data["judgmentRatings"]):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("query"), str)
            or not isinstance(entry.get("ratings"), list)
        ):
            raise DataError(path, f"judgmentRatings[{i}]: expected {{'query': str, 'ratings': [...]}}")
        query = entry["query"]
        if query in out:
            raise DataError(path, f"query {query!r} appears twice in judgmentRatings")
        ratings: dict[str, str] = {}
        for r in entry["ratings"]:
            if not isinstance(r, dict) or not isinstance(r.get("docId"), str) or "rating" not in r:
                raise DataError(path, f"query {query!r}: expected ratings like {{'docId': str, 'rating': str}}")
            doc = r["docId"]
            if doc in ratings:
                raise DataError(path, f"query {query!r}: docId {doc!r} is judged twice")
            ratings[doc] = _label(r["rating"], path, query, doc)
        if not ratings:
            raise DataError(path, f"query {query!r} has no ratings")
        out[query] = ratings
    if not out:
        raise DataError(path, "no judgments")
    return out


def _read_queryset(path: Path) -> list[str]:
    data = _read_json(path)
    items = data.get("querySetQueries") if isinstance(data, dict) else None
    if not isinstance(items, list) or not all(
        isinstance(q, dict) and isinstance(q.get("queryText"), str) for q in items
    ):
        raise DataError(path, "expected an object with a 'querySetQueries' list of {'queryText': str}")
    return [q["queryText"] for q in items]


def _text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, list):
        return "\n".join(str(v) for v in value if v is not None)
    return str(value)


def _read_products(path: Path) -> dict[str, dict]:
    """asin -> document, from the zipped NDJSON bulk file (first document wins)."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.namelist() if m.endswith(".ndjson") or m.endswith(".json")]
            if len(members) != 1:
                raise DataError(path, f"expected one .ndjson file in the zip, found {len(members)}")
            raw = zf.read(members[0])
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(path, f"cannot read: {exc}") from None
    docs: dict[str, dict] = {}
    pending_id = None
    for lineno, line in enumerate(io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"cannot read: invalid JSON on line {lineno} ({exc.msg})") from None
        except UnicodeDecodeError as exc:
            raise DataError(path, f"cannot read: {exc}") from None
        if not isinstance(obj, dict):
            raise DataError(path, f"line {lineno}: expected a JSON object")
        if len(obj) == 1 and next(iter(obj)) in ("index", "create"):  # bulk action line
            meta = next(iter(obj.values())) or {}
            pending_id = meta.get("_id") if isinstance(meta, dict) else None
            continue
        asin = obj.get("asin") or pending_id
        pending_id = None
        if not isinstance(asin, str) or not asin:
            raise DataError(path, f"line {lineno}: product document without 'asin'")
        qids = obj.get("query_id") or []
        if not isinstance(qids, list):
            qids = [qids]
        try:
            obj["query_id"] = {int(q) for q in qids}
        except (TypeError, ValueError):
            raise DataError(path, f"line {lineno}: asin {asin}: non-integer query_id {qids!r}") from None
        docs.setdefault(asin, obj)
    return docs


# --------------------------------------------------------------------------- import
def import_opensearch(
    src_dir: str | Path,
    out_dir: str | Path,
    sources_csv: str | Path | None = None,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> dict:
    """Convert the OpenSearch ESCI sample in ``src_dir`` into the official layout in ``out_dir``.

    One function per step, below: :func:`_read_sample`, :func:`_recover_query_ids` (each query's ESCI
    ``query_id``), :func:`_draw_test_queries`, :func:`_examples_table`, :func:`_products_table`,
    :func:`_source_rows`, :func:`_write_release` (all files at once: on any error ``out_dir`` is unchanged).

    Args:
        src_dir: the folder with the three sample files.
        out_dir: destination folder (created if missing; existing release files replaced).
        sources_csv: optional path to the official ``query_id,source`` table.
        test_fraction: fraction of queries in [0, 1) marked ``split == "test"``.
        seed: seed of the held-out query draw.

    Returns:
        dict with ``n_queries``, ``n_examples``, ``n_products``, ``labels`` ({"E": n, ...}),
        ``n_sources`` (rows written, 0 if none), ``n_test_queries`` / ``n_test_examples`` (the
        held-out split, 0 when ``test_fraction`` is 0), ``examples``, ``products``, ``sources``
        (paths as str; ``sources`` None when not written), ``unjudged_products`` (documents in
        the zip that no query judges; not written).

    Raises:
        DataError: a sample file or the given sources CSV is missing or unreadable; malformed
            JSON structure; an unknown rating; a judged ASIN without a product document; a query
            whose products' query_id lists do not intersect in exactly one id; two queries with
            the same query_id; a judged query not in the queryset.
        WorkbenchError: ``test_fraction`` outside [0, 1).
    """
    if not 0.0 <= test_fraction < 1.0:
        raise WorkbenchError(f"test_fraction must be in [0, 1), got {test_fraction}")
    src, out = Path(src_dir), Path(out_dir)
    paths = _sample_paths(src, sources_csv)
    judgments, docs = _read_sample(paths)
    query_ids = _recover_query_ids(judgments, docs, paths[PRODUCTS_ZIP])
    test_qids = _draw_test_queries(set(query_ids.values()), test_fraction, seed)
    rows, examples = _examples_table(judgments, query_ids, test_qids)
    asins = sorted({asin for ratings in judgments.values() for asin in ratings})
    products = _products_table(asins, docs)
    source_rows = _source_rows(src, sources_csv, set(query_ids.values()))
    files = _write_release(out, examples, products, source_rows)
    counts = Counter(r[3] for r in rows)
    return {
        "n_queries": len(judgments),
        "n_examples": len(rows),
        "n_products": len(asins),
        "labels": {label: counts.get(label, 0) for label in ESCI_LABELS},
        "n_sources": len(source_rows) if source_rows is not None else 0,
        "n_test_queries": len(test_qids),
        "n_test_examples": sum(r[0] in test_qids for r in rows),
        "unjudged_products": len(docs) - len(asins),
        **files,  # examples, products (and sources) as str
        "sources": files.get("sources"),  # None when not written
    }


def _sample_paths(src: Path, sources_csv: str | Path | None) -> dict[str, Path]:
    """The three sample files in ``src`` (file name -> path), all present; a given sources CSV exists."""
    if not src.is_dir():
        raise DataError(src, "source folder does not exist")
    paths = {name: src / name for name in (JUDGMENTS_FILE, QUERYSET_FILE, PRODUCTS_ZIP)}
    missing = [name for name, p in paths.items() if not p.is_file()]
    if missing:
        raise DataError(src, f"missing file(s): {', '.join(missing)}")
    if sources_csv is not None and not Path(sources_csv).is_file():
        raise DataError(sources_csv, "sources file does not exist")
    return paths


def _read_sample(paths: dict[str, Path]) -> tuple[dict[str, dict[str, str]], dict[str, dict]]:
    """(query -> {asin: label}, asin -> product document); every judged query is in the queryset
    and every judged ASIN has a document."""
    judgments = _read_judgments(paths[JUDGMENTS_FILE])
    queryset = set(_read_queryset(paths[QUERYSET_FILE]))
    unknown = [q for q in judgments if q not in queryset]
    if unknown:
        raise DataError(
            paths[JUDGMENTS_FILE],
            f"{len(unknown)} judged query(ies) not in {QUERYSET_FILE}, e.g. "
            + ", ".join(repr(q) for q in unknown[:_SHOW]),
        )
    docs = _read_products(paths[PRODUCTS_ZIP])
    judged = {asin for ratings in judgments.values() for asin in ratings}
    no_doc = sorted(judged - docs.keys())
    if no_doc:
        raise DataError(
            paths[PRODUCTS_ZIP],
            f"no product document for {len(no_doc)} judged docId(s), e.g. {', '.join(no_doc[:_SHOW])}",
        )
    return judgments, docs


def _recover_query_ids(judgments: dict[str, dict[str, str]], docs: dict[str, dict], zip_path: Path) -> dict[str, int]:
    """query -> its ESCI ``query_id``: the intersection of the ``query_id`` lists of its judged
    products, which must be exactly one id, and no two queries may share one."""
    query_ids: dict[str, int] = {}
    owner: dict[int, str] = {}
    for query, ratings in judgments.items():
        common: set[int] | None = None
        for asin in ratings:
            ids = docs[asin]["query_id"]
            common = set(ids) if common is None else common & ids
        if not common or len(common) != 1:
            found = "none" if not common else ", ".join(str(i) for i in sorted(common)[:_SHOW])
            raise DataError(
                zip_path,
                f"query {query!r}: the query_id lists of its {len(ratings)} judged products"
                f" must share exactly one id (shared: {found})",
            )
        qid = common.pop()
        if qid in owner:
            raise DataError(zip_path, f"queries {owner[qid]!r} and {query!r} both map to query_id {qid}")
        owner[qid] = query
        query_ids[query] = qid
    return query_ids


def _draw_test_queries(qids: set[int], test_fraction: float, seed: int) -> set[int]:
    """The held-out query ids: ``round(test_fraction * n_queries)`` of them (at least 1 when
    ``test_fraction`` > 0), drawn with ``numpy.random.default_rng(seed)`` from the sorted ids;
    none when ``test_fraction`` is 0. All of a query's products share its split."""
    if test_fraction <= 0:
        return set()
    all_qids = sorted(qids)
    n_test = max(1, int(round(test_fraction * len(all_qids))))
    pick = np.random.default_rng(seed).choice(len(all_qids), size=n_test, replace=False)
    return {all_qids[i] for i in pick}


def _examples_table(
    judgments: dict[str, dict[str, str]], query_ids: dict[str, int], test_qids: set[int]
) -> tuple[list[tuple[int, str, str, str]], pa.Table]:
    """The rows ``(query_id, product_id, query, esci_label)`` sorted, and the examples table.

    ``example_id`` numbers the sorted rows, so reruns give the same ids; ``product_locale`` "us";
    ``split`` "test" for the held-out queries, else "train" (the sample has no official split);
    ``small_version`` and ``large_version`` 1 for all rows."""
    rows = sorted((query_ids[q], asin, q, label) for q, ratings in judgments.items() for asin, label in ratings.items())
    n = len(rows)
    examples = pa.table(
        {
            "example_id": pa.array(range(n), pa.int64()),
            "query": pa.array([r[2] for r in rows], pa.string()),
            "query_id": pa.array([r[0] for r in rows], pa.int64()),
            "product_id": pa.array([r[1] for r in rows], pa.string()),
            "product_locale": pa.array([LOCALE] * n, pa.string()),
            "esci_label": pa.array([r[3] for r in rows], pa.string()),
            "small_version": pa.array([1] * n, pa.int64()),
            "large_version": pa.array([1] * n, pa.int64()),
            "split": pa.array(["test" if r[0] in test_qids else "train" for r in rows], pa.string()),
        }
    )
    return rows, examples


def _products_table(asins: list[str], docs: dict[str, dict]) -> pa.Table:
    """The judged products, one row per product_id in ``asins`` order: text from
    title/description/bullet_points/brand/color (nulls kept as nulls, which
    :func:`core.data.esci.load_esci` turns into "")."""
    return pa.table(
        {"product_id": pa.array(asins, pa.string()), "product_locale": pa.array([LOCALE] * len(asins), pa.string())}
        | {
            col: pa.array([_text(docs[a].get(field)) for a in asins], pa.string())
            for col, field in PRODUCT_FIELDS.items()
        }
    )


def _source_rows(src: Path, sources_csv: str | Path | None, wanted: set[int]) -> list[tuple[int, str]] | None:
    """The sources rows of the imported query ids, from ``sources_csv``, or when None the sibling
    ``<src>/../esci_query_sources/shopping_queries_dataset_sources.csv`` if it exists; None when
    there is no sources table."""
    if sources_csv is None:
        candidate = src.resolve().parent / "esci_query_sources" / SOURCES_FILE
        sources_csv = candidate if candidate.is_file() else None
    if sources_csv is None:
        return None
    return _read_sources(Path(sources_csv), wanted)


def _write_release(
    out: Path, examples: pa.Table, products: pa.Table, source_rows: list[tuple[int, str]] | None
) -> dict[str, str]:
    """Write the release files into a temporary folder next to ``out``, then move them into place
    (a stale sources file in ``out`` is removed when there are no sources). Returns
    ``{"examples", "products"[, "sources"]}`` -> path as str."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.import-", dir=out.parent))
    try:
        names = {
            "examples": f"{EXAMPLES_FILE}.parquet",
            "products": f"{PRODUCTS_FILE}.parquet",
        }
        pq.write_table(examples, tmp / names["examples"])
        pq.write_table(products, tmp / names["products"])
        if source_rows is not None:
            names["sources"] = SOURCES_FILE
            with open(tmp / SOURCES_FILE, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh, lineterminator="\n")
                writer.writerow(["query_id", "source"])
                writer.writerows(source_rows)
        out.mkdir(parents=True, exist_ok=True)
        for name in names.values():
            os.replace(tmp / name, out / name)
        if source_rows is None and (out / SOURCES_FILE).exists():
            (out / SOURCES_FILE).unlink()  # stale, from another import
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {key: str(out / name) for key, name in names.items()}


def _read_sources(path: Path, wanted: set[int]) -> list[tuple[int, str]]:
    """Rows of the official sources table whose query_id is in ``wanted``, sorted."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"query_id", "source"} <= set(reader.fieldnames):
                raise DataError(path, "missing column(s): expected query_id,source")
            found: dict[int, str] = {}
            for lineno, rec in enumerate(reader, 2):
                try:
                    qid = int(rec["query_id"])
                except (TypeError, ValueError):
                    raise DataError(path, f"line {lineno}: query_id {rec['query_id']!r} is not an integer") from None
                if qid in wanted:
                    if qid in found:
                        raise DataError(path, f"duplicate query_id {qid}")
                    found[qid] = rec["source"]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(path, f"cannot read: {exc}") from None
    return sorted(found.items())
