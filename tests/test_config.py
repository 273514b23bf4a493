from __future__ import annotations

import pytest

from core.config import RunConfig, load_config, save_config
from core.errors import ConfigError


def test_overrides_are_typed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ntrain:\n  lr: 1.0e-4\n  epochs: 2\n")
    cfg = load_config(
        p,
        [
            "train.lr=3e-5",
            "train.epochs=4",
            "model.pooling=cls",
            "blend.members=bm25,random",
            "train.run_folds=[0,2]",
            "data.locales=[us, es]",
            "train.num_threads=null",
        ],
    )
    assert cfg.train.lr == pytest.approx(3e-5) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 4
    assert cfg.model.pooling == "cls"
    assert cfg.blend.members == ["bm25", "random"]
    assert cfg.train.run_folds == [0, 2]
    assert cfg.data.locales == ["us", "es"]
    assert cfg.name == "x"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=two", "train.epochs: expected an integer"),
        ("model.pooling=max", "model.pooling: 'max' is not one of"),
        ("train.nope=1", "unknown config key"),
        ("train.lr", "expected key=value"),
        ("train.save_checkpoints=maybe", "expected true/false"),
    ],
)
def test_bad_overrides(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: cannot parse"):
        load_config(bad)


def test_roundtrip_and_toml(tmp_path):
    cfg = load_config(None, ["train.seed=7"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    (tmp_path / "c.toml").write_text('name = "t"\n[train]\nfolds = 3\n')
    assert load_config(tmp_path / "c.toml").train.folds == 3
    assert RunConfig().train.folds == 5


def test_shipped_configs_load():
    from pathlib import Path

    from core.runs.launcher import load_any_config

    kinds = {}
    for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"):
        kinds[p.name] = getattr(load_any_config(p), "kind", "train")
    assert kinds["demo.yaml"] == "train" and kinds["pretrain.yaml"] == "pretrain"
