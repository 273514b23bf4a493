"""``model.pretrain`` (core.training.backbone): the recipe pre-trains a backbone once, fine-tunes from
it, reuses it; training and launching refuse a config whose pre-training has not been run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import snapshot, tiny_config
from core.config import load_config
from core.errors import ConfigError
from core.runs.store import RunStore
from core.training.backbone import with_backbone


def _configs(tmp_path: Path, data_dir: Path, model_dir: Path, steps: int = 2) -> tuple[str, Path]:
    """A tiny pre-training config and a tiny training config whose ``model.pretrain`` names it."""
    pre = {
        "name": "pretrain-tiny",
        "kind": "pretrain",
        "data": {"dir": "set-by-the-training-config", "max_products": 64},
        "model": {"name": str(model_dir), "max_length": 24},
        "train": {"batch_size": 16, "max_steps": steps, "log_every": 1, "lr": 1e-3},
        "tasks": {"contrastive": {"queue_size": 16}},
    }
    pre_path = tmp_path / "pre.yaml"
    pre_path.write_text(yaml.safe_dump(pre))
    train = Path(tiny_config(tmp_path, data_dir, model_dir))
    cfg = yaml.safe_load(train.read_text())
    cfg["model"]["pretrain"] = str(pre_path)
    cfg["data"]["max_queries"] = 8
    train.write_text(yaml.safe_dump(cfg))
    return str(train), pre_path


def test_training_refuses_a_pretrain_that_has_not_run(tmp_path, small_dataset, tiny_bert):
    from core.runs.launcher import launch
    from core.training.train import run_training

    train, _ = _configs(tmp_path, small_dataset, tiny_bert)
    cfg = load_config(train)
    store = RunStore(str(tmp_path / "runs.db"))
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as err:
        run_training(cfg, store)
    msg = str(err.value)
    assert "\n" not in msg and "no finished pre-training run" in msg and "workbench pretrain" in msg
    with pytest.raises(ConfigError, match="no finished pre-training run"):
        launch(train, None, store)
    assert store.list_runs() == [] and snapshot(tmp_path) == before


@pytest.mark.parametrize("what", ["missing", "training-config"])
def test_a_bad_model_pretrain_is_one_line_naming_it(tmp_path, small_dataset, tiny_bert, what):
    train, _ = _configs(tmp_path, small_dataset, tiny_bert)
    target = tmp_path / "nope.yaml" if what == "missing" else Path(train)
    cfg = load_config(train, [f"model.pretrain={target}"])
    with pytest.raises(ConfigError) as err:
        with_backbone(cfg, RunStore(str(tmp_path / "runs.db")), pretrain_missing=True)
    msg = str(err.value)
    assert msg.startswith(f"model.pretrain={target}") and "\n" not in msg
    assert ("kind: pretrain" in msg) == (what == "training-config")


def test_recipe_pretrains_once_fine_tunes_from_the_backbone_and_reuses_it(tmp_path, small_dataset, tiny_bert):
    from core.demo import run_demo
    from core.runs.launcher import _queue

    train, pre_path = _configs(tmp_path, small_dataset, tiny_bert)
    store = RunStore(str(tmp_path / "runs.db"))
    report = run_demo(tmp_path / "no-sample-needed", store, data_dir=small_dataset, config_path=train)
    pre_runs = [r for r in store.list_records() if r.kind == "pretrain"]
    assert len(pre_runs) == 1 and pre_runs[0].status == "finished"
    pre = pre_runs[0]
    assert pre.config["data"]["dir"] == str(small_dataset)  # the training config's data, not the file's
    backbone = Path(pre.run_dir) / "backbone"
    run = store.get_record(report.result.run_id)
    assert run.status == "finished"
    assert run.config["model"]["name"] == str(backbone) and run.config["model"]["pretrain"] is None
    saved = yaml.safe_load((Path(run.run_dir) / "config.yaml").read_text())
    assert saved["model"]["name"] == str(backbone)  # a resumed or copied run finds it without runs.db

    # the same pre-training config again: reused by demo, train and launch; nothing pre-trained twice
    cfg = load_config(train)
    assert with_backbone(cfg, store).model.name == str(backbone)
    run_id, _, _ = _queue(cfg, train, [], store)  # what `workbench launch` queues (not started here)
    assert store.get_record(run_id).config["model"]["name"] == str(backbone)
    assert len([r for r in store.list_records() if r.kind == "pretrain"]) == 1

    # another pre-training setting is another backbone: refused by train until it has run
    (tmp_path / "b").mkdir()
    other = _configs(tmp_path / "b", small_dataset, tiny_bert, steps=3)[1]
    with pytest.raises(ConfigError, match="no finished pre-training run"):
        with_backbone(load_config(train, [f"model.pretrain={other}"]), store)
