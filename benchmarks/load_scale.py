"""Load the ESCI release at full scale: ``core.data.esci.load_esci`` against plain pandas.

Generates official-layout parquet files of the full release's size (2.6M examples,
1.8M products, about 1.2 GB of product text; random words, for scale only) into a temporary
folder, then runs each contestant in a fresh Python process and reports wall time and peak
RSS (``ru_maxrss`` of that process):

* ``baseline``: ``pd.read_parquet(examples)``, ``pd.read_parquet(products)``, ``merge`` on
  ``(product_id, product_locale)`` (left join, examples on the left);
* ``load_esci``: ``core.data.esci.load_esci(dir)`` (read, validate, join, nulls -> "").

Usage::

    python benchmarks/load_scale.py                # full size (needs ~8 GB RAM, ~3 min)
    python benchmarks/load_scale.py --scale 0.1    # quick run
    python benchmarks/load_scale.py --dir /tmp/esci_scale --keep   # reuse generated files

The parent process imports neither pandas nor pyarrow, so the children's peak RSS is theirs
alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Full-release sizes (amazon-science/esci-data, shopping_queries_dataset_*.parquet).
FULL_EXAMPLES = 2_621_288
FULL_PRODUCTS = 1_814_924
FULL_QUERIES = 130_652

# (column, share of nulls, min length, max length) -> mean ~665 bytes per product
TEXT_COLUMNS = (
    ("product_title", 0.0, 20, 200),
    ("product_description", 0.5, 50, 1000),
    ("product_bullet_point", 0.15, 50, 600),
    ("product_brand", 0.08, 3, 20),
    ("product_color", 0.3, 3, 15),
)


# --------------------------------------------------------------------------- generation
def generate(out_dir: Path, scale: float, seed: int = 0) -> dict:
    """Write examples/products parquet files of ``scale`` x the full release into ``out_dir``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n_products = max(10, int(FULL_PRODUCTS * scale))
    n_examples = max(n_products, int(FULL_EXAMPLES * scale))
    n_queries = max(1, int(FULL_QUERIES * scale))

    # a pool of random ASCII "words" from a Zipf-ish vocabulary: realistic compressibility
    vocab_size = 20_000
    lengths = rng.integers(2, 11, size=vocab_size)
    letters = rng.integers(97, 123, size=int(lengths.sum()), dtype=np.uint8).tobytes()
    cut = np.concatenate([[0], np.cumsum(lengths)])
    vocab = [letters[cut[i] : cut[i + 1]] for i in range(vocab_size)]
    ranks = np.minimum(rng.zipf(1.3, size=8_000_000) - 1, vocab_size - 1)
    pool = b" ".join(vocab[r] for r in ranks)  # ~50 MB
    pool_mv = memoryview(pool)

    def text_array(n: int, null_share: float, lo: int, hi: int):
        lens = rng.integers(lo, hi + 1, size=n)
        starts = rng.integers(0, len(pool) - hi - 1, size=n)
        valid = rng.random(n) >= null_share
        lens = np.where(valid, lens, 0)
        data = b"".join(pool_mv[s : s + ln] for s, ln in zip(starts.tolist(), lens.tolist()))
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        validity = None
        if not valid.all():
            validity = pa.py_buffer(np.packbits(valid, bitorder="little"))
        return pa.Array.from_buffers(
            pa.string(),
            n,
            [validity, pa.py_buffer(offsets), pa.py_buffer(data)],
            null_count=int((~valid).sum()),
        )

    # products: locale us/es/jp; ~5% of ASINs appear in two locales (as in the release)
    locales = rng.choice(np.array(["us", "es", "jp"]), size=n_products, p=[0.66, 0.15, 0.19])
    order = np.argsort(locales, kind="stable")
    locales = locales[order]
    asin_num = rng.permutation(n_products * 2)[:n_products]
    shared = rng.random(n_products) < 0.05
    first_us = np.flatnonzero(locales == "us")
    asin_num[shared & (locales != "us")] = asin_num[rng.choice(first_us, size=int((shared & (locales != "us")).sum()))]
    # keep (product_id, locale) unique
    _, first = np.unique(np.char.add(locales.astype("U2"), asin_num.astype("U12")), return_index=True)
    keep = np.zeros(n_products, dtype=bool)
    keep[first] = True
    locales, asin_num = locales[keep], asin_num[keep]
    n_products = len(locales)
    product_id = np.char.add("B0", np.char.zfill(asin_num.astype("U10"), 8))

    products = {
        "product_id": pa.array(product_id.tolist(), pa.string()),
        "product_locale": pa.array(locales.tolist(), pa.string()),
    }
    for col, null_share, lo, hi in TEXT_COLUMNS:
        products[col] = text_array(n_products, null_share, lo, hi)
    products_table = pa.table(products)
    text_bytes = sum(products_table[c].nbytes for c, *_ in TEXT_COLUMNS)
    # shuffle product rows (the release is not sorted by anything useful)
    products_table = products_table.take(pa.array(rng.permutation(n_products)))
    pq.write_table(products_table, out_dir / "shopping_queries_dataset_products.parquet")
    del products_table, products

    # examples: every product judged at least once, the rest drawn at random; grouped by
    # query, each query in one locale, ~20 products per query
    prod_idx = np.concatenate([rng.permutation(n_products), rng.integers(0, n_products, n_examples - n_products)])
    prod_idx = prod_idx[np.argsort(locales[prod_idx], kind="stable")]
    q_of_row = np.minimum(np.arange(n_examples) * n_queries // n_examples, n_queries - 1)
    q_small = rng.random(n_queries) < 0.45
    q_test = rng.random(n_queries) < 0.3
    q_text = text_array(n_queries, 0.0, 8, 40)
    labels = rng.choice(np.array(["E", "S", "C", "I"]), size=n_examples, p=[0.65, 0.22, 0.03, 0.10])
    examples = pa.table(
        {
            "example_id": pa.array(np.arange(n_examples, dtype=np.int64)),
            "query": q_text.take(pa.array(q_of_row)),
            "query_id": pa.array(q_of_row.astype(np.int64)),
            "product_id": pa.array(product_id[prod_idx].tolist(), pa.string()),
            "product_locale": pa.array(locales[prod_idx].tolist(), pa.string()),
            "esci_label": pa.array(labels.tolist(), pa.string()),
            "small_version": pa.array(q_small[q_of_row].astype(np.int64)),
            "large_version": pa.array(np.ones(n_examples, dtype=np.int64)),
            "split": pa.array(np.where(q_test[q_of_row], "test", "train").tolist(), pa.string()),
        }
    )
    pq.write_table(examples, out_dir / "shopping_queries_dataset_examples.parquet")
    return {
        "n_examples": n_examples,
        "n_products": n_products,
        "product_text_gb": round(text_bytes / 1e9, 3),
        "examples_mb": round((out_dir / "shopping_queries_dataset_examples.parquet").stat().st_size / 1e6, 1),
        "products_mb": round((out_dir / "shopping_queries_dataset_products.parquet").stat().st_size / 1e6, 1),
    }


# --------------------------------------------------------------------------- contestants
def generate_in_child(data_dir: Path, scale: float, module: str = "benchmarks.load_scale") -> dict:
    """Run ``module.generate(data_dir, scale)`` in a child process (the caller stays small, so its own
    peak RSS is the step it measures), print and return its summary dict.

    Raises:
        SystemExit: the generation failed (its stderr in the message).
    """
    t0 = time.perf_counter()
    code = (
        f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from {module} import generate;"
        f"from pathlib import Path; print(json.dumps(generate(Path({str(data_dir)!r}), {scale!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"generation failed:\n{proc.stderr}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"generated in {time.perf_counter() - t0:.1f} s into {data_dir}: {info}")
    return info


def _child(kind: str, data_dir: str) -> None:
    """Run one contestant in this (fresh) process; print one JSON line of figures."""
    import resource

    import pandas as pd  # imported before the clock starts: import cost is not timed
    import pyarrow  # noqa: F401

    sys.path.insert(0, str(REPO))
    from core.data.esci import load_esci

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB, after imports
    d = Path(data_dir)
    t0 = time.perf_counter()
    if kind == "baseline":
        ex = pd.read_parquet(d / "shopping_queries_dataset_examples.parquet")
        pr = pd.read_parquet(d / "shopping_queries_dataset_products.parquet")
        df = ex.merge(pr, how="left", on=["product_id", "product_locale"])
    elif kind == "load_esci":
        df = load_esci(d)
    else:
        raise SystemExit(f"unknown contestant {kind}")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result_mb = df.memory_usage(deep=True).sum() / 2**20
    figures = {
        "kind": kind,
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(peak),
        "import_rss_mb": round(rss0),
        "rows": len(df),
        "result_mb": round(result_mb),
    }
    if kind == "load_esci":  # not part of the timed load
        from core.data.esci import data_fingerprint

        t0 = time.perf_counter()
        data_fingerprint(df)
        figures["fingerprint_s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(figures))


def _run_child(kind: str, data_dir: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(data_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the full release")
    ap.add_argument("--dir", type=Path, help="folder for the generated files (default: temp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--repeat", type=int, default=1, help="runs per contestant (best time and worst peak RSS reported)")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(*args.child)
        return

    tmp = None
    data_dir = args.dir
    if data_dir is None:
        tmp = tempfile.mkdtemp(prefix="esci_scale_")
        data_dir = Path(tmp)
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        if not (data_dir / "shopping_queries_dataset_examples.parquet").exists():
            generate_in_child(data_dir, args.scale)
        else:
            print(f"reusing files in {data_dir}")

        results = {}
        for kind in ("baseline", "load_esci"):
            runs = [_run_child(kind, data_dir) for _ in range(max(1, args.repeat))]
            best = min(runs, key=lambda r: r["seconds"])
            best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
            results[kind] = best
            if len(runs) > 1:
                print(f"{kind:10s} runs: " + ", ".join(f"{r['seconds']:.2f} s / {r['peak_rss_mb']} MiB" for r in runs))
            print(
                f"{kind:10s} {best['seconds']:7.2f} s   peak RSS {best['peak_rss_mb']:6d} MiB"
                f"   (after imports {best['import_rss_mb']} MiB)   rows {best['rows']:,}"
                f"   frame {best['result_mb']} MiB"
                + (f"   (data_fingerprint {best['fingerprint_s']} s)" if "fingerprint_s" in best else "")
            )
        b, o = results["baseline"], results["load_esci"]
        extra_b = b["peak_rss_mb"] - b["import_rss_mb"]
        extra_o = o["peak_rss_mb"] - o["import_rss_mb"]
        print(
            f"ratio load_esci/baseline: time {o['seconds'] / b['seconds']:.2f}x, "
            f"peak RSS {o['peak_rss_mb'] / b['peak_rss_mb']:.2f}x "
            f"(above imports {extra_o / max(extra_b, 1):.2f}x)"
        )
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
