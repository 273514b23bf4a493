"""Bundled configs (issue 13, item 8): core/bundled_configs/ is package data, the repository's
configs/ links to it, a bare config name resolves ./ then ./configs/ then the bundled config, and
``workbench configs list|copy``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO
from core.config import bundled_configs, bundled_configs_dir, load_config, read_config_file, resolve_config_path
from core.demo import DEFAULT_CONFIG
from core.errors import ConfigError
from workbench.cli import app
from workbench.cli import configs as cli_configs

runner = CliRunner()
BUNDLED = {"ablation", "demo", "demo_e5", "pretrain", "recipe"}


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "workbench", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_the_repository_configs_folder_is_the_bundled_one():
    assert set(bundled_configs()) == BUNDLED
    assert (REPO / "configs").resolve() == bundled_configs_dir().resolve() == (REPO / "core" / "bundled_configs")
    for name, path in bundled_configs().items():
        assert read_config_file(path) and first_line(path).startswith("#"), name


def first_line(path: Path) -> str:
    return path.read_text().splitlines()[0]


def test_a_bare_name_resolves_here_then_configs_then_bundled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bundled = bundled_configs_dir() / "demo.yaml"
    assert resolve_config_path("demo.yaml") == bundled and resolve_config_path("demo") == bundled
    assert resolve_config_path("pretrain") == bundled_configs_dir() / "pretrain.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("name: from-configs\n")
    assert resolve_config_path("demo") == Path("configs/demo.yaml")
    assert load_config("demo.yaml").name == "from-configs"
    (tmp_path / "demo.yaml").write_text("name: from-here\n")
    assert load_config("demo.yaml").name == "from-here"
    assert load_config(str(bundled)).name == "demo-minilm"  # an explicit path is taken as given


def test_missing_configs_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^nope\.yaml: config file not found \(bundled: ablation, demo, demo_e5"):
        read_config_file("nope.yaml")
    with pytest.raises(ConfigError, match=r"^sub/demo\.yaml: config file not found$"):  # a folder: no fallback
        read_config_file("sub/demo.yaml")


def test_the_demo_default_config_works_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path(DEFAULT_CONFIG) == bundled_configs_dir() / "demo.yaml"
    assert load_config(DEFAULT_CONFIG).name == "demo-minilm"


def test_configs_list_names_every_bundled_config_with_its_first_comment(monkeypatch):
    monkeypatch.setattr(cli_configs.console, "width", 250)
    res = runner.invoke(app, ["configs", "list"])
    assert res.exit_code == 0, res.output
    for name, path in bundled_configs().items():
        line = next(ln for ln in res.output.splitlines() if ln.strip().startswith(name + " "))
        assert cli_configs.first_comment(path) in line and path.name in line


def test_configs_copy_never_overwrites(tmp_path):
    src = bundled_configs_dir() / "demo.yaml"
    res = _cli("configs", "copy", "demo", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "demo.yaml").read_bytes() == src.read_bytes()
    (tmp_path / "demo.yaml").write_text("name: mine\n")
    res = _cli("configs", "copy", "demo.yaml", cwd=tmp_path)
    assert res.returncode == 2 and "already exists; not overwritten" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and (tmp_path / "demo.yaml").read_text() == "name: mine\n"
    (tmp_path / "sub").mkdir()
    assert _cli("configs", "copy", "pretrain", "sub", cwd=tmp_path).returncode == 0
    assert (tmp_path / "sub" / "pretrain.yaml").read_bytes() == (bundled_configs_dir() / "pretrain.yaml").read_bytes()
    res = _cli("configs", "copy", "nope", cwd=tmp_path)
    assert res.returncode == 2 and "no bundled config of that name" in res.stderr


def test_a_bare_name_trains_from_any_folder_and_usage_errors_exit_2(tmp_path):
    res = _cli("train", "demo.yaml", "--set", "train.epochs=0", cwd=tmp_path)  # found, then refused by its range
    assert res.returncode == 2 and "train.epochs=0: must be >= 1" in res.stderr, res.stderr
    res = _cli("train", cwd=tmp_path)  # a usage error (typer's own click): the usage line, exit 2, no traceback
    assert res.returncode == 2 and "Missing argument" in res.stderr and "Traceback" not in res.stderr, res.stderr
