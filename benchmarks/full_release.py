"""Every data path of the workbench at the full ESCI release's size, one step per fresh process.

Generates a synthetic release in the official layout (``--scale 1``: 2,621,288 examples,
1,814,924 products, 130,652 queries; random words, for scale only) whose text lengths follow the
real 150-query sample (``shared/data/esci_us_opensearch_150q``: per-field null shares and length
quantiles, :data:`LENGTH_QUANTILES`), brands and colours drawn from Zipf-distributed value lists
(they repeat, as in the release), ~20 products per query. Then runs each selected step in a fresh
Python process and prints one table: step, wall time, peak RSS (``ru_maxrss`` of that process,
imports included), the plain baseline run the same way (where one exists) and the ratios.

Steps (``--steps`` picks a comma-separated subset; ``base:`` rows are their baselines):

* ``load_esci``: ``load_esci(dir)``; baseline ``pd.read_parquet`` x 2 + ``merge``.
* ``load_esci_cols``: ``load_esci(dir, text_columns=title, brand, color)`` (BM25's fields);
  baseline ``pd.read_parquet(columns=...)`` x 2 + ``merge``.
* ``pretrain_corpus``: ``core.pretrain.multitask.load_corpus`` (bundled pretrain.yaml, p2q on).
* ``pretrain_vocab``: brand/colour ``build_vocab`` + ``encode`` on the corpus' products.
* ``pretrain_mask``: the attribute masking of every product text (``mask_values``) and one epoch
  of BERT masking (``mask_tokens``, batches of 32 x 128 random ids).
* ``ngram_bags``: ``compute_ngram_bags`` (query, bullets, description; 1..3-grams) of every example.
* ``word2vec``: ``word2vec_bucket_init`` (gensim CBOW on the catalogue, then the bucket rows).
* ``bm25``: ``bm25_scores`` of every example (all ~130k queries, title+brand+color);
  baseline: ``bm25s`` ``get_scores`` per query for ``--bm25-base-queries`` queries (then scaled).
* ``labels_find``: ``find_issues`` on a run's OOF (2.0M train rows); baseline: the bare
  ``cleanlab.filter.find_label_issues`` on the same arrays.
* ``ensemble_build``: ``load_members`` + ``build_ensemble`` (Tasks 1-3, auto weights) +
  ``write_ensemble`` over 5 runs; baseline: read the 10 files, mean, ``to_csv`` (as
  benchmarks/ensemble_scale.py).
* ``stack``: ``load_stack_data`` + ``run_stack`` (2 member runs, BM25 scorer, bundled defaults).

Usage::

    .venv/bin/python benchmarks/full_release.py --scale 0.1 --dir /tmp/esci_full_0.1 --keep
    .venv/bin/python benchmarks/full_release.py --dir /tmp/esci_full --keep --steps load_esci,bm25

The parent imports neither pandas nor pyarrow; member runs (OOF/test parquet, runs.db) are
written once into ``<dir>/runs`` by an untimed child.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FULL_EXAMPLES = 2_621_288
FULL_PRODUCTS = 1_814_924
FULL_QUERIES = 130_652

#: the real 150-query sample's product text (6,764 products): share of empty values and length
#: quantiles (characters, 0/5/25/50/75/95/100 %) of the non-empty ones; queries: 150 real queries
LENGTH_QUANTILES = {
    "product_title": (0.00, (8, 40, 70, 100, 150, 196, 400)),
    "product_description": (0.50, (10, 63, 400, 766, 1200, 1803, 4000)),
    "product_bullet_point": (0.05, (10, 98, 400, 672, 1000, 1722, 4000)),
    "query": (0.00, (3, 9, 16, 24, 32, 43, 90)),
}
_Q = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
#: brand / colour: distinct values, Zipf exponent, share of empty (as in the sample: 2 % / 20 %)
VALUE_LISTS = {"product_brand": (200_000, 1.2, 0.02), "product_color": (8_000, 1.4, 0.20)}

STEPS = (
    "load_esci",
    "load_esci_cols",
    "pretrain_corpus",
    "pretrain_vocab",
    "pretrain_mask",
    "ngram_bags",
    "word2vec",
    "bm25",
    "labels_find",
    "ensemble_build",
    "stack",
)
BASELINES = {"load_esci", "load_esci_cols", "bm25", "labels_find", "ensemble_build"}
BM25_FIELDS = ("product_title", "product_brand", "product_color")


# --------------------------------------------------------------------------- generation
def _word_pool(rng, n_words: int, vocab_size: int = 100_000):
    """A long text of random lowercase words (Zipf ranks over ``vocab_size`` words) as bytes."""
    import numpy as np

    lengths = rng.integers(2, 11, size=vocab_size)
    letters = rng.integers(97, 123, size=int(lengths.sum()), dtype=np.uint8).tobytes()
    cut = np.concatenate([[0], np.cumsum(lengths)])
    vocab = [letters[cut[i] : cut[i + 1]] for i in range(vocab_size)]
    ranks = np.minimum(rng.zipf(1.2, size=n_words) - 1, vocab_size - 1)
    return b" ".join(vocab[r] for r in ranks)


def _lengths(rng, n: int, column: str):
    """Lengths drawn from the sample's quantiles (piecewise-linear inverse CDF); 0 = empty."""
    import numpy as np

    null_share, q = LENGTH_QUANTILES[column]
    lens = np.interp(rng.random(n), _Q, q).astype(np.int64)
    lens[rng.random(n) < null_share] = 0
    return lens


def _text_array(rng, pool: bytes, lens):
    """A pyarrow string array of spans of ``pool`` with the given lengths (0 -> null)."""
    import numpy as np
    import pyarrow as pa

    n = len(lens)
    starts = rng.integers(0, len(pool) - int(lens.max(initial=0)) - 1, size=n)
    mv = memoryview(pool)
    data = b"".join(mv[s : s + ln] for s, ln in zip(starts.tolist(), lens.tolist()))
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    valid = lens > 0
    validity = pa.py_buffer(np.packbits(valid, bitorder="little")) if not valid.all() else None
    return pa.Array.from_buffers(
        pa.large_string(), n, [validity, pa.py_buffer(offsets), pa.py_buffer(data)], null_count=int((~valid).sum())
    ).cast(pa.string())


def _value_array(rng, pool: bytes, n: int, column: str):
    """Repeated values (brand, colour): Zipf draws from a list of 1-3-word values."""
    import numpy as np
    import pyarrow as pa

    n_values, a, null_share = VALUE_LISTS[column]
    values = _text_array(rng, pool, np.interp(rng.random(n_values), _Q, (3, 4, 6, 8, 11, 19, 30)).astype(np.int64))
    values = pa.array([v.strip() or "x" for v in values.to_pylist()], pa.string())
    pick = np.minimum(rng.zipf(a, size=n) - 1, n_values - 1)
    mask = rng.random(n) < null_share
    return values.take(pa.array(pick, mask=mask))


def generate(out_dir: Path, scale: float, seed: int = 0) -> dict:
    """Write the examples/products parquet files of ``scale`` x the release into ``out_dir``.

    Products are written in blocks of 200k rows (bounded memory); every product is judged at
    least once; each query has one locale and ~20 products (the release's shape).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n_products = max(10, int(FULL_PRODUCTS * scale))
    n_examples = max(n_products, int(FULL_EXAMPLES * scale))
    n_queries = max(1, int(FULL_QUERIES * scale))
    pool = _word_pool(rng, 16_000_000)

    locales = rng.choice(np.array(["us", "es", "jp"]), size=n_products, p=[0.66, 0.15, 0.19])
    asin = rng.permutation(n_products * 2)[:n_products]
    product_id = np.char.add("B0", np.char.zfill(asin.astype("U10"), 8))  # unique: no duplicate keys
    block = 200_000
    writer = None
    text_bytes = 0
    for s in range(0, n_products, block):
        e = min(n_products, s + block)
        cols = {
            "product_id": pa.array(product_id[s:e].tolist(), pa.string()),
            "product_locale": pa.array(locales[s:e].tolist(), pa.string()),
        }
        for c in ("product_title", "product_description", "product_bullet_point"):
            cols[c] = _text_array(rng, pool, _lengths(rng, e - s, c))
        for c in VALUE_LISTS:
            cols[c] = _value_array(rng, pool, e - s, c)
        table = pa.table(cols).select(["product_id", "product_locale", *_text_order()])
        text_bytes += sum(table[c].nbytes for c in _text_order())
        if writer is None:
            writer = pq.ParquetWriter(out_dir / "shopping_queries_dataset_products.parquet", table.schema)
        writer.write_table(table)
    writer.close()

    prod_idx = np.concatenate([rng.permutation(n_products), rng.integers(0, n_products, n_examples - n_products)])
    prod_idx = prod_idx[np.argsort(locales[prod_idx], kind="stable")]
    q_of_row = np.minimum(np.arange(n_examples) * n_queries // n_examples, n_queries - 1)
    # a product is judged at most once per query (as in the release): drop the rare repeats
    _, first = np.unique(q_of_row * np.int64(n_products) + prod_idx, return_index=True)
    once = np.zeros(n_examples, dtype=bool)
    once[first] = True
    prod_idx, q_of_row, n_examples = prod_idx[once], q_of_row[once], int(once.sum())
    q_text = _text_array(rng, pool, np.maximum(_lengths(rng, n_queries, "query"), 3))
    labels = rng.choice(np.array(["E", "S", "C", "I"]), size=n_examples, p=[0.65, 0.22, 0.03, 0.10])
    q_test = rng.random(n_queries) < 0.24
    examples = pa.table(
        {
            "example_id": pa.array(np.arange(n_examples, dtype=np.int64)),
            "query": q_text.take(pa.array(q_of_row)),
            "query_id": pa.array(q_of_row.astype(np.int64)),
            "product_id": pa.array(product_id[prod_idx].tolist(), pa.string()),
            "product_locale": pa.array(locales[prod_idx].tolist(), pa.string()),
            "esci_label": pa.array(labels.tolist(), pa.string()),
            "small_version": pa.array((rng.random(n_queries) < 0.45)[q_of_row].astype(np.int64)),
            "large_version": pa.array(np.ones(n_examples, dtype=np.int64)),
            "split": pa.array(np.where(q_test[q_of_row], "test", "train").tolist(), pa.string()),
        }
    )
    pq.write_table(examples, out_dir / "shopping_queries_dataset_examples.parquet")
    return {
        "examples": n_examples,
        "products": n_products,
        "queries": n_queries,
        "product_text_gb": round(text_bytes / 1e9, 2),
    }


def _text_order() -> list[str]:
    return ["product_title", "product_description", "product_bullet_point", "product_brand", "product_color"]


# --------------------------------------------------------------------------- member runs
PROBS = ["p_E", "p_S", "p_C", "p_I"]
N_RUNS = 5


def prepare_runs(data_dir: Path) -> None:
    """Write ``N_RUNS`` finished synthetic training runs on the release (Task 2 selection: all
    examples) into ``<data_dir>/runs`` with a runs.db: oof.parquet (train rows, 5 query-grouped
    folds), test.parquet and fold<k>/test.parquet; noisy probabilities favouring the label."""
    import numpy as np
    import pandas as pd

    sys.path.insert(0, str(REPO))
    from core.runs.store import RunStore
    from core.scoring.metrics import GAIN_VECTOR

    root = data_dir / "runs"
    if (root / "done").is_file():
        return
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    ex = pd.read_parquet(
        data_dir / "shopping_queries_dataset_examples.parquet",
        columns=["example_id", "query_id", "product_id", "esci_label", "split"],
    )
    label = pd.Categorical(ex["esci_label"], categories=list("ESCI")).codes
    store = RunStore(root / "runs.db")
    for i in range(N_RUNS):
        rng = np.random.default_rng(i + 1)
        run_id = f"run{i}"
        run_dir = root / run_id
        run_dir.mkdir()
        config = {"name": run_id, "data": {"dir": str(data_dir), "task": 2}}
        store.create_run(run_id, config, run_dir=str(run_dir), run_id=run_id, status="finished")

        def probs(sel, noise, rng=rng):
            logits = rng.normal(0, noise, (int(sel.sum()), 4)).astype(np.float32)
            logits[np.arange(len(logits)), label[sel]] += 1.0
            p = np.exp(logits)
            return p / p.sum(1, keepdims=True)

        for split, fname in (("train", "oof.parquet"), ("test", "test.parquet")):
            sel = (ex["split"] == split).to_numpy()
            part = ex[sel]
            df = pd.DataFrame(
                {
                    "example_id": part["example_id"].to_numpy(),
                    "query_id": part["query_id"].to_numpy(),
                    "product_id": part["product_id"].to_numpy(),
                    "esci_label": part["esci_label"].to_numpy(),
                    "fold": (part["query_id"].to_numpy() % 5) if split == "train" else -1,
                }
            )
            df[PROBS] = probs(sel, 0.8 + 0.3 * i)
            df["score"] = df[PROBS].to_numpy() @ GAIN_VECTOR.astype(np.float32)
            df.to_parquet(run_dir / fname, index=False)
            store.add_artifact(run_id, split == "train" and "oof" or "test", run_dir / fname)
            if split == "test":
                for k in range(5):
                    (run_dir / f"fold{k}").mkdir()
                    df[PROBS] = probs(sel, 1.0 + 0.3 * i)
                    df["score"] = df[PROBS].to_numpy() @ GAIN_VECTOR.astype(np.float32)
                    df.to_parquet(run_dir / f"fold{k}" / "test.parquet", index=False)
    store.close()
    (root / "done").write_text("ok")


# --------------------------------------------------------------------------- steps
def _clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its finished children, all threads)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _since(t0: tuple[float, float]) -> dict:
    """``{"seconds": wall, "cpu_s": CPU}`` elapsed since ``t0`` (a :func:`_clock` value)."""
    t1 = _clock()
    return {"seconds": t1[0] - t0[0], "cpu_s": t1[1] - t0[1]}


def _pretrain_cfg(data_dir: Path):
    from core.pretrain.multitask import load_pretrain_config

    return load_pretrain_config(REPO / "core" / "bundled_configs" / "pretrain.yaml", [f"data.dir={data_dir}"])


def _corpus_products(data_dir: Path):
    """The pre-training corpus' products (cached by the pretrain_corpus step; built here if absent)."""
    import pandas as pd

    path = data_dir / "cache" / "corpus_products.parquet"
    if not path.is_file():
        from core.pretrain.multitask import load_corpus

        cfg = _pretrain_cfg(data_dir)
        cfg.tasks.p2q.enabled = False
        path.parent.mkdir(exist_ok=True)
        load_corpus(cfg).products.to_parquet(path, index=False)
    return pd.read_parquet(path)


def run_step(step: str, data_dir: Path, opts: dict) -> dict:
    """Run one step (its data prepared untimed first); return ``{"seconds": ..., **figures}``."""
    import pandas as pd

    sys.path.insert(0, str(REPO))
    ex_path = data_dir / "shopping_queries_dataset_examples.parquet"
    pr_path = data_dir / "shopping_queries_dataset_products.parquet"
    figures: dict = {}
    if step in ("base:load_esci", "base:load_esci_cols"):
        cols = None if step == "base:load_esci" else ["product_id", "product_locale", *BM25_FIELDS]
        t0 = _clock()
        df = pd.read_parquet(ex_path).merge(
            pd.read_parquet(pr_path, columns=cols), how="left", on=["product_id", "product_locale"]
        )
        return {**_since(t0), "rows": len(df), "frame_gb": df.memory_usage(deep=True).sum() / 1e9}
    if step in ("load_esci", "load_esci_cols"):
        from core.data.esci import load_esci

        kw = {} if step == "load_esci" else {"text_columns": BM25_FIELDS}
        t0 = _clock()
        df = load_esci(data_dir, **kw)
        return {**_since(t0), "rows": len(df), "frame_gb": df.memory_usage(deep=True).sum() / 1e9}
    if step == "pretrain_corpus":
        from core.pretrain.multitask import load_corpus

        cfg = _pretrain_cfg(data_dir)
        cfg.tasks.p2q.positive_labels = ["E"]  # the judged pairs too (the paper's setting)
        t0 = _clock()
        corpus = load_corpus(cfg)
        took = _since(t0)
        (data_dir / "cache").mkdir(exist_ok=True)
        corpus.products.to_parquet(data_dir / "cache" / "corpus_products.parquet", index=False)
        return {**took, "products": len(corpus.products), "pairs": len(corpus.pairs)}
    if step == "pretrain_vocab":
        from core.pretrain.multitask import build_vocab

        prods = _corpus_products(data_dir)
        t0 = _clock()
        for col, (mc, size) in (("brand", (2, 1000)), ("color", (2, 200))):
            values = prods[col].tolist()
            vocab = build_vocab(values, mc, size)
            y = vocab.encode(values)
            figures[col] = int((y > 0).sum())
        return {**_since(t0), **figures}
    if step == "pretrain_mask":
        return _step_mask(data_dir)
    if step in ("ngram_bags", "word2vec"):
        return _step_features(step, data_dir)
    if step == "bm25":
        from core.data.esci import load_esci
        from core.scoring.baselines import bm25_scores

        df = load_esci(data_dir, text_columns=BM25_FIELDS)
        t0 = _clock()
        s = bm25_scores(df)
        return {**_since(t0), "rows": len(s), "queries": int(df["query"].nunique())}
    if step == "base:bm25":
        return _bm25_baseline(data_dir, int(opts.get("bm25_base_queries", 200)))
    if step in ("labels_find", "base:labels_find"):
        return _step_labels(step, data_dir)
    if step in ("ensemble_build", "base:ensemble_build"):
        return _step_ensemble(step, data_dir)
    if step == "stack":
        return _step_stack(data_dir)
    raise SystemExit(f"unknown step {step}")


def _step_mask(data_dir: Path) -> dict:
    """Attribute masking of every product text + one epoch of MLM masking (B=32, T=128)."""
    import torch

    from core.pretrain.multitask import mask_tokens, mask_values

    prods = _corpus_products(data_dir)
    torch.set_num_threads(2)
    t0 = _clock()
    masked = [mask_values(t, [b, c], "[MASK]") for t, b, c in zip(prods["text"], prods["brand"], prods["color"])]
    t_attr = _since(t0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (32, 128), generator=gen)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    n_batches = (len(prods) + 31) // 32
    t1 = _clock()
    for _ in range(n_batches):
        mask_tokens(ids, special, 103, 30522, 0.15, gen)
    t_mlm = _since(t1)
    return {
        "seconds": t_attr["seconds"] + t_mlm["seconds"],
        "cpu_s": t_attr["cpu_s"] + t_mlm["cpu_s"],
        "mask_values_s": t_attr["seconds"],
        "mask_tokens_s": t_mlm["seconds"],
        "texts": len(masked),
    }


def _step_features(step: str, data_dir: Path) -> dict:
    from core.config import FeaturesConfig
    from core.data.esci import load_esci
    from core.modeling.features import compute_ngram_bags, word2vec_bucket_init

    cols = ("product_bullet_point", "product_description")
    if step == "word2vec":
        cols = ("product_title", "product_brand", "product_color", *cols)
    df = load_esci(data_dir, text_columns=cols)
    cfg = FeaturesConfig(ngram_bags=True, init="word2vec" if step == "word2vec" else "random")
    t0 = _clock()
    if step == "ngram_bags":
        bags = compute_ngram_bags(df, cfg)
        return {**_since(t0), "rows": len(bags), "ids": len(bags.ids), "segments": len(bags.offsets) - 1}
    from core.modeling.features import train_word2vec

    wv = train_word2vec(df, cfg.bag_dim, cfg.w2v_epochs, 42, cfg.w2v_max_words)
    t_train = _since(t0)
    rows, _ = word2vec_bucket_init(df, cfg, wv=wv)
    return {**_since(t0), "train_s": t_train["seconds"], "train_cpu_s": t_train["cpu_s"], "buckets": len(rows)}


def _bm25_baseline(data_dir: Path, n_queries: int) -> dict:
    """bm25s's own per-query scoring (``get_scores`` over the whole corpus) for ``n_queries``
    queries; ``seconds`` is scaled to all queries (the measured part is ``measured_s``)."""
    import bm25s
    import numpy as np

    from core.data.esci import load_esci
    from core.scoring.baselines import product_text

    df = load_esci(data_dir, text_columns=BM25_FIELDS)
    t0 = _clock()
    first = df.drop_duplicates("product_id")
    retriever = bm25s.BM25(k1=1.2, b=0.75, method="lucene")
    retriever.index(
        bm25s.tokenize(product_text(first, BM25_FIELDS), stopwords="en", show_progress=False), show_progress=False
    )
    t_index = _since(t0)
    queries = df["query"].unique()
    sample = queries[np.random.default_rng(0).permutation(len(queries))[:n_queries]]
    t1 = _clock()
    for q in bm25s.tokenize(list(sample), stopwords="en", return_ids=False, show_progress=False):
        retriever.get_scores(q)
    q = _since(t1)
    per_query, cpu_per_query = q["seconds"] / len(sample), q["cpu_s"] / len(sample)
    return {
        "seconds": t_index["seconds"] + per_query * len(queries),
        "cpu_s": t_index["cpu_s"] + cpu_per_query * len(queries),
        "measured_s": t_index["seconds"] + q["seconds"],
        "index_s": t_index["seconds"],
        "per_query_ms": 1e3 * per_query,
        "scaled": True,
    }


def _step_labels(step: str, data_dir: Path) -> dict:
    import numpy as np
    import pandas as pd

    from core.cleaning.labels import find_issues
    from core.runs.store import RunStore

    prepare_runs(data_dir)
    if step == "base:labels_find":
        from cleanlab.filter import find_label_issues

        oof = pd.read_parquet(data_dir / "runs" / "run0" / "oof.parquet")
        given = pd.Categorical(oof["esci_label"], categories=list("ESCI")).codes.astype(np.int64)
        p = oof[PROBS].to_numpy(np.float64)
        del oof
        t0 = _clock()
        idx = find_label_issues(given, p, filter_by="prune_by_noise_rate", return_indices_ranked_by="self_confidence")
        return {**_since(t0), "issues": len(idx)}
    shutil.copy(data_dir / "runs" / "runs.db", data_dir / "runs" / "labels.db")
    store = RunStore(data_dir / "runs" / "labels.db")
    t0 = _clock()
    res = find_issues(store, "run0")
    return {**_since(t0), "issues": len(res.issues)}


def _step_ensemble(step: str, data_dir: Path) -> dict:
    from core.runs.store import RunStore
    from core.scoring.ensemble import build_ensemble, load_members, write_ensemble

    prepare_runs(data_dir)
    root = data_dir / "runs"
    ids = [f"run{i}" for i in range(N_RUNS)]
    out = Path(tempfile.mkdtemp(prefix="ens-", dir=root))
    try:
        if step == "base:ensemble_build":
            sys.path.insert(0, str(REPO / "benchmarks"))
            from ensemble_scale import baseline

            t0 = _clock()
            baseline(data_dir, ids, out)
            return {**_since(t0)}
        shutil.copy(root / "runs.db", root / "ens.db")
        store = RunStore(root / "ens.db")
        t0 = _clock()
        ms = load_members(store, ids)
        res = build_ensemble(ms, (1, 2, 3), "auto", prior_adjust=True)
        write_ensemble(res, ms, out / "sub", "bench", store=store)
        return {**_since(t0)}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _step_stack(data_dir: Path) -> dict:
    from core.config import StackConfig
    from core.runs.store import RunStore
    from core.scoring.stack import load_stack_data, run_stack

    prepare_runs(data_dir)
    root = data_dir / "runs"
    shutil.copy(root / "runs.db", root / "stack.db")
    store = RunStore(root / "stack.db")
    cache = Path(tempfile.mkdtemp(prefix="scores-", dir=root))
    try:
        t0 = _clock()
        data = load_stack_data(store, ["run0", "run1"], ["bm25"], cache)
        t_load = _since(t0)["seconds"]
        res = run_stack(data, StackConfig(scorers=["bm25"]), seed=0)
        return {**_since(t0), "load_s": t_load, "fit_s": res.seconds}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# --------------------------------------------------------------------------- driver
def _child(step: str, data_dir: str, opts: str) -> None:
    """Run one step in this (fresh) process and print one JSON line: its figures + peak RSS."""
    import pandas  # noqa: F401  imported before any clock starts
    import pyarrow  # noqa: F401

    figures = run_step(step, Path(data_dir), json.loads(opts))
    figures["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(figures))


def _run_child(step: str, data_dir: Path, opts: dict, timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", step, str(data_dir), json.dumps(opts)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s (stopped)", "wall_s": time.perf_counter() - t0}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _row(step: str, r: dict, b: dict | None) -> str:
    """One table line: step, wall (CPU) seconds, peak RSS, baseline, ratios (time, memory)."""
    if "error" in r:
        return f"{step:<16} {'-':>16} {'-':>8}   {r['error']}"
    base, ratio = "", ""
    if b and "error" not in b:
        star = "*" if b.get("scaled") else ""
        base = f"{b['seconds']:.1f}{star} ({b['cpu_s']:.1f}) s / {b['peak_gb']:.2f} GB"
        ratio = f"{r['seconds'] / b['seconds']:.2f}x / {r['peak_gb'] / b['peak_gb']:.2f}x"
    elif b:
        base = b["error"]
    took = f"{r['seconds']:.1f} ({r['cpu_s']:.1f})"
    return f"{step:<16} {took:>16} {r['peak_gb']:8.2f}   {base:<30} {ratio}"


def main(argv: list[str] | None = None) -> None:
    """Parse the options, generate the data if needed, run the steps, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the full release (default 1)")
    ap.add_argument("--dir", type=Path, help="folder of the generated release (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--no-baseline", action="store_true", help="skip the baselines")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per step before it is stopped")
    ap.add_argument("--bm25-base-queries", type=int, default=200, help="queries timed for the BM25 baseline")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(*args.child)
        return
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        ap.error(f"unknown step(s) {unknown}; known: {', '.join(STEPS)}")
    tmp = None if args.dir else tempfile.mkdtemp(prefix="esci_full_")
    data_dir = args.dir or Path(tmp)
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        if not (data_dir / "shopping_queries_dataset_examples.parquet").is_file():
            sys.path.insert(0, str(REPO))
            from benchmarks.load_scale import generate_in_child

            generate_in_child(data_dir, args.scale, module="benchmarks.full_release")
        else:
            print(f"reusing {data_dir}")
        opts = {"bm25_base_queries": args.bm25_base_queries}
        print(
            f"{'step':<16} {'wall (CPU) s':>16} {'peak GB':>8}   {'baseline: wall (CPU) / peak':<30} "
            "ratio (wall / memory)"
        )
        results = {}
        for step in steps:
            r = _run_child(step, data_dir, opts, args.timeout)
            b = None
            if step in BASELINES and not args.no_baseline:
                b = _run_child(f"base:{step}", data_dir, opts, args.timeout)
            results[step] = {"ours": r, "baseline": b}
            print(_row(step, r, b), flush=True)
            skip = ("seconds", "cpu_s", "peak_gb")
            extra = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k not in skip}
            if extra:
                print(f"{'':<16} {extra}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
