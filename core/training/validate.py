"""Checks of a training run that need no run row: the config's cross-field rules and the data selection.

Called before ``store.create_run`` by every way a run starts (``workbench train`` through
:func:`core.training.train.run_training`, ``launch`` / ``relaunch`` / the app's new-run dialog through
:mod:`core.runs.launcher`, ``workbench ablate`` through :mod:`core.training.ablate`), so a bad config or a data
selection that cannot be trained on is one line on stderr (exit 2) and leaves nothing behind.
"""

from __future__ import annotations

import pandas as pd

from core.config import RunConfig, check_config
from core.data.augment import load_translations
from core.data.esci import load_esci
from core.errors import ConfigError, DataError

#: the scorers ``blend.members`` may name (the keys of :data:`core.training.train.BLEND_MEMBERS`)
BLEND_MEMBER_NAMES = ("bm25", "dense", "dense-e5", "random")


def load_training_frame(cfg: RunConfig) -> pd.DataFrame:
    """Examples of ``cfg.data`` (train and test split), with ``max_queries`` applied to train.

    Raises:
        DataError: see :func:`core.data.esci.load_esci`.
    """
    df = load_esci(cfg.data.dir, task=cfg.data.task, locales=cfg.data.locales)
    if cfg.data.max_queries:
        train_q = pd.unique(df.loc[df["split"] == "train", "query_id"])
        keep = set(train_q[: cfg.data.max_queries])
        df = df[(df["split"] != "train") | df["query_id"].isin(keep)].reset_index(drop=True)
    if not (df["split"] == "train").any():
        raise DataError(cfg.data.dir, "no examples with split == 'train' to train on")
    return df


def check_run_config(cfg: RunConfig) -> None:
    """The static checks of a training config, no data read: ranges and cross-field rules
    (:func:`core.config.check_config`, again for configs changed in code), ``tricks.fgm`` with
    ``tricks.pgd``, unknown ``blend.members``, the ``features`` section
    (:func:`core.modeling.features.check_features`, gensim for ``init: word2vec`` included),
    ``labels.auto_drop_fraction`` without a run to take the issues from, ``model.pooling: markers``
    without ``text.field_markers`` (the pooled hidden states are those of the field markers).

    Raises:
        ConfigError: one line naming the key.
    """
    from core.modeling.features import check_features  # torch: imported when a run is checked, not with the module

    check_config(cfg)
    if cfg.tricks.fgm and cfg.tricks.pgd:
        raise ConfigError("tricks.fgm and tricks.pgd both perturb the word embeddings: turn on one of them")
    unknown = [m for m in cfg.blend.members if m not in BLEND_MEMBER_NAMES]
    if unknown:
        raise ConfigError(f"blend.members: unknown {unknown}; known: {sorted(BLEND_MEMBER_NAMES)}")
    check_features(cfg.features)
    if cfg.model.pooling == "markers" and not cfg.text.field_markers:
        raise ConfigError("model.pooling=markers needs text.field_markers: true (it pools the field markers' states)")
    if cfg.labels.auto_drop_fraction > 0 and not (cfg.labels.issues_run or cfg.labels.decisions_from):
        raise ConfigError(
            f"labels.auto_drop_fraction={cfg.labels.auto_drop_fraction} needs labels.issues_run "
            "(a run with stored label issues)"
        )


def validate_run(cfg: RunConfig) -> pd.DataFrame:
    """Everything about ``cfg`` that can be checked before a run row or folder exists; returns the
    training frame (:func:`load_training_frame`) so the caller need not read the data again.

    Order: the static checks of :func:`check_run_config` first (fast, no data read), then the data
    selection: the files load (:func:`core.data.esci.load_esci`), ``data.max_queries`` applied, at
    least one training example, at least ``train.folds`` distinct training queries, then the
    ``data.augment_translations`` file (:func:`core.data.augment.load_translations`).

    Raises:
        ConfigError: a setting out of range or in conflict with another (one line naming the key).
        DataError: the data files or the selection (one line ``"<data.dir or file>: <problem>"``),
            e.g. fewer training queries than ``train.folds``.
    """
    check_run_config(cfg)
    df = load_training_frame(cfg)
    n_queries = int(df.loc[df["split"] == "train", "query_id"].nunique())
    if n_queries < cfg.train.folds:
        cap = f" (data.max_queries={cfg.data.max_queries})" if cfg.data.max_queries else ""
        raise DataError(
            cfg.data.dir,
            f"{n_queries} training queries{cap}, fewer than train.folds={cfg.train.folds} "
            "(every fold needs at least one query)",
        )
    if cfg.data.augment_translations:
        load_translations(cfg.data.augment_translations, df, cfg.data.dir)  # read again by the trainer
    return df
