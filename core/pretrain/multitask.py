"""Multitask pre-training of a backbone on ESCI product text (``workbench pretrain``).

Source: "MultiTask Pre-Training for E-Commerce Product Search" (KDD Cup 2022 ESCI, the
ZhichunRoad solution, 5th/7th/8th on Tasks 1-3), Algorithm 1: every optimiser step draws one
batch for each enabled task, computes the task losses and back-propagates their weighted sum
``L = sum_t w_t * L_t`` once. Tasks (each switchable in the ``tasks`` config section):

* ``mlm``: masked language modelling on product text (title, bullets, description; Devlin et
  al. 2019): 15% of the maskable tokens, of which 80% -> ``[MASK]``, 10% -> random, 10% kept.
* ``p2q`` (Product2Query): binary classification of (query, product) pairs. Positives: judged
  pairs of the train split with a label in ``positive_labels`` and "fake queries": a contiguous
  span of the product's title whose length is Poisson(mu) (mu 4 for English/Spanish words, 8 for
  Japanese characters; clipped to [1, len]). Negatives: the same query with a random other product.
* ``brand`` / ``color`` (Product2Brand / Product2Color): the product's brand / colour predicted
  from its text with the value masked out; vocabulary of the most frequent values, the rest in
  an "other" bucket (index 0), empty values ignored (label -100).
* ``contrastive``: SimCSE (Gao et al. 2021): two dropout views of the same product text are the
  positive pair, the other in-batch views and a FIFO queue of momentum-encoder embeddings of
  earlier batches (ESimCSE, Wu et al. 2022; MoCo, He et al. 2020) are the negatives; InfoNCE.

Output: ``runs/<run_id>/backbone/`` (``save_pretrained`` of the transformers AutoModel and its
tokenizer), written to a temp folder and renamed, so ``model.name: runs/<run_id>/backbone``
fine-tunes with ``workbench train``. Per-task losses go to runs.db as ``pretrain/<task>_loss``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from core.config import DEFAULT_DATA_DIR, ConfigDict, check_ranges, parse_overrides, read_config_file
from core.config import build_section as _build
from core.config import set_dotted as _set_dotted
from core.errors import ConfigError, DataError
from core.modeling.tricks import param_groups
from core.runs import metric_names as mn
from core.runs.lifecycle import check_stop, checkpoint_requested
from core.runs.ranks import (
    all_ranks,
    any_rank,
    average_gradients,
    broadcast_module,
    distributed_world,
    is_main_rank,
    join_ranks,
    leave_ranks,
    rank,
    rank_store,
)
from core.runs.store import RunStore

log = logging.getLogger("esci.pretrain")

TASKS = ("mlm", "p2q", "brand", "color", "contrastive")
#: product text fields MLM / contrastive / attribute inputs may use -> products-file column
TEXT_COLUMNS = {
    "title": "product_title",
    "bullet_point": "product_bullet_point",
    "description": "product_description",
    "brand": "product_brand",
    "color": "product_color",
}
#: locales whose fake queries are cut in characters (no spaces between words)
CHARACTER_LOCALES = {"jp", "ja"}
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------- config
@dataclass
class PretrainDataConfig:
    """Where the official ESCI files are and which products to read."""

    RANGES: ClassVar[dict[str, str]] = {"max_products": ">= 1"}

    dir: str = DEFAULT_DATA_DIR
    locales: list[str] | None = None  # keep only these product_locale values
    max_products: int | None = None  # >= 1 or null; keep only the first N products with text (quick runs)
    text_fields: list[str] = field(default_factory=lambda: ["title", "bullet_point", "description"])


@dataclass
class PretrainModelConfig:
    """The backbone being pre-trained (any ``model.name`` that core.modeling.model resolves)."""

    RANGES: ClassVar[dict[str, str]] = {"max_length": ">= 8"}

    name: str = "all-MiniLM-L6-v2"
    pooling: Literal["cls", "mean"] = "mean"  # sequence vector of the p2q / attribute / contrastive heads
    max_length: int = 48  # >= 8; tokens per sequence (pairs included)


@dataclass
class PretrainTrainConfig:
    """Optimisation: one epoch = one pass over the products in batches of ``batch_size``."""

    RANGES: ClassVar[dict[str, str]] = {
        "seed": ">= 0",
        "epochs": ">= 1",
        "max_steps": ">= 1",
        "batch_size": ">= 2",
        "lr": "> 0",
        "head_lr": "> 0",
        "weight_decay": ">= 0",
        "warmup_ratio": "[0, 1)",
        "max_grad_norm": "> 0",
        "log_every": ">= 1",
        "num_threads": ">= 1",
        "checkpoint_every": ">= 0",
        "num_processes": ">= 1",
    }

    seed: int = 42  # >= 0
    epochs: int = 1  # >= 1
    max_steps: int | None = None  # >= 1 or null; stop after this many optimiser steps
    batch_size: int = 32  # >= 2 (in-batch negatives); products per step (and per task)
    lr: float = 5e-5  # > 0
    head_lr: float = 1e-3  # > 0; task heads
    weight_decay: float = 0.01  # >= 0
    warmup_ratio: float = 0.06  # [0, 1)
    max_grad_norm: float = 1.0  # > 0
    log_every: int = 1  # >= 1
    num_threads: int | None = None  # >= 1 or null
    freeze_embeddings: bool = False  # word embeddings not optimised (much faster AdamW steps on CPU)
    checkpoint_every: int = 200  # >= 0; steps between step checkpoints (workbench resume); 0 = none
    num_processes: int = 1  # >= 1; data-parallel ranks on this host (each its own batches; gradients averaged)


@dataclass
class MLMTaskConfig:
    """Masked LM on the product text (Devlin et al. 2019)."""

    RANGES: ClassVar[dict[str, str]] = {"weight": ">= 0", "mask_probability": "(0, 1)"}

    enabled: bool = True
    weight: float = 1.0  # >= 0
    mask_probability: float = 0.15  # (0, 1)


@dataclass
class P2QTaskConfig:
    """Product2Query: (query, product) -> relevant or not; fake queries are Poisson-length title spans (paper appendix)."""

    RANGES: ClassVar[dict[str, str]] = {
        "weight": ">= 0",
        "mu": "each > 0",
        "default_mu": "> 0",
        "negatives_per_positive": ">= 1",
    }

    enabled: bool = True
    weight: float = 1.0  # >= 0
    positive_labels: list[str] = field(default_factory=lambda: ["E"])  # judged pairs used as positives
    fake_queries: bool = True  # also a Poisson-length title span per product as a positive
    mu: dict[str, float] = field(default_factory=lambda: {"us": 4.0, "es": 4.0, "jp": 8.0})  # each > 0
    default_mu: float = 4.0  # > 0; locales not in ``mu``
    negatives_per_positive: int = 1  # >= 1


@dataclass
class AttributeTaskConfig:
    """Product2Brand / Product2Color: the masked value predicted from the text; frequent values, the rest "other"."""

    RANGES: ClassVar[dict[str, str]] = {"weight": ">= 0", "min_count": ">= 1", "max_size": ">= 1"}

    enabled: bool = True
    weight: float = 1.0  # >= 0
    min_count: int = 2  # >= 1; a value needs this many products to get its own class
    max_size: int = 1000  # >= 1; at most this many classes besides "other"


@dataclass
class ContrastiveTaskConfig:
    """SimCSE dropout views with a momentum-encoder queue of negatives (ESimCSE / MoCo)."""

    RANGES: ClassVar[dict[str, str]] = {"weight": ">= 0", "tau": "> 0", "queue_size": ">= 0", "momentum": "[0, 1]"}

    enabled: bool = True
    weight: float = 1.0  # >= 0
    tau: float = 0.05  # > 0; InfoNCE temperature
    queue_size: int = 256  # >= 0; momentum-encoder embeddings kept as extra negatives (0: in-batch only)
    momentum: float = 0.995  # [0, 1]; momentum encoder: theta_k <- m * theta_k + (1 - m) * theta_q


@dataclass
class TasksConfig:
    """One section per pre-training task; each has ``enabled`` and ``weight`` (its loss is summed with that weight)."""

    mlm: MLMTaskConfig = field(default_factory=MLMTaskConfig)
    p2q: P2QTaskConfig = field(default_factory=P2QTaskConfig)
    brand: AttributeTaskConfig = field(default_factory=AttributeTaskConfig)
    color: AttributeTaskConfig = field(default_factory=AttributeTaskConfig)
    contrastive: ContrastiveTaskConfig = field(default_factory=ContrastiveTaskConfig)

    def enabled(self) -> list[str]:
        """Names of the enabled tasks, in TASKS order."""
        return [t for t in TASKS if getattr(self, t).enabled]


@dataclass
class PretrainConfig(ConfigDict):
    """Everything a pre-training run needs; saved as ``runs/<run_id>/config.yaml``."""

    name: str = "pretrain"
    output_dir: str = "runs"
    kind: Literal["pretrain"] = "pretrain"  # tells a pre-training run's stored config from a training run's
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)


def check_pretrain_config(cfg: PretrainConfig) -> None:
    """Semantic checks beyond types: every setting's range (the ``RANGES`` of each section, see
    :func:`core.config.check_ranges`), at least one task, known text fields and labels.

    Raises:
        ConfigError: no task enabled, unknown text field or label, a value out of its range (one line).
    """
    check_ranges(cfg)
    if not cfg.tasks.enabled():
        raise ConfigError(f"tasks: all tasks are off; turn on at least one of {', '.join(TASKS)}")
    bad = [f for f in cfg.data.text_fields if f not in TEXT_COLUMNS]
    if bad or not cfg.data.text_fields:
        raise ConfigError(f"data.text_fields: unknown or empty {bad}; known: {list(TEXT_COLUMNS)}")
    bad = [lab for lab in cfg.tasks.p2q.positive_labels if lab not in ("E", "S", "C", "I")]
    if bad:
        raise ConfigError(f"tasks.p2q.positive_labels: unknown {bad}; expected E, S, C, I")


def pretrain_config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> PretrainConfig:
    """A checked PretrainConfig from a nested dict (e.g. a run's stored config) plus ``key=value`` overrides.

    Raises:
        ConfigError: unknown key, wrong type, or a failed :func:`check_pretrain_config`.
    """
    data = json.loads(json.dumps(data or {}))  # deep copy
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    cfg = _build(PretrainConfig, data, "")
    check_pretrain_config(cfg)
    return cfg


def load_pretrain_config(path: str | Path | None, overrides: list[str] | None = None) -> PretrainConfig:
    """Load a YAML/TOML pre-training config (defaults when ``path`` is None) plus ``key=value`` overrides.

    Raises:
        ConfigError: missing/unparsable file, unknown key (e.g. an unknown task name under
            ``tasks``), wrong type, all tasks off (one line, naming the file).
    """
    data = read_config_file(path) if path is not None else {}
    try:
        return pretrain_config_from_dict(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path or 'defaults'}: {exc}") from None


# ---------------------------------------------------------------------------------- data
@dataclass
class PretrainCorpus:
    """Products and judged pairs prepared for pre-training.

    Attributes:
        products: one row per product with text: ``product_id``, ``product_locale``, ``text``
            (the ``text_fields`` joined by the separator), ``title``, ``brand``, ``color``
            (cleaned strings, "" when empty).
        pairs: judged positive pairs of train-split queries: ``query`` (str), ``product`` (int,
            row of ``products``), ``query_id``.
        positives_of: query text -> set of product rows judged positive for it.
    """

    products: pd.DataFrame
    pairs: pd.DataFrame
    positives_of: dict[str, set[int]]


def load_corpus(cfg: PretrainConfig, separator: str = " | ") -> PretrainCorpus:
    """Read the products file (every product, not only judged ones) and the train-split examples.

    Streamed: the products' text is read batch by batch (parquet column projection) and only the
    cleaned, cut texts are kept; the judged pairs come from :func:`core.data.esci.load_esci`
    without product text, matched to products on ``(product_id, product_locale)`` by index, and
    each distinct query is cleaned once. At the release's size (1.8M products) this bounds the
    memory to about the cleaned corpus (see benchmarks/full_release.py).

    Args:
        cfg: the pre-training config (``data`` section; ``tasks.p2q.positive_labels``).
        separator: put between the text fields (the tokenizer's ``[SEP]`` in :func:`run_pretraining`).

    Returns:
        PretrainCorpus. Products whose ``text_fields`` are all empty are dropped (logged).

    Raises:
        DataError: folder or file missing, missing column(s) in the products file, the
            examples file invalid (see :func:`core.data.esci.load_esci`), no product with text.
    """
    from core.data.esci import find_dataset_files

    files = find_dataset_files(cfg.data.dir)
    out = _corpus_products(files.products, cfg, separator)
    empty = out["text"] == ""
    if empty.all():
        raise DataError(files.products, f"no product has text in {'/'.join(cfg.data.text_fields)} (all empty)")
    if empty.any():
        log.info("dropping %d of %d products with empty %s", int(empty.sum()), len(out), "/".join(cfg.data.text_fields))
    out = out[~empty]
    if cfg.data.max_products:
        out = out.iloc[: cfg.data.max_products]
    out = out.reset_index(drop=True)

    pairs = pd.DataFrame(
        {
            "query": pd.Series([], dtype=str),
            "product": pd.Series([], dtype=np.int64),
            "query_id": pd.Series([], dtype=np.int64),
        }
    )
    positives_of: dict[str, set[int]] = {}
    if cfg.tasks.p2q.enabled:
        pairs = _judged_pairs(cfg, out)
        for q, p in zip(pairs["query"], pairs["product"]):
            positives_of.setdefault(q, set()).add(int(p))
    return PretrainCorpus(out, pairs, positives_of)


def _corpus_products(path: Path, cfg: PretrainConfig, separator: str) -> pd.DataFrame:
    """Every product of ``path`` (``data.locales`` kept): ids and the cleaned ``text``, ``title``,
    ``brand``, ``color`` columns of :class:`PretrainCorpus`, empty texts included.

    Text values are read batch by batch; nulls become "" (non-text values ``str()``), each value
    is cleaned by :func:`core.data.text.clean_text` (``text_fields`` and the title cut to
    ``model.max_length * 12`` characters) and only the cleaned strings are kept.

    Raises:
        DataError: unreadable file, missing column(s), duplicate ``(product_id, product_locale)``.
    """
    from core.data.esci import PRODUCT_COLUMNS, TableFile
    from core.data.text import clean_text

    table = TableFile(path, PRODUCT_COLUMNS)
    keys = table.read(["product_id", "product_locale"])
    ids = {c: _as_str_values(keys[c]) for c in keys}
    del keys
    keep = np.ones(len(ids["product_id"]), dtype=bool)
    if cfg.data.locales:
        keep = ids["product_locale"].isin(cfg.data.locales).to_numpy()
    kept = pd.DataFrame({c: v[keep] for c, v in ids.items()})
    if kept.duplicated(["product_id", "product_locale"]).any():
        raise DataError(path, "duplicate (product_id, product_locale)")
    max_chars = cfg.model.max_length * 12
    fields = [TEXT_COLUMNS[f] for f in cfg.data.text_fields]
    read = list(dict.fromkeys([*fields, "product_title", "product_brand", "product_color"]))
    out: dict[str, list[str]] = {"text": [], "title": [], "brand": [], "color": []}
    start = 0
    for batch in table.iter_batches(read):
        n = len(batch[read[0]])
        sel = keep[start : start + n]
        start += n
        raw = {c: _as_str_values(batch[c])[sel] for c in read}
        cut = {
            c: [clean_text(v, max_chars=max_chars) for v in raw[c]] for c in dict.fromkeys([*fields, "product_title"])
        }
        out["text"] += [separator.join(v for v in vals if v) for vals in zip(*(cut[c] for c in fields))]
        out["title"] += cut["product_title"]
        out["brand"] += [clean_text(v) for v in raw["product_brand"]]
        out["color"] += [clean_text(v) for v in raw["product_color"]]
    return pd.DataFrame(
        {
            "product_id": kept["product_id"].to_numpy(),
            "product_locale": kept["product_locale"].to_numpy(),
            **out,
        }
    )


def _as_str_values(values) -> pd.Series:
    """An Arrow column as a pandas Series of ``str`` values, nulls as "" (``str()`` of anything else)."""
    col = pd.Series(values.to_pandas())
    return col.astype(object).where(col.notna(), "").astype(str)


def _judged_pairs(cfg: PretrainConfig, products: pd.DataFrame) -> pd.DataFrame:
    """Judged train-split pairs with ``tasks.p2q.positive_labels`` whose product is a row of
    ``products``: ``query`` (cleaned; empty ones dropped), ``product`` (row), ``query_id``.

    Raises:
        DataError: as :func:`core.data.esci.load_esci`.
    """
    from core.data.esci import load_esci
    from core.data.text import clean_text

    ex = load_esci(cfg.data.dir, split=None, locales=cfg.data.locales, text_columns=())
    ex = ex[(ex["split"] == "train") & ex["esci_label"].isin(cfg.tasks.p2q.positive_labels)]
    index = pd.MultiIndex.from_arrays(
        [products["product_id"].astype(object).to_numpy(), products["product_locale"].astype(object).to_numpy()]
    )
    prod = index.get_indexer(
        pd.MultiIndex.from_arrays(
            [ex["product_id"].astype(object).to_numpy(), ex["product_locale"].astype(object).to_numpy()]
        )
    ).astype(np.int64)
    keep = prod >= 0
    codes, uniques = pd.factorize(ex["query"].to_numpy()[keep])
    cleaned = np.array([clean_text(q) for q in uniques] + [""], dtype=object)
    queries = cleaned[codes].tolist() if len(codes) else []
    pairs = pd.DataFrame({"query": queries, "product": prod[keep], "query_id": ex["query_id"].to_numpy()[keep]})
    return pairs[pairs["query"] != ""].reset_index(drop=True)


def validate_pretrain(cfg: PretrainConfig, separator: str = " | ") -> PretrainCorpus:
    """Everything about a pre-training config that can be checked before its run row or folder
    exists (``workbench pretrain``, ``launch``, ``relaunch``, the app): :func:`check_pretrain_config`,
    then the corpus (:func:`load_corpus`) and, with ``tasks.p2q`` on and ``fake_queries`` off, at
    least one judged pair. Returns the corpus.

    Raises:
        ConfigError: as :func:`check_pretrain_config`. DataError: as :func:`load_corpus`, or no pairs for p2q.
    """
    check_pretrain_config(cfg)
    corpus = load_corpus(cfg, separator=separator)
    if cfg.tasks.p2q.enabled and not cfg.tasks.p2q.fake_queries and corpus.pairs.empty:
        raise DataError(
            cfg.data.dir,
            f"tasks.p2q: no judged train-split pairs with labels "
            f"{cfg.tasks.p2q.positive_labels} (and fake_queries is off)",
        )
    return corpus


# ---------------------------------------------------------------------------------- MLM
def mask_tokens(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption (Devlin et al. 2019, Sec. 3.1, "Task #1: Masked LM").

    Each maskable token is selected with probability ``probability``; a selected token becomes
    ``[MASK]`` with probability 0.8, a uniformly random vocabulary id with 0.1, and stays
    unchanged with 0.1. Same recipe as transformers' ``DataCollatorForLanguageModeling``.

    Args:
        input_ids: int64 (B, T) token ids.
        special_mask: bool (B, T), True for tokens never masked (special tokens, padding).
        mask_token_id: the tokenizer's ``[MASK]`` id.
        vocab_size: random replacements are drawn from ``[0, vocab_size)``.
        probability: selection rate of maskable tokens.
        generator: torch RNG (deterministic runs / tests).

    Returns:
        (inputs int64 (B, T), labels int64 (B, T)): labels are the original ids at selected
        positions and -100 everywhere else (ignored by cross-entropy). ``input_ids`` is not changed.
    """
    labels = input_ids.clone()
    prob = torch.full(input_ids.shape, probability)
    prob.masked_fill_(special_mask.bool(), 0.0)
    selected = torch.bernoulli(prob, generator=generator).bool()
    labels[~selected] = IGNORE_INDEX
    inputs = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=generator).bool() & selected
    inputs[to_mask] = mask_token_id
    to_random = torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=generator).bool() & selected & ~to_mask
    inputs[to_random] = torch.randint(vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)[
        to_random
    ]
    return inputs, labels


def mlm_batch(
    tokenizer, texts: list[str], max_length: int, probability: float = 0.15, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` (padded to the longest, cut to ``max_length``) and corrupt them with
    :func:`mask_tokens`; the tokenizer's special tokens (``[CLS]``, ``[SEP]``, ``[PAD]``, ``[UNK]``,
    ``[MASK]``, also where they occur inside a text) and padding are never selected.

    Returns:
        ``input_ids`` (corrupted), ``attention_mask``, ``labels`` (-100 except at selected
        positions), ``token_type_ids`` when the tokenizer returns them; int64 (B, T).
    """
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    ids = enc["input_ids"]
    special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=ids.dtype)
    special = torch.isin(ids, special_ids) | (enc["attention_mask"] == 0)
    inputs, labels = mask_tokens(ids, special, tokenizer.mask_token_id, len(tokenizer), probability, generator)
    out = {k: v for k, v in enc.items() if k in ("attention_mask", "token_type_ids")}
    return {"input_ids": inputs, **out, "labels": labels}


class MLMHead(nn.Module):
    """BERT's LM prediction head: dense + GELU + LayerNorm, then the decoder tied to the backbone's
    word embeddings (plus a bias). ``forward(h (N, H), embeddings (V, H))`` -> logits (N, V)."""

    def __init__(self, hidden: int, vocab_size: int, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, h: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(h))), embeddings, self.bias)


# ---------------------------------------------------------------------------------- Product2Query
def poisson_span(n_units: int, mu: float, rng: np.random.Generator) -> tuple[int, int]:
    """A contiguous span of a sequence of ``n_units`` units with a Poisson(``mu``) length.

    Length ``L = clip(Poisson(mu), 1, n_units)``, start uniform in ``[0, n_units - L]``
    (the fake-query construction of the ESCI multitask pre-training paper, Algorithm 1 and its
    appendix: mu = 4 for English/Spanish words, 8 for Japanese characters).

    Returns:
        (start, length) in units.

    Raises:
        ValueError: ``n_units < 1`` or ``mu <= 0``.
    """
    if n_units < 1:
        raise ValueError("poisson_span: empty sequence")
    if mu <= 0:
        raise ValueError(f"poisson_span: mu={mu} must be > 0")
    length = int(min(max(rng.poisson(mu), 1), n_units))
    start = int(rng.integers(0, n_units - length + 1))
    return start, length


def fake_query(title: str, locale: str, mu: float, rng: np.random.Generator) -> str:
    """A fake query cut from the product's ``title``: a contiguous Poisson(``mu``)-length span.

    Units are whitespace-separated words, except for Japanese (``locale`` ``jp``/``ja``), where
    they are characters (the text has no spaces between words). ``""`` for an empty title.

    Returns:
        A substring of ``title`` (words re-joined with one space; titles are whitespace-cleaned).
    """
    if locale.lower() in CHARACTER_LOCALES:
        units = list(title.strip())
        if not units:
            return ""
        s, n = poisson_span(len(units), mu, rng)
        return "".join(units[s : s + n]).strip() or title.strip()
    words = title.split()
    if not words:
        return ""
    s, n = poisson_span(len(words), mu, rng)
    return " ".join(words[s : s + n])


class P2QSampler:
    """Positive and negative (query, product) pairs for Product2Query, drawn step by step.

    The positive pool is the judged pairs (real queries) plus, when ``fake_queries``, one entry
    per product whose query is cut from its title at draw time (:func:`fake_query`). The pool is
    shuffled and walked through cyclically. Each positive gets ``negatives_per_positive``
    negatives: the same query with a uniformly random other product (not judged positive for it).
    """

    def __init__(self, corpus: PretrainCorpus, cfg: P2QTaskConfig, seed: int | list[int]):
        self.corpus = corpus
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        n_prod = len(corpus.products)
        real = [(q, int(p)) for q, p in zip(corpus.pairs["query"], corpus.pairs["product"])]
        fake = [(None, i) for i in range(n_prod)] if cfg.fake_queries else []
        self.pool = real + fake
        if not self.pool:
            raise DataError(
                None,
                f"tasks.p2q: no positive pairs (no judged train pairs with labels "
                f"{cfg.positive_labels}, fake_queries off)",
            )
        self.order = self.rng.permutation(len(self.pool))
        self.pos = 0

    def _mu(self, locale: str) -> float:
        return float(self.cfg.mu.get(locale, self.cfg.mu.get(locale.lower(), self.cfg.default_mu)))

    def draw(self, n_positive: int) -> tuple[list[str], list[int], np.ndarray]:
        """``n_positive`` positives and their negatives -> (queries, product rows, labels float32 0/1)."""
        prods = self.corpus.products
        n_prod = len(prods)
        queries, rows, labels = [], [], []
        for _ in range(n_positive):
            if self.pos >= len(self.order):
                self.order = self.rng.permutation(len(self.pool))
                self.pos = 0
            q, p = self.pool[self.order[self.pos]]
            self.pos += 1
            if q is None:
                q = fake_query(
                    prods["title"].iat[p] or prods["text"].iat[p],
                    prods["product_locale"].iat[p],
                    self._mu(prods["product_locale"].iat[p]),
                    self.rng,
                )
            queries.append(q)
            rows.append(p)
            labels.append(1.0)
            exclude = self.corpus.positives_of.get(q, set()) | {p}
            for _ in range(self.cfg.negatives_per_positive):
                if n_prod <= len(exclude):
                    break
                neg = int(self.rng.integers(n_prod))
                while neg in exclude:
                    neg = int(self.rng.integers(n_prod))
                queries.append(q)
                rows.append(neg)
                labels.append(0.0)
        return queries, rows, np.asarray(labels, dtype=np.float32)


# ---------------------------------------------------------------------------------- Product2Brand / Color
@dataclass
class AttributeVocab:
    """Classes of one product attribute: index 0 = "other", 1.. = the most frequent values.

    ``values[i]`` is the (case-folded) value of class i (``values[0] == "<other>"``).
    """

    values: list[str]

    def __len__(self) -> int:
        return len(self.values)

    def encode(self, raw: list[str]) -> np.ndarray:
        """int64 (N,) class per value: its index, 0 for a value outside the vocabulary, -100 for ""."""
        index = {v: i for i, v in enumerate(self.values)}
        out = np.empty(len(raw), dtype=np.int64)
        for j, v in enumerate(raw):
            key = normalize_value(v)
            out[j] = IGNORE_INDEX if not key else index.get(key, 0)
        return out


def normalize_value(value: str) -> str:
    """Attribute value key: whitespace collapsed, case-folded ("Black " and "black" are one class)."""
    return " ".join(str(value).split()).casefold()


def build_vocab(values: list[str], min_count: int, max_size: int) -> AttributeVocab:
    """Vocabulary of the ``max_size`` most frequent non-empty values seen ``>= min_count`` times
    (ties by value, so it is deterministic); everything else maps to "other" (index 0).

    Product2Brand / Product2Color of the ESCI multitask pre-training paper.
    """
    keys = (normalize_value(v) for v in values)
    counts = pd.Series([k for k in keys if k], dtype=object).value_counts()
    items = sorted(((int(c), v) for v, c in counts.items() if c >= min_count), key=lambda t: (-t[0], t[1]))
    return AttributeVocab(["<other>"] + [v for _, v in items[:max_size]])


def mask_values(text: str, values: list[str], mask_token: str) -> str:
    """``text`` with every whole-word, case-insensitive occurrence of each non-empty value
    replaced by ``mask_token`` (the attribute must not be readable from the input)."""
    for v in values:
        v = " ".join(v.split())
        if not v:
            continue
        pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in v.split()) + r"(?!\w)"
        text = re.sub(pattern, mask_token, text, flags=re.IGNORECASE)
    return text


# ---------------------------------------------------------------------------------- contrastive
def info_nce(anchors: torch.Tensor, positives: torch.Tensor, queue: torch.Tensor | None, tau: float) -> torch.Tensor:
    """InfoNCE over in-batch and queued negatives (SimCSE, Gao et al. 2021, eq. 1; the queue of
    ESimCSE, Wu et al. 2022 / MoCo, He et al. 2020).

    With ``a_i = anchors_i / ||anchors_i||``, ``p_j`` and ``k_m`` likewise normalised::

        loss = -1/B sum_i log( exp(a_i.p_i / tau) /
                               (sum_j exp(a_i.p_j / tau) + sum_m exp(a_i.k_m / tau)) )

    Args:
        anchors: (B, H) first views (with gradient).
        positives: (B, H) second views of the same texts (row i is the positive of anchor i).
        queue: (Q, H) negatives from earlier batches (no gradient), or None / empty.
        tau: temperature > 0.

    Returns:
        Scalar loss (mean over the B anchors), float32.
    """
    a = F.normalize(anchors.float(), dim=-1)
    p = F.normalize(positives.float(), dim=-1)
    logits = a @ p.T
    if queue is not None and len(queue):
        logits = torch.cat([logits, a @ F.normalize(queue.float(), dim=-1).T], dim=1)
    target = torch.arange(len(a), device=a.device)
    return F.cross_entropy(logits / tau, target)


class FeatureQueue:
    """A FIFO queue of at most ``capacity`` embeddings (rows), oldest first (MoCo's dictionary queue).

    ``enqueue(x (n, H))`` appends the rows (detached) and drops the oldest beyond ``capacity``;
    ``tensor`` is (len, H). Capacity 0 keeps nothing.
    """

    def __init__(self, capacity: int, dim: int):
        self.capacity = int(capacity)
        self.buf = torch.zeros(0, dim)

    def __len__(self) -> int:
        return len(self.buf)

    @property
    def tensor(self) -> torch.Tensor:
        return self.buf

    def enqueue(self, x: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        buf = torch.cat([self.buf.to(x.device), x.detach().to(self.buf.dtype)], dim=0)
        self.buf = buf[-self.capacity :]


@torch.no_grad()
def momentum_update(target: nn.Module, source: nn.Module, m: float) -> None:
    """``theta_target <- m * theta_target + (1 - m) * theta_source`` for every parameter
    (MoCo's momentum encoder, He et al. 2020, eq. 2; ESimCSE uses m = 0.995)."""
    for pt, ps in zip(target.parameters(), source.parameters()):
        pt.mul_(m).add_(ps.detach(), alpha=1.0 - m)


# ---------------------------------------------------------------------------------- model
class MultitaskModel(nn.Module):
    """The backbone plus one head per enabled task.

    ``encode(batch)`` -> last hidden states (B, T, H); ``pool(h, mask)`` -> (B, H) (mean or CLS);
    heads: ``mlm`` (:class:`MLMHead`), ``p2q`` Linear(H, 1), ``brand`` Linear(H, |brand vocab|),
    ``color`` Linear(H, |colour vocab|). Contrastive uses the pooled vector directly (SimCSE's
    unsupervised setting: no projection kept at inference).
    """

    def __init__(
        self, backbone: nn.Module, pooling: str, n_brand: int | None, n_color: int | None, mlm: bool, p2q: bool
    ):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        hidden = backbone.config.hidden_size
        self.heads = nn.ModuleDict()
        if mlm:
            self.heads["mlm"] = MLMHead(
                hidden,
                backbone.get_input_embeddings().weight.shape[0],
                eps=getattr(backbone.config, "layer_norm_eps", 1e-12),
            )
        if p2q:
            self.heads["p2q"] = nn.Linear(hidden, 1)
        if n_brand:
            self.heads["brand"] = nn.Linear(hidden, n_brand)
        if n_color:
            self.heads["color"] = nn.Linear(hidden, n_color)

    def encode(self, batch: dict[str, torch.Tensor], backbone: nn.Module | None = None) -> torch.Tensor:
        bb = backbone or self.backbone
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if "token_type_ids" in batch and getattr(bb.config, "type_vocab_size", 0) > 1:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        return bb(**kwargs).last_hidden_state

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H), (B, T) -> (B, H): :func:`core.modeling.model.pool_hidden` with the config's pooling."""
        from core.modeling.model import pool_hidden

        return pool_hidden(hidden, attention_mask, self.pooling)


# ---------------------------------------------------------------------------------- training
@dataclass
class PretrainResult:
    """What a finished pre-training run produced: the backbone folder and the per-task losses
    (mean of the first and of the last ``log_every`` window) and the wall time in seconds."""

    run_id: str
    run_dir: Path
    backbone_dir: Path
    first_losses: dict[str, float]
    last_losses: dict[str, float]
    steps: int
    seconds: float


def run_pretraining(
    cfg: PretrainConfig, store: RunStore, run_id: str | None = None, progress=None, resume: bool = False
) -> PretrainResult:
    """Pre-train ``cfg.model.name`` on the enabled tasks; record the run in ``store``.

    Data, tokenizer and weights are loaded before the run is created, so bad input leaves no run
    and no folder behind. The backbone is written to a temp folder under the run folder and
    renamed to ``runs/<run_id>/backbone`` at the end.

    With several ranks (``WORLD_SIZE`` > 1, :mod:`core.runs.ranks`) every rank draws its own
    batches (every N-th of the epoch's product order; its own Product2Query and masking draws and
    its own contrastive queue), the gradients are averaged over the ranks at every step, and rank 0
    alone writes runs.db, ``train.log``, ``resume.pt`` and the backbone.

    Args:
        cfg: the resolved config (see :func:`load_pretrain_config`).
        store: runs.db connection of this process.
        run_id: an existing ``queued`` run, or None for a new one; with ``resume``, the crashed,
            stopped or failed pre-training run to continue from its last step checkpoint.
        progress: a ``core.training.train.Progress`` (rich bar in the CLI) or None.
        resume: continue ``run_id`` (``workbench resume``).

    Returns:
        PretrainResult.

    Raises:
        ConfigError / DataError: bad config, data or model (nothing written).
        core.runs.lifecycle.RunStopped: SIGTERM/SIGINT (the run is marked ``stopped``, no backbone folder).
    """
    from core.modeling.model import load_backbone, load_tokenizer
    from core.training.train import NullProgress

    progress = progress or NullProgress()
    check_pretrain_config(cfg)
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    tokenizer = load_tokenizer(cfg.model.name)
    if cfg.tasks.mlm.enabled and tokenizer.mask_token_id is None:
        raise ConfigError(f"model.name={cfg.model.name}: tokenizer has no mask token (needed by tasks.mlm)")
    sep = f" {tokenizer.sep_token} " if tokenizer.sep_token else " | "
    corpus = validate_pretrain(cfg, separator=sep)
    backbone = load_backbone(cfg.model.name)

    join_ranks(cpu=not torch.cuda.is_available())  # several ranks (WORLD_SIZE > 1): torch.distributed
    if tc.num_threads:  # again: accelerate may set its own for several ranks on CPU
        torch.set_num_threads(tc.num_threads)
    try:
        return _run_pretraining(cfg, rank_store(store), run_id, progress, resume, tokenizer, corpus, backbone)
    finally:
        leave_ranks()


def _run_pretraining(
    cfg: PretrainConfig, store: RunStore, run_id: str | None, progress, resume: bool, tokenizer, corpus, backbone
) -> PretrainResult:
    """:func:`run_pretraining` after the checks: claim the run (other ranks than 0: ``store`` writes
    nothing), record it, pre-train, write the backbone."""
    from core.runs.lifecycle import atomic_write, claim_run, mark_running, recorded_run, setup_file_log

    run_id, run_dir = claim_run(store, cfg.name, cfg.to_dict(), cfg.output_dir, run_id=run_id, resume=resume)
    main = is_main_rank()
    if main:
        atomic_write(run_dir / "config.yaml", lambda p: p.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))
    handler = setup_file_log(run_dir) if main else logging.NullHandler()
    mark_running(store, run_id, run_dir, config=cfg.to_json(), model=cfg.model.name, task=0)
    if not resume:
        store.add_artifact(run_id, "config", run_dir / "config.yaml")
        store.add_artifact(run_id, "log", run_dir / "train.log")

    tmp_dir = run_dir / f".backbone.tmp-{os.getpid()}"
    try:
        with recorded_run(store, run_id, handler):
            result = _pretrain(cfg, store, run_id, run_dir, tmp_dir, tokenizer, corpus, backbone, progress, resume)
            log.info("run %s finished: backbone %s", run_id, result.backbone_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return result


def _pretrain(
    cfg: PretrainConfig,
    store: RunStore,
    run_id: str,
    run_dir: Path,
    tmp_dir: Path,
    tokenizer,
    corpus: PretrainCorpus,
    backbone: nn.Module,
    progress,
    resume: bool = False,
) -> PretrainResult:
    """The run's body: [delete the metric rows a resume logs again] -> build the loop -> [restore
    the step checkpoint] -> train -> write the backbone folder (temp folder, then rename)."""
    from core.training.fold_loop import load_step_checkpoint

    t0 = time.time()
    ckpt = None
    if resume:  # metric rows after the last step checkpoint are logged again: delete them first
        ckpt = load_step_checkpoint(run_dir / "resume.pt")
        if ckpt and ckpt.get("world", 1) != distributed_world():
            log.warning(
                "resume.pt was written by a run with %d process(es), this one has %d: ignored, pre-training "
                "starts again",
                ckpt.get("world", 1),
                distributed_world(),
            )
            ckpt = None
        after = ckpt["global_step"] if ckpt else 0
        store.delete_metrics(run_id, fold=0, after_step=after)
        store.delete_metrics(run_id, fold=-1, names=[mn.PROGRESS_STEP], after_step=after)
        store.delete_metrics(run_id, fold=-1, name_prefixes=[mn.PRETRAIN_PREFIX, mn.PROGRESS_TOTAL_STEPS])
    loop = PretrainLoop(cfg, store, run_id, run_dir, tokenizer, corpus, backbone, progress)
    if ckpt:
        loop.restore(ckpt)
    loop.train()
    if loop.global_step == 0:
        raise DataError(cfg.data.dir, "no pre-training step could run (fewer than 2 products with text?)")
    if not is_main_rank():  # rank 0 alone writes the backbone
        return PretrainResult(run_id, run_dir, run_dir / "backbone", {}, {}, loop.global_step, time.time() - t0)
    final = loop.save_backbone(tmp_dir)
    loop.ckpt_path.unlink(missing_ok=True)
    seconds = time.time() - t0
    store.log_metrics(
        run_id,
        [
            {"name": mn.PRETRAIN_SECONDS, "value": seconds, "fold": -1},
            *[
                {"name": mn.pretrain_loss_name(t, final=True), "value": v, "fold": -1}
                for t, v in loop.last_losses.items()
                if t != "total"
            ],
        ],
    )
    log.info("backbone written to %s (%d steps, %.0f s)", final, loop.global_step, seconds)
    return PretrainResult(run_id, run_dir, final, loop.first_losses, loop.last_losses, loop.global_step, seconds)


class PretrainLoop:
    """Multitask pre-training of one backbone (Algorithm 1 of the MultiTask Pre-Training seed):
    every step draws one batch of products and adds the weighted losses of the enabled tasks.

    Built in the order that fixes the random draws (``torch.manual_seed(train.seed)`` first):
    brand/colour vocabularies, the Product2Query sampler, the model and its heads, the momentum
    encoder and queue (contrastive), AdamW and the linear schedule. ``restore``/``checkpoint``
    read and write the step checkpoint (``resume.pt``); ``train`` runs the steps; ``save_backbone``
    writes ``runs/<id>/backbone``.
    """

    def __init__(
        self,
        cfg: PretrainConfig,
        store: RunStore,
        run_id: str,
        run_dir: Path,
        tokenizer,
        corpus: PretrainCorpus,
        backbone: nn.Module,
        progress,
    ):
        from transformers import get_linear_schedule_with_warmup

        self.cfg, self.store, self.run_id, self.run_dir = cfg, store, run_id, run_dir
        self.tokenizer, self.corpus, self.progress = tokenizer, corpus, progress
        tc, tk = cfg.train, cfg.tasks
        self.enabled = tk.enabled()
        torch.manual_seed(tc.seed)
        self.rng = np.random.default_rng(tc.seed)  # the epochs' product order: the same on every rank
        self.gen = torch.Generator().manual_seed(tc.seed + 104_729 * rank())  # masking: each rank its own
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda" and distributed_world() > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK") or 0))
        prods = self.prods = corpus.products
        self.n = len(prods)
        self._build_targets()
        self.model = MultitaskModel(
            backbone,
            cfg.model.pooling,
            len(self.brand_vocab) if self.brand_vocab else None,
            len(self.color_vocab) if self.color_vocab else None,
            tk.mlm.enabled,
            tk.p2q.enabled,
        ).to(self.device)
        if tc.freeze_embeddings:
            backbone.get_input_embeddings().weight.requires_grad_(False)
        self.momentum_bb, self.queue = None, None
        if tk.contrastive.enabled:
            self.momentum_bb = copy.deepcopy(backbone).to(self.device)
            self.momentum_bb.eval()
            for p in self.momentum_bb.parameters():
                p.requires_grad_(False)
            self.queue = FeatureQueue(tk.contrastive.queue_size, backbone.config.hidden_size)
        if distributed_world() > 1:  # rank 0's weights everywhere, then each rank its own dropout draws
            broadcast_module(self.model)
            if self.momentum_bb is not None:
                broadcast_module(self.momentum_bb)
            torch.manual_seed(tc.seed + rank())
        # backbone at lr (no decay on biases / LayerNorm), task heads at head_lr without decay
        groups = param_groups(self.model, tc.lr, tc.head_lr, tc.weight_decay)
        self.optimizer = torch.optim.AdamW(groups)
        self.trainable = [p for g in groups for p in g["params"]]
        # N ranks: each takes every N-th batch of an epoch (N x batch_size products a step)
        self.steps_per_epoch = math.ceil(math.ceil(self.n / tc.batch_size) / distributed_world())
        total = self.steps_per_epoch * tc.epochs
        self.total = min(total, tc.max_steps) if tc.max_steps else total
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, int(tc.warmup_ratio * self.total), self.total)
        store.log_metrics(
            run_id,
            [
                {"name": mn.PROGRESS_TOTAL_STEPS, "value": float(self.total), "fold": -1},
                *[{"name": mn.pretrain_task_on_name(t), "value": 1.0, "fold": -1} for t in self.enabled],
            ],
        )
        progress.start(self.total, "pre-training")
        self.pos_per_step = max(1, tc.batch_size // (1 + tk.p2q.negatives_per_positive))
        self.weights = {t: getattr(tk, t).weight for t in TASKS}
        self.keys: torch.Tensor | None = None  # the momentum encoder's keys of the batch, enqueued after the step
        self.ckpt_path = run_dir / "resume.pt"
        self.global_step, self.window, self.window_items = 0, {}, 0
        self.first_losses: dict[str, float] = {}
        self.last_losses: dict[str, float] = {}
        self.start_epoch, self.start_b = 0, 0

    def _build_targets(self) -> None:
        """Brand/colour vocabularies and class ids, their masked texts, the Product2Query sampler."""
        cfg, tk, prods = self.cfg, self.cfg.tasks, self.prods
        self.brand_vocab = (
            build_vocab(prods["brand"].tolist(), tk.brand.min_count, tk.brand.max_size) if tk.brand.enabled else None
        )
        self.color_vocab = (
            build_vocab(prods["color"].tolist(), tk.color.min_count, tk.color.max_size) if tk.color.enabled else None
        )
        brand_y = self.brand_y = self.brand_vocab.encode(prods["brand"].tolist()) if self.brand_vocab else None
        color_y = self.color_y = self.color_vocab.encode(prods["color"].tolist()) if self.color_vocab else None
        self.attr_text = None
        if self.brand_vocab or self.color_vocab:
            mask_tok = self.tokenizer.mask_token or self.tokenizer.unk_token or ""
            self.attr_text = [
                mask_values(t, [b if self.brand_vocab else "", c if self.color_vocab else ""], mask_tok)
                for t, b, c in zip(prods["text"], prods["brand"], prods["color"])
            ]
        seed = cfg.train.seed + 1 if rank() == 0 else [cfg.train.seed + 1, rank()]  # N ranks: own pairs each
        self.p2q = P2QSampler(self.corpus, tk.p2q, seed) if tk.p2q.enabled else None
        log.info(
            "pre-training %s on %s: %d products, %d judged positive pairs, tasks %s%s%s",
            cfg.model.name,
            cfg.data.dir,
            self.n,
            len(self.corpus.pairs),
            self.enabled,
            f", brand classes {len(self.brand_vocab)} ({(brand_y > 0).sum()} products in, "
            f"{(brand_y == 0).sum()} other, {(brand_y < 0).sum()} empty)"
            if self.brand_vocab
            else "",
            f", colour classes {len(self.color_vocab)} ({(color_y > 0).sum()} in, {(color_y == 0).sum()} other, "
            f"{(color_y < 0).sum()} empty)"
            if self.color_vocab
            else "",
        )

    def tok(self, texts, pairs=None) -> dict[str, torch.Tensor]:
        """Tokenize texts (or text pairs) to ``model.max_length``, padded, on the device."""
        enc = self.tokenizer(
            texts,
            pairs,
            truncation="longest_first" if pairs is not None else True,
            max_length=self.cfg.model.max_length,
            padding=True,
            return_tensors="pt",
        )
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def step_losses(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """One batch of every enabled task (Algorithm 1): ``idx`` (B,) product rows -> {task: scalar loss}."""
        tk, model, device, prods = self.cfg.tasks, self.model, self.device, self.prods
        losses: dict[str, torch.Tensor] = {}
        texts = prods["text"].iloc[idx].tolist()
        if tk.mlm.enabled:
            batch = {
                k: v.to(device)
                for k, v in mlm_batch(
                    self.tokenizer, texts, self.cfg.model.max_length, tk.mlm.mask_probability, self.gen
                ).items()
            }
            labels = batch.pop("labels")
            sel = labels != IGNORE_INDEX
            if sel.any():
                h = model.encode(batch)[sel]
                logits = model.heads["mlm"](h, model.backbone.get_input_embeddings().weight)
                losses["mlm"] = F.cross_entropy(logits.float(), labels[sel])
        if self.p2q is not None:
            queries, rows, y = self.p2q.draw(self.pos_per_step)
            batch = self.tok(queries, prods["text"].iloc[rows].tolist())
            pooled = model.pool(model.encode(batch), batch["attention_mask"])
            logit = model.heads["p2q"](pooled).squeeze(-1).float()
            losses["p2q"] = F.binary_cross_entropy_with_logits(logit, torch.from_numpy(y).to(device))
        if self.attr_text is not None:
            yb = self.brand_y[idx] if self.brand_y is not None else None
            yc = self.color_y[idx] if self.color_y is not None else None
            if (yb is not None and (yb != IGNORE_INDEX).any()) or (yc is not None and (yc != IGNORE_INDEX).any()):
                batch = self.tok([self.attr_text[i] for i in idx])
                pooled = model.pool(model.encode(batch), batch["attention_mask"])
                for name, y_ in (("brand", yb), ("color", yc)):
                    if y_ is not None and (y_ != IGNORE_INDEX).any():
                        losses[name] = F.cross_entropy(
                            model.heads[name](pooled).float(),
                            torch.from_numpy(y_).to(device),
                            ignore_index=IGNORE_INDEX,
                        )
        if self.momentum_bb is not None:
            batch = self.tok(texts)
            two = {k: torch.cat([v, v], 0) for k, v in batch.items()}  # two dropout views in one pass
            z = model.pool(model.encode(two), two["attention_mask"])
            z1, z2 = z[: len(idx)], z[len(idx) :]
            losses["contrastive"] = info_nce(
                z1, z2, self.queue.tensor.to(device) if len(self.queue) else None, tk.contrastive.tau
            )
            with torch.no_grad():
                keys = model.pool(model.encode(batch, backbone=self.momentum_bb), batch["attention_mask"])
            self.keys = F.normalize(keys.float(), dim=-1)
        return losses

    def train(self) -> None:
        """Steps until ``total`` (epochs x batches, capped by ``max_steps``); a requested stop
        takes effect before each step (:func:`core.runs.lifecycle.check_stop`, decided by all
        ranks together)."""
        tc = self.cfg.train
        self.model.train()
        window_t = time.time()
        for epoch in range(self.start_epoch, tc.epochs):
            epoch_rng = self.rng.bit_generator.state
            order = self.rng.permutation(self.n)
            for b in range(self.start_b if epoch == self.start_epoch else 0, self.steps_per_epoch):
                check_stop(f"pre-training step {self.global_step}", collective=True)  # SIGTERM/SIGINT
                idx = self.batch_rows(order, b)
                losses = self.step_losses(idx) if len(idx) >= 2 else {}  # in-batch negatives need two
                if not any_rank(bool(losses)):  # N ranks: a step is skipped only when every rank has nothing
                    continue
                loss = self.optimise(losses)
                self.global_step += 1
                self.window_items += len(idx)
                for t, v in losses.items():
                    self.window.setdefault(t, []).append(float(v.item()))
                if loss is not None:
                    self.window.setdefault("total", []).append(loss)
                ep = epoch + (b + 1) / self.steps_per_epoch
                self.progress.advance(
                    1,
                    description=f"pre-training epoch {epoch + 1}/{tc.epochs} loss {loss if loss is not None else float('nan'):.3f}",
                )
                if self.global_step % tc.log_every == 0 or self.global_step == self.total:
                    self.log_window(ep, time.time() - window_t)
                    window_t = time.time()
                if self.global_step >= self.total:
                    return
                if (
                    any_rank(checkpoint_requested())
                    or tc.checkpoint_every
                    and self.global_step % tc.checkpoint_every == 0
                ):
                    self.checkpoint(epoch, b, epoch_rng)  # SIGUSR1: checkpoint now, stop at the next step

    def batch_rows(self, order: np.ndarray, b: int) -> np.ndarray:
        """This rank's product rows of step ``b`` of an epoch in ``order``: batch ``b`` with one
        process; with N ranks batch ``b * N + rank`` of the epoch, the epoch's first batches again
        past its end (every rank takes ``steps_per_epoch`` steps)."""
        bs, n_ranks = self.cfg.train.batch_size, distributed_world()
        g = b if n_ranks == 1 else (b * n_ranks + rank()) % math.ceil(self.n / bs)
        return order[g * bs : (g + 1) * bs]

    def optimise(self, losses: dict[str, torch.Tensor]) -> float | None:
        """Backward of the weighted sum of ``losses`` (none: this rank adds no gradient), the
        gradients averaged over the ranks, clipping, optimizer and schedule step, the momentum
        encoder and queue. Returns the loss (None without losses)."""
        tc, tk = self.cfg.train, self.cfg.tasks
        self.optimizer.zero_grad(set_to_none=True)
        loss = sum(self.weights[t] * v for t, v in losses.items()) if losses else None
        if loss is not None:
            loss.backward()
        average_gradients(self.trainable)  # N ranks: one all_reduce; nothing with one process
        torch.nn.utils.clip_grad_norm_(self.trainable, tc.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.momentum_bb is not None:
            momentum_update(self.momentum_bb, self.model.backbone, tk.contrastive.momentum)
            if self.keys is not None:
                self.queue.enqueue(self.keys.cpu())
            self.keys = None
        return float(loss.item()) if loss is not None else None

    def log_window(self, ep: float, seconds: float) -> None:
        """Per-task and total mean losses, lr and products/s of the window (``pretrain/*_loss``,
        ``train/*``, ``progress/step``); keeps the first and last window's means. With N ranks the
        losses are rank 0's own batches' and products/s counts all ranks (rank 0's x N)."""
        dt, step = max(seconds, 1e-9) / distributed_world(), self.global_step  # products/s of all ranks
        means = {t: float(np.mean(v)) for t, v in self.window.items()}
        means.setdefault("total", float("nan"))  # N ranks: this rank may have had no loss in the window
        lr_now = self.scheduler.get_last_lr()[0]
        rows = [
            {"name": mn.pretrain_loss_name(t), "value": v, "fold": 0, "step": step, "epoch": ep}
            for t, v in means.items()
            if t != "total"
        ]
        rows += [
            {"name": mn.TRAIN_LOSS, "value": means["total"], "fold": 0, "step": step, "epoch": ep},
            {"name": mn.TRAIN_LR, "value": lr_now, "fold": 0, "step": step, "epoch": ep},
            {"name": mn.TRAIN_SAMPLES_PER_S, "value": self.window_items / dt, "fold": 0, "step": step, "epoch": ep},
            {"name": mn.PROGRESS_STEP, "value": float(step), "fold": -1, "step": step},
        ]
        self.store.log_metrics(self.run_id, rows)
        if not self.first_losses:
            self.first_losses = dict(means)
        self.last_losses = dict(means)
        log.info(
            "step %d/%d epoch %.2f loss %.4f (%s) lr %.2e %.1f products/s",
            step,
            self.total,
            ep,
            means["total"],
            " ".join(f"{t} {v:.4f}" for t, v in means.items() if t != "total"),
            lr_now,
            self.window_items / dt,
        )
        self.window, self.window_items = {}, 0

    def checkpoint(self, epoch: int, b: int, epoch_rng: dict) -> None:
        """Write ``resume.pt`` after batch ``b`` of ``epoch`` (``epoch_rng``: the order generator's
        state when the epoch began; at an epoch's end the next epoch starts from its state now).
        With N ranks every rank calls it: rank 0 writes the file with every rank's own generators
        and contrastive queue under ``ranks``."""
        from core.training.fold_loop import rng_state, save_step_checkpoint

        last_b = b + 1 == self.steps_per_epoch
        p2q, queue, momentum_bb = self.p2q, self.queue, self.momentum_bb
        own = {
            "queue": queue.buf if queue is not None else None,
            "gen": self.gen.get_state(),
            "p2q": (p2q.rng.bit_generator.state, p2q.order, p2q.pos) if p2q is not None else None,
            "rng": rng_state(),
        }
        ranks = all_ranks(own)
        if not is_main_rank():
            return
        save_step_checkpoint(
            self.ckpt_path,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "momentum": momentum_bb.state_dict() if momentum_bb is not None else None,
                **own,
                "world": distributed_world(),
                "ranks": ranks,
                "epoch_rng": self.rng.bit_generator.state if last_b else epoch_rng,
                "global_step": self.global_step,
                "window": self.window,
                "window_items": self.window_items,
                "first_losses": self.first_losses,
                "last_losses": self.last_losses,
                "epoch": epoch + 1 if last_b else epoch,
                "b": 0 if last_b else b + 1,
            },
        )

    def restore(self, ckpt: dict) -> None:
        """Load a ``resume.pt``: weights, heads, momentum encoder, queue, optimizer, scheduler,
        every generator, the epoch's order and position, the loss windows."""
        from core.training.fold_loop import set_rng_state

        own = ckpt["ranks"][rank()] if "ranks" in ckpt else ckpt  # this rank's generators and queue
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.momentum_bb is not None:
            self.momentum_bb.load_state_dict(ckpt["momentum"])
            self.queue.buf = own["queue"]
        self.gen.set_state(own["gen"])
        if self.p2q is not None:
            self.p2q.rng.bit_generator.state, self.p2q.order, self.p2q.pos = own["p2q"]
        self.rng.bit_generator.state = ckpt["epoch_rng"]
        set_rng_state(own["rng"])
        self.global_step, self.window, self.window_items = ckpt["global_step"], ckpt["window"], ckpt["window_items"]
        self.first_losses, self.last_losses = ckpt["first_losses"], ckpt["last_losses"]
        self.start_epoch, self.start_b = ckpt["epoch"], ckpt["b"]
        self.progress.advance(self.global_step)
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            self.ckpt_path.name,
            self.global_step,
            self.start_epoch,
            self.start_b,
        )

    def save_backbone(self, tmp_dir: Path) -> Path:
        """The backbone, tokenizer and ``pretrain.json`` (tasks, steps, vocabularies) into
        ``tmp_dir``, renamed to ``runs/<id>/backbone``; returns that folder."""
        self.progress.message("saving the backbone")
        self.model.backbone.save_pretrained(tmp_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp_dir)
        (tmp_dir / "pretrain.json").write_text(
            json.dumps(
                {
                    "run_id": self.run_id,
                    "tasks": self.enabled,
                    "steps": self.global_step,
                    "source_model": self.cfg.model.name,
                    "brand_vocab": self.brand_vocab.values if self.brand_vocab else None,
                    "color_vocab": self.color_vocab.values if self.color_vocab else None,
                },
                indent=1,
            )
        )
        final = self.run_dir / "backbone"
        if final.exists():
            shutil.rmtree(final)
        tmp_dir.rename(final)
        self.store.add_artifact(self.run_id, "backbone", final)
        return final
