"""Shared fixtures: the real ESCI sample in the official layout, and a tiny random BERT."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE = SHARED_DATA / "esci_us_opensearch_150q"
RATING_TO_LABEL = {"100.000": "E", "10.000": "S", "1.000": "C", "0.000": "I"}


def snapshot(root: Path) -> dict:
    """{relative path: (size, mtime_ns)} of everything under ``root``."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def expect_data_error(root: Path, fn, *parts: str) -> str:
    """Call fn(); check a one-line DataError naming all ``parts`` and that nothing under
    ``root`` was written (no temp folder left either). Returns the message."""
    from core.errors import DataError

    before = snapshot(root)
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, (part, msg)
    assert snapshot(root) == before
    return msg


def _require_sample() -> None:
    if not SAMPLE.is_dir():
        pytest.skip(f"real ESCI sample not found at {SAMPLE}")


@pytest.fixture(scope="session")
def sample_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(examples, products) of the real 150-query sample in the official columns, parsed here
    independently of core.data.opensearch. Query ids are the row order of the judgments file."""
    _require_sample()
    judg = json.loads((SAMPLE / "esci_us_judgments.json").read_text())["judgmentRatings"]
    rows = []
    for qi, q in enumerate(judg):
        for r in q["ratings"]:
            rows.append(
                {
                    "query": q["query"],
                    "query_id": qi,
                    "product_id": r["docId"],
                    "esci_label": RATING_TO_LABEL[r["rating"]],
                }
            )
    ex = pd.DataFrame(rows)
    ex.insert(0, "example_id", range(len(ex)))
    ex["product_locale"] = "us"
    ex["small_version"] = 1
    ex["large_version"] = 1
    ex["split"] = "train"
    prods = []
    with zipfile.ZipFile(SAMPLE / "esci_us_ecommerce_shrunk.ndjson.zip") as z:
        with z.open(z.namelist()[0]) as fh:
            for line in fh:
                d = json.loads(line)
                if "asin" in d:
                    prods.append(
                        {
                            "product_id": d["asin"],
                            "product_locale": "us",
                            "product_title": d.get("title") or "",
                            "product_description": d.get("description") or "",
                            "product_bullet_point": d.get("bullet_points") or "",
                            "product_brand": d.get("brand") or "",
                            "product_color": d.get("color") or "",
                        }
                    )
    pr = pd.DataFrame(prods).drop_duplicates("product_id")
    return ex, pr


def write_official(folder: Path, examples: pd.DataFrame, products: pd.DataFrame) -> Path:
    """Write the official parquet layout into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    examples.to_parquet(folder / "shopping_queries_dataset_examples.parquet", index=False)
    products.to_parquet(folder / "shopping_queries_dataset_products.parquet", index=False)
    return folder


def sample_subset(folder: Path, sample_frames, n_queries: int, n_test: int) -> Path:
    """The first ``n_queries`` real queries in the official layout under ``folder``, the last
    ``n_test`` of them in split test."""
    ex, pr = sample_frames
    keep = sorted(ex["query_id"].unique())[:n_queries]
    ex = ex[ex["query_id"].isin(keep)].copy()
    ex.loc[ex["query_id"].isin(keep[-n_test:]), "split"] = "test"
    pr = pr[pr["product_id"].isin(ex["product_id"])]
    return write_official(folder, ex, pr)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory, sample_frames) -> Path:
    """24 real queries in the official layout: 20 in split train, 4 in split test."""
    return sample_subset(tmp_path_factory.mktemp("esci_small"), sample_frames, 24, 4)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, sample_frames) -> Path:
    """A random 2-layer BERT (hidden 32) with a WordPiece tokenizer built from the sample's words.

    No downloads: the vocabulary is the special tokens, single characters and ##-suffixed
    characters, and the 1,500 most frequent lower-cased words of the sample's queries/titles.
    """
    import collections
    import re

    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    ex, pr = sample_frames
    words = collections.Counter()
    for text in list(ex["query"]) + list(pr["product_title"]):
        words.update(re.findall(r"[a-z0-9]+", text.lower()))
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789/&-.,'\"()"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *[f"##{c}" for c in chars]]
    vocab += [w for w, _ in words.most_common(1500) if w not in vocab]
    folder = tmp_path_factory.mktemp("tiny_bert")
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(folder)
    return folder


def tiny_config(
    tmp_path: Path, data_dir: Path, model_dir: Path, cache: Path | None = None, tricks: dict | None = None, **train
) -> str:
    """A YAML config training the tiny BERT on ``data_dir`` (2 folds, logs every step); returns its path.

    ``cache``: the token cache folder (default ``tmp_path/cache``; share one across runs of a test
    to tokenize once); ``tricks``: the config's ``tricks`` section; ``train``: overrides of ``train``."""
    import yaml

    cfg = {
        "name": "cli-tiny",
        "output_dir": str(tmp_path / "runs"),
        "data": {"dir": str(data_dir)},
        "text": {"max_length": 32, "cache_dir": str(cache or tmp_path / "cache")},
        "model": {"name": str(model_dir)},
        "train": {"folds": 2, "epochs": 1, "batch_size": 32, "log_every": 1, "save_checkpoints": False, **train},
        "tricks": tricks or {},
        "blend": {"members": ["bm25"]},
    }
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


async def wait_until(pilot, pred, timeout: float = 15.0, what: str = "condition") -> None:
    """Let a Textual app run (Pilot) until ``pred()`` holds; AssertionError after ``timeout`` s."""
    import asyncio

    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, f"timed out waiting for {what}"
        await pilot.pause(0.05)
