"""A training config's pre-trained backbone: ``model.pretrain`` names a pre-training config.

The recipe (``configs/recipe.yaml``) fine-tunes the cross-encoder from the project's own multitask
pre-training (core.pretrain.multitask: MLM, Product2Query, Product2Brand/Color, contrastive; KDD Cup
2022 ESCI, "MultiTask Pre-Training for E-Commerce Product Search"). ``model.pretrain: pretrain.yaml``
ties the two: the pre-training config is read with the training config's ``data.dir`` and
``output_dir``, a finished pre-training run with exactly that config in runs.db is reused, and the
training config that is run (and saved with the run) names its backbone folder in ``model.name``,
so a resumed or copied run never depends on runs.db to find it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from core.config import RunConfig, read_config_file, resolve_config_path
from core.errors import ConfigError
from core.runs.store import RunStore


def backbone_pretrain_config(cfg: RunConfig):
    """``cfg.model.pretrain``'s :class:`~core.pretrain.multitask.PretrainConfig`, with ``data.dir`` and
    ``output_dir`` taken from ``cfg`` (pre-training reads the products of the data it fine-tunes on;
    its Product2Query positives come from the pre-training config's ``tasks.p2q.positive_labels``).

    Raises:
        ConfigError: the file is missing, unreadable, not a pre-training config, or has a bad setting
            (one line naming ``model.pretrain`` and the file).
    """
    from core.pretrain.multitask import load_pretrain_config

    try:
        path = resolve_config_path(cfg.model.pretrain)
        if read_config_file(path).get("kind") != "pretrain":  # a missing or unparsable file raises here
            raise ConfigError(f"{path}: not a pre-training config (it needs `kind: pretrain`)")
        return load_pretrain_config(path, [f"data.dir={cfg.data.dir}", f"output_dir={cfg.output_dir}"])
    except ConfigError as exc:
        raise ConfigError(f"model.pretrain={cfg.model.pretrain}: {exc}") from None


def find_backbone(store: RunStore, pretrain_cfg) -> Path | None:
    """The backbone folder of the newest finished pre-training run whose stored config equals
    ``pretrain_cfg`` (every setting, data folder included); None when there is none or its folder is gone."""
    want = pretrain_cfg.to_dict()
    for rec in store.list_records():
        if rec.kind == "pretrain" and rec.status == "finished" and rec.config == want and rec.run_dir:
            backbone = Path(rec.run_dir) / "backbone"
            if (backbone / "config.json").is_file():
                return backbone
    return None


def with_backbone(cfg: RunConfig, store: RunStore, pretrain_missing: bool = False, progress=None) -> RunConfig:
    """``cfg`` with ``model.name`` set to its pre-trained backbone and ``model.pretrain`` cleared.

    Without ``model.pretrain`` it returns ``cfg`` unchanged. Otherwise a finished pre-training run with
    the same config (see :func:`backbone_pretrain_config`) is reused; when there is none, the backbone
    is pre-trained first if ``pretrain_missing`` (``workbench demo``/``recipe``), else refused.

    Raises:
        ConfigError: a bad ``model.pretrain``; no finished pre-training run and ``pretrain_missing`` off
            (one line naming the command that makes it). Nothing is created.
        Whatever :func:`core.pretrain.multitask.run_pretraining` raises while pre-training.
    """
    if not cfg.model.pretrain:
        return cfg
    pretrain_cfg = backbone_pretrain_config(cfg)
    backbone = find_backbone(store, pretrain_cfg)
    if backbone is None:
        if not pretrain_missing:
            raise ConfigError(
                f"model.pretrain={cfg.model.pretrain}: no finished pre-training run with that config and "
                f"data.dir={cfg.data.dir} in {store.path}; run `workbench pretrain {cfg.model.pretrain} --set "
                f"data.dir={cfg.data.dir}` first (or `workbench recipe`, which pre-trains when needed)"
            )
        from core.pretrain.multitask import run_pretraining

        backbone = run_pretraining(pretrain_cfg, store, progress=progress).backbone_dir
    model = dataclasses.replace(cfg.model, name=str(backbone), pretrain=None)
    return dataclasses.replace(cfg, model=model)
