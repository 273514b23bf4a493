"""Bad configs and data selections are refused before anything is created (issue 12, item 4).

Every numeric setting has a range (``RANGES`` of its section, documented next to its default);
``train``, ``launch``, ``pretrain``, ``ablate``, ``relaunch`` and the app's new-run dialog refuse a
value out of range, an empty config file, more folds than training queries and empty queries with
one line (exit 2 on the command line), no run row and no run folder.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sqlite3
import subprocess
import sys
import types
import typing
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import tiny_config, wait_until, write_official
from core import config as config_mod
from core.config import RunConfig, config_from_dict, load_config
from core.errors import ConfigError, DataError, WorkbenchError
from core.pretrain import multitask as pretrain_mod
from core.pretrain.multitask import PretrainConfig, load_pretrain_config, pretrain_config_from_dict
from core.runs.store import RunStore

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------- the ranges themselves
def _sections(root: type) -> list[type]:
    out, todo = [], [root]
    while todo:
        cls = todo.pop()
        if cls not in out:
            out.append(cls)
            todo += [t for t in typing.get_type_hints(cls).values() if dataclasses.is_dataclass(t)]
    return out


SECTIONS = _sections(RunConfig) + _sections(PretrainConfig)


def _is_numeric(tp) -> bool:
    return tp in (int, float) or any(_is_numeric(a) for a in typing.get_args(tp))


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_every_numeric_setting_has_a_range_documented_next_to_its_default(cls):
    hints = typing.get_type_hints(cls)
    ranges = getattr(cls, "RANGES", {})
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(ranges) <= fields, set(ranges) - fields
    numeric = {f for f in fields if _is_numeric(hints[f]) and not dataclasses.is_dataclass(hints[f])}
    # train.run_folds depends on train.folds: checked by core.config.check_config
    assert numeric - {"run_folds"} <= set(ranges), f"{cls.__name__}: no range for {numeric - set(ranges)}"
    lines, _ = inspect.getsourcelines(cls)
    for name, spec in ranges.items():
        config_mod._parse_range(spec)  # a spec the checker understands
        line = next(ln for ln in lines if re.match(rf"\s+{name}: ", ln))
        comment = line.split("#", 1)[1] if "#" in line else ""
        assert spec in comment, f"{cls.__name__}.{name}: the comment next to the default does not say {spec!r}"


def test_defaults_are_within_their_ranges():
    config_mod.check_config(RunConfig())
    pretrain_mod.check_pretrain_config(PretrainConfig())
    assert config_from_dict({}).train.checkpoint_every == 200


def _outside(spec: str, tp) -> object:
    """A value just outside ``spec`` for a field of type ``tp`` (a list / mapping gets one such item)."""
    r = re.fullmatch(r"(?:(\d+) values, )?(?:each )?(.+)", spec)
    n, cond = r[1], r[2]
    args = (
        [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType)
        else [tp]
    )
    container = typing.get_origin(args[0])
    item = typing.get_args(args[0])[-1] if container in (list, dict) else args[0]
    if m := re.fullmatch(r"(>=|>) (\S+)", cond):
        bound = float(m[2])
        bad = bound if m[1] == ">" else bound - (1 if item is int else 0.5)
    elif m := re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", cond):
        lo, hi = float(m[2]), float(m[3])
        bad = hi if m[4] == ")" else lo if m[1] == "(" else hi + 0.5
    elif m := re.fullmatch(r"in \{(.+)\}", cond):
        bad = max(yaml.safe_load(x) for x in m[1].split(",")) + 1
    else:
        raise AssertionError(spec)
    bad = int(bad) if item is int else float(bad)
    if container is list:
        return [bad] * (int(n) if n else 1)
    if container is dict:
        return {"x": bad}
    return bad


def _range_cases(root: type, prefix: str = "") -> list[tuple[str, object, type]]:
    cases = []
    hints = typing.get_type_hints(root)
    for f in dataclasses.fields(root):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            cases += _range_cases(tp, f"{prefix}{f.name}.")
        elif f.name in getattr(root, "RANGES", {}):
            cases.append((prefix + f.name, _outside(root.RANGES[f.name], tp), root))
    return cases


@pytest.mark.parametrize("kind", ["train", "pretrain"])
def test_each_range_refuses_a_value_just_outside_it(kind):
    build = config_from_dict if kind == "train" else pretrain_config_from_dict
    cases = _range_cases(RunConfig if kind == "train" else PretrainConfig)
    assert len(cases) >= (45 if kind == "train" else 20)
    for key, bad, _ in cases:
        with pytest.raises(ConfigError) as info:
            build({}, [f"{key}={json.dumps(bad)}"])
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(key) and "must be" in msg, (key, bad, msg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=0", "train.epochs=0: must be >= 1"),
        ("train.lr=-0.1", "train.lr=-0.1: must be > 0"),
        ("train.lr=.nan", "train.lr=nan: must be > 0"),
        ("train.warmup_ratio=1", "train.warmup_ratio=1.0: must be in [0, 1)"),
        ("data.task=4", "data.task=4: must be in {1, 2, 3}"),
        ("data.max_queries=0", "data.max_queries=0: must be >= 1"),
        ("tricks.class_weights=[1,2,3]", "tricks.class_weights=[1.0, 2.0, 3.0]: must be 4 values, each > 0"),
        ("tricks.class_weights=[1,0,1,1]", "tricks.class_weights=[1.0, 0.0, 1.0, 1.0]: each value must be > 0"),
        ("tricks.msd_rates=[0.1,1.0]", "tricks.msd_rates=[0.1, 1.0]: each value must be in [0, 1)"),
        ("text.budgets.title=-1", "text.budgets.title=-1: must be >= 0"),
        ("train.run_folds=[0,5]", "train.run_folds=[0, 5]: each value must be in 0..4 (train.folds=5)"),
        ("train.run_folds=[1,1]", "train.run_folds=[1, 1]: a fold is repeated"),
        ("text.fields=[title,price]", "text.fields: unknown field(s) ['price']"),
        ("text.budgets.titel=3", "text.budgets: unknown field(s) ['titel']"),
        ("text.max_length=16", "text.budgets.query=24: must be in 1..11"),
        ("train.checkpoint_every=-1", "train.checkpoint_every=-1: must be >= 0"),
    ],
)
def test_range_and_cross_field_messages(override, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict({}, [override])
    assert str(info.value).startswith(message), str(info.value)
    assert config_from_dict({}, ["train.num_threads=null", "tricks.class_weights=null"]).train.num_threads is None


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing but a comment\n", "{}\n"])
def test_an_empty_config_file_is_refused(tmp_path, text):
    from core.runs.launcher import load_any_config

    p = tmp_path / "c.yaml"
    p.write_text(text)
    for load in (load_config, load_pretrain_config, load_any_config):
        with pytest.raises(ConfigError) as info:
            load(p)
        assert str(info.value) == f"{p}: config file is empty"
    (tmp_path / "c.toml").write_text("# empty\n")
    with pytest.raises(ConfigError, match="config file is empty"):
        load_config(tmp_path / "c.toml")
    (tmp_path / "n.yaml").write_text("name: x\ncolour: red\n")
    with pytest.raises(ConfigError, match="unknown config key.*colour"):  # still refused: not a section
        load_config(tmp_path / "n.yaml")


# ---------------------------------------------------------------------------------- the bad-input table
#: case -> (training override, pre-training override, what the one line must name); None = empty file
CASES = {
    "epochs=0": ("train.epochs=0", "train.epochs=0", "train.epochs=0"),
    "batch_size=0": ("train.batch_size=0", "train.batch_size=0", "train.batch_size=0"),
    "evals_per_epoch=0": ("train.evals_per_epoch=0", "train.evals_per_epoch=0", "train.evals_per_epoch"),
    "folds=1": ("train.folds=1", "train.folds=1", "train.folds"),
    "folds=50": ("train.folds=50", "train.folds=50", "train.folds"),
    "max_length=0": ("text.max_length=0", "model.max_length=0", "max_length=0"),
    "lr=-0.1": ("train.lr=-0.1", "train.lr=-0.1", "train.lr=-0.1"),
    "empty file": (None, None, "config file is empty"),
}
#: what the training table must say besides the key (the pre-training config has no folds: unknown key)
TRAIN_DETAIL = {
    "folds=50": "20 training queries, fewer than train.folds=50",
    "folds=1": "must be >= 2",
    "evals_per_epoch=0": "must be >= 1",
}


def _config_path(tmp_path: Path, kind: str, small_dataset: Path, tiny_bert: Path, case: str) -> tuple[Path, list[str]]:
    """(config file, --set overrides) of ``case`` for a training or pre-training command."""
    if kind == "pretrain":
        from test_pretrain import _pretrain_config

        path = _pretrain_config(tmp_path, small_dataset, tiny_bert)
        path.write_text(yaml.safe_dump({"kind": "pretrain", **yaml.safe_load(path.read_text())}))  # for launch
        override = CASES[case][1]
    else:
        path = Path(tiny_config(tmp_path, small_dataset, tiny_bert))
        override = CASES[case][0]
    if override is None:
        path.write_text("# an empty config: only this comment\n")
        return path, []
    return path, [override]


def _nothing_created(tmp_path: Path, db: Path) -> None:
    if db.exists():
        with sqlite3.connect(db) as con:
            assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())


def _expect_one_line(message: str, case: str, kind: str) -> None:
    assert message.strip() and "\n" not in message.strip(), message
    assert CASES[case][2] in message, (case, message)
    if kind != "pretrain" and case in TRAIN_DETAIL:
        assert TRAIN_DETAIL[case] in message, (case, message)


#: the cases run through the real command line (each subprocess costs seconds of imports)
CLI_CASES = [
    ("train", "epochs=0"),
    ("train", "folds=50"),
    ("train", "empty file"),
    ("launch", "folds=50"),
    ("launch", "max_length=0"),
    ("launch", "lr=-0.1"),
    ("pretrain", "batch_size=0"),
    ("pretrain", "max_length=0"),
    ("pretrain", "empty file"),
    ("ablate", "folds=50"),
    ("ablate", "evals_per_epoch=0"),
    ("ablate", "folds=1"),
]


@pytest.mark.parametrize("command, case", CLI_CASES, ids=[f"{c}-{k}" for c, k in CLI_CASES])
def test_cli_refuses_bad_input_with_one_line_and_creates_nothing(tmp_path, small_dataset, tiny_bert, command, case):
    kind = "pretrain" if command == "pretrain" else "train"
    path, overrides = _config_path(tmp_path, kind, small_dataset, tiny_bert, case)
    db = tmp_path / "runs.db"
    args = [sys.executable, "-m", "workbench", command, str(path), "--db", str(db)]
    args += [a for o in overrides for a in ("--set", o)]
    if command == "ablate":
        args += ["--tricks", "ema"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    _expect_one_line(lines[0], case, kind)
    if case == "empty file":
        assert str(path) in lines[0]
    _nothing_created(tmp_path, db)


@pytest.fixture
def no_starts(monkeypatch):
    """Fail loudly instead of starting a process, training or pre-training anything."""
    import core.runs.launcher
    import core.training.train

    def refuse(*a, **k):
        raise AssertionError("bad input was not refused: something started")

    monkeypatch.setattr(
        core.runs.launcher,
        "subprocess",
        types.SimpleNamespace(Popen=refuse, DEVNULL=subprocess.DEVNULL, STDOUT=subprocess.STDOUT),
    )
    monkeypatch.setattr(core.training.train, "run_training", refuse)
    monkeypatch.setattr(pretrain_mod, "_pretrain", refuse)


def _train_in_process(path, overrides, store):
    """``workbench train``: load the config, then what run_training checks before its run exists."""
    from core.training.validate import validate_run

    validate_run(load_config(path, overrides))


def _launch_in_process(path, overrides, store):
    from core.runs.launcher import launch

    launch(path, overrides, store)


def _pretrain_in_process(path, overrides, store):
    pretrain_mod.run_pretraining(load_pretrain_config(path, overrides), store)


def _ablate_in_process(path, overrides, store):
    from core.training.ablate import run_ablation

    run_ablation(path, ["ema", "ls"], store, overrides)


IN_PROCESS = {
    "train": _train_in_process,
    "launch": _launch_in_process,
    "pretrain": _pretrain_in_process,
    "ablate": _ablate_in_process,
    "launch (pretrain config)": _launch_in_process,
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("command", list(IN_PROCESS))
def test_core_refuses_bad_input_and_creates_nothing(tmp_path, small_dataset, tiny_bert, no_starts, command, case):
    kind = "pretrain" if command.startswith("pretrain") or "pretrain config" in command else "train"
    path, overrides = _config_path(tmp_path, kind, small_dataset, tiny_bert, case)
    store = RunStore(tmp_path / "runs.db")
    with pytest.raises((ConfigError, DataError)) as info:
        IN_PROCESS[command](path, overrides, store)
    _expect_one_line(str(info.value), case, kind)
    _nothing_created(tmp_path, tmp_path / "runs.db")


def test_relaunch_of_a_stored_config_that_no_longer_validates_creates_nothing(
    tmp_path, small_dataset, tiny_bert, no_starts
):
    from core.runs.launcher import relaunch

    store = RunStore(tmp_path / "runs.db")
    good = load_config(tiny_config(tmp_path, small_dataset, tiny_bert)).to_dict()
    for change, part in [
        ({"epochs": 0}, "train.epochs=0: must be >= 1"),
        ({"folds": 50}, "20 training queries, fewer than train.folds=50"),
    ]:
        stored = json.loads(json.dumps(good))
        stored["train"].update(change)
        rid = store.create_run("old", stored, status="finished")
        with pytest.raises(WorkbenchError) as info:
            relaunch(store, rid)
        assert part in str(info.value) and "\n" not in str(info.value)
    assert len(store.list_runs()) == 2  # the two stored runs, no new one
    assert not (tmp_path / "runs").exists()


def test_static_conflicts_are_refused_before_the_data_is_read(tmp_path):
    from core.training.train import BLEND_MEMBERS
    from core.training.validate import BLEND_MEMBER_NAMES, validate_run

    assert set(BLEND_MEMBER_NAMES) == set(BLEND_MEMBERS)
    missing = str(tmp_path / "no-such-data")  # never read: the static checks fail first
    for overrides, part in [
        (["tricks.fgm=true", "tricks.pgd=true"], "tricks.fgm and tricks.pgd"),
        (["blend.members=[bm25,colbert]"], "blend.members: unknown ['colbert']"),
        (["labels.auto_drop_fraction=0.1"], "labels.auto_drop_fraction=0.1 needs labels.issues_run"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(part)):
            validate_run(config_from_dict({"data": {"dir": missing}}, overrides))
    cfg = config_from_dict({"data": {"dir": missing}})
    cfg.train.run_folds = [3, 9]  # changed in code after loading: checked again
    with pytest.raises(ConfigError, match=re.escape("train.run_folds=[3, 9]: each value must be in 0..4")):
        validate_run(cfg)
    with pytest.raises(DataError, match="no-such-data"):
        validate_run(config_from_dict({"data": {"dir": missing}}))


def test_max_queries_counts_for_the_folds(small_dataset):
    from core.training.validate import validate_run

    df = validate_run(config_from_dict({"data": {"dir": str(small_dataset), "max_queries": 3}, "train": {"folds": 3}}))
    assert df.loc[df["split"] == "train", "query_id"].nunique() == 3
    with pytest.raises(DataError) as info:
        validate_run(config_from_dict({"data": {"dir": str(small_dataset), "max_queries": 3}, "train": {"folds": 4}}))
    assert str(info.value) == (
        f"{small_dataset}: 3 training queries (data.max_queries=3), fewer than train.folds=4 "
        "(every fold needs at least one query)"
    )


def test_an_empty_query_is_refused_before_a_run_exists(tmp_path, small_dataset, tiny_bert, no_starts):
    from core.runs.launcher import launch

    ex = pd.read_parquet(small_dataset / "shopping_queries_dataset_examples.parquet")
    pr = pd.read_parquet(small_dataset / "shopping_queries_dataset_products.parquet")
    ex["query"] = ex["query"].astype(object)
    ids = ex["example_id"].iloc[[3, 5, 8]].tolist()
    ex.loc[ex.index[3], "query"] = None
    ex.loc[ex.index[5], "query"] = ""
    ex.loc[ex.index[8], "query"] = float("nan")
    data = write_official(tmp_path / "data", ex, pr)
    path = tiny_config(tmp_path, data, tiny_bert)
    store = RunStore(tmp_path / "runs.db")
    with pytest.raises(DataError) as info:
        launch(path, [], store)
    assert str(info.value) == (
        f"{data / 'shopping_queries_dataset_examples.parquet'}: 3 examples with an empty or "
        f"missing query (example_id {', '.join(map(str, ids))})"
    )
    _nothing_created(tmp_path, tmp_path / "runs.db")


async def test_new_run_dialog_shows_the_range_error_and_launches_nothing(
    tmp_path, monkeypatch, small_dataset, tiny_bert, no_starts
):
    from tui_fixture import RUNS, build_fixture_db, fixture_app
    from workbench.tui.dialogs import NewRunScreen

    monkeypatch.chdir(tmp_path)
    db = build_fixture_db(tmp_path)
    configs = tmp_path / "configs"
    configs.mkdir()
    cfg = yaml.safe_load(open(tiny_config(tmp_path, small_dataset, tiny_bert)))
    cfg["output_dir"] = str(tmp_path / "new-runs")
    (configs / "a.yaml").write_text(yaml.safe_dump(cfg))
    app = fixture_app(db, configs_dir=str(configs))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: getattr(app.screen, "loaded", False), what="the runs screen")
        await pilot.press("n")
        dlg = app.screen
        assert isinstance(dlg, NewRunScreen)
        check = dlg.query_one("#check")
        await wait_until(pilot, lambda: "ok" in str(check.render()), what="the config checked ok")
        dlg.query_one("#overrides").text = "train.epochs=0"
        await wait_until(pilot, lambda: "train.epochs=0: must be >= 1" in str(check.render()), what="the range error")
        assert dlg.valid is False
        # a data selection that cannot be trained on: refused by the launcher, shown in the dialog
        dlg.query_one("#overrides").text = "train.folds=50"
        await wait_until(pilot, lambda: "50 folds" in str(check.render()), what="the config checked ok")
        dlg.action_launch()
        await wait_until(pilot, lambda: "fewer than train.folds=50" in str(check.render()), what="the launch refused")
        assert isinstance(app.screen, NewRunScreen)
    assert len(RunStore(db).list_runs()) == len(RUNS)
    assert not (tmp_path / "new-runs").exists()
