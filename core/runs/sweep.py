"""Hyperparameter sweeps: Optuna ask-and-tell over ordinary detached runs.

A sweep samples config values from a search space (:func:`load_space`), launches each trial as an
ordinary run (``workbench launch`` with the sampled values as ``--set`` overrides, or a Slurm job),
tags it in runs.db (``runs.sweep``, ``runs.trial``) and watches runs.db: each fold's best figure
(``fold/<metric>``, logged when the fold ends) is reported to Optuna as the intermediate value at
step = fold index, and the pruner may stop the run (:func:`core.runs.launcher.stop_run`), which then
reads ``pruned`` with its rows kept; a finished run's run-level figure (``cv/<metric>``) is told as
the trial's value. The driver (:func:`drive`) keeps ``parallel`` trials running and can be killed at
any time: the runs are detached, and :func:`drive` on the same sweep re-attaches to them.

The study lives in an Optuna journal *file* (``JournalStorage`` + ``JournalFileBackend``, append-only,
with a lock that works on network file systems), ``<folder of runs.db>/sweeps/<name>.journal``, never
in a shared SQLite database (runs on Slurm nodes may need to reach it; SQLite's locks are unreliable
there). The sweep's settings are the study's user attribute ``sweep``; each trial's run id its user
attribute ``run_id``. Method: Optuna (Akiba et al., KDD 2019), median / Hyperband pruning on the
per-fold figures (Li et al., JMLR 2018, for Hyperband).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.config import config_from_dict, load_config, parse_overrides, read_config_file, save_config
from core.errors import ConfigError, WorkbenchError
from core.runs import metric_names as mn
from core.runs.store import RunStore, Status

#: the run-level metrics a sweep may maximise (``--metric``)
METRICS = (mn.CV_NDCG, mn.CV_TASK2_F1, mn.CV_FINAL_NDCG)
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
BACKENDS = ("local", "slurm")
PARAM_TYPES = ("float", "int", "categorical")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---------------------------------------------------------------------------------- the space
@dataclass(frozen=True)
class Param:
    """One dimension of the search space: a dotted config key and its distribution.

    ``float``: ``low``..``high`` (``log``: log-uniform, ``low`` > 0); ``int``: ``low``..``high``
    inclusive in steps of ``step``; ``categorical``: one of ``choices``.
    """

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: int | None = None
    choices: tuple[Any, ...] | None = None

    def distribution(self):
        """The Optuna distribution of this parameter."""
        import optuna

        if self.type == "float":
            return optuna.distributions.FloatDistribution(float(self.low), float(self.high), log=self.log)
        if self.type == "int":
            return optuna.distributions.IntDistribution(
                int(self.low), int(self.high), log=self.log, step=self.step or 1
            )
        return optuna.distributions.CategoricalDistribution(list(self.choices))

    def edge_values(self) -> list[Any]:
        """The values whose overrides must pass the config's checks: low and high, or each choice."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]

    def grid(self) -> list[Any]:
        """Every value, for the grid sampler (int and categorical parameters only).

        Raises:
            ConfigError: a float parameter (no finite grid).
        """
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        raise ConfigError(f"{self.key}: the grid sampler needs int or categorical parameters, not float")


def override(key: str, value: Any) -> str:
    """``key=value`` as ``--set`` reads it back to the same value (:func:`core.config.parse_overrides`):
    floats as ``repr``, strings quoted when YAML would read them as something else, lists as JSON."""
    if isinstance(value, bool) or value is None:
        text = json.dumps(value)
    elif isinstance(value, float):
        text = repr(value)
    elif isinstance(value, str):
        text = value
        if not value or parse_overrides([f"k={value}"])[0][1] != value:
            text = json.dumps(value)
    elif isinstance(value, (int, list, dict)):
        text = json.dumps(value)
    else:
        text = str(value)
    return f"{key}={text}"


def _num(where: str, name: str, value: Any, integer: bool) -> float | int:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{where}: {name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    return value


def parse_space(data: Any, where: str) -> list[Param]:
    """The parameters of a space mapping (``{dotted key: {type, low, high, log | step | choices}}``),
    checked on their own (not yet against a config).

    Raises:
        ConfigError: one line naming ``where`` (the space file), the key and the problem: not a
            mapping, an unknown type or field, a missing bound, a bad type of a bound, an empty range
            (low >= high), a log range with low <= 0, an empty or repeated choice list.
    """
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where}: a search space must be a non-empty mapping of config keys to distributions")
    params = []
    for key, spec in data.items():
        at = f"{where}: {key}"
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(f"{where}: {key!r}: a key must be a dotted config key")
        if not isinstance(spec, dict):
            raise ConfigError(f"{at}: expected a mapping {{type: float|int|categorical, ...}}, got {spec!r}")
        kind = spec.get("type")
        if kind not in PARAM_TYPES:
            raise ConfigError(f"{at}: type {kind!r} is not one of {list(PARAM_TYPES)}")
        allowed = {"float": {"low", "high", "log"}, "int": {"low", "high", "step", "log"}, "categorical": {"choices"}}
        extra = sorted(set(spec) - allowed[kind] - {"type"})
        if extra:
            raise ConfigError(f"{at}: unknown field(s) {extra} for type {kind} (allowed: {sorted(allowed[kind])})")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{at}: choices must be a non-empty list")
            if len({json.dumps(c, sort_keys=True) for c in choices}) != len(choices):
                raise ConfigError(f"{at}: a choice is repeated in {choices}")
            params.append(Param(key, kind, choices=tuple(choices)))
            continue
        for bound in ("low", "high"):
            if bound not in spec:
                raise ConfigError(f"{at}: {bound} is missing")
        integer = kind == "int"
        low, high = _num(at, "low", spec["low"], integer), _num(at, "high", spec["high"], integer)
        if low >= high:
            raise ConfigError(f"{at}: empty range (low {low} >= high {high})")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"{at}: log must be true or false, got {log!r}")
        if log and low <= 0:
            raise ConfigError(f"{at}: a log range needs low > 0 (low {low})")
        step = None
        if integer and "step" in spec:
            step = _num(at, "step", spec["step"], True)
            if step < 1:
                raise ConfigError(f"{at}: step must be >= 1, got {step}")
            if log and step != 1:
                raise ConfigError(f"{at}: a log range takes no step")
        params.append(Param(key, kind, low=low, high=high, log=log, step=step))
    return params


def check_space(params: list[Param], config_data: dict[str, Any], base: list[str], where: str) -> None:
    """Every key names a config setting and every value of every range passes the config's own checks:
    the config is built with each edge value (low and high, or each choice) as an override.

    Raises:
        ConfigError: ``<where>: <key>: <the config's own one-line message>`` (an unknown key, a value
            of the wrong type or out of range).
    """
    for p in params:
        for value in p.edge_values():
            try:
                config_from_dict(config_data, [*base, override(p.key, value)])
            except ConfigError as exc:
                raise ConfigError(f"{where}: {p.key}: {exc}") from None
        if p.type == "float":  # an int setting refuses a float value: 2.0 passes as 2 nowhere
            try:
                config_from_dict(config_data, [*base, override(p.key, (p.low + p.high) / 2)])
            except ConfigError as exc:
                raise ConfigError(f"{where}: {p.key}: {exc}") from None


def load_space(path: str | Path, config_path: str | Path, base: list[str] | None = None) -> list[Param]:
    """Read and check a space file (YAML) against a config (:func:`parse_space`, :func:`check_space`).

    Raises:
        ConfigError: one line naming the file: missing, unparsable, or a bad parameter.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: search space file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{p}: cannot parse search space: {str(exc).splitlines()[0]}") from None
    params = parse_space(data, str(p))
    config_data = read_config_file(config_path)
    if config_data.get("kind") == "pretrain":
        raise ConfigError(f"{config_path}: a pre-training config: sweeps tune training configs")
    check_space(params, config_data, list(base or []), str(p))
    return params


# ---------------------------------------------------------------------------------- settings, storage
@dataclass
class SweepSettings:
    """What a sweep is, kept in its study (user attribute ``sweep``) so ``resume`` needs nothing else.

    Attributes:
        name: the sweep (= the Optuna study name, the journal's file name, ``runs.sweep``).
        config: the base config file the trials are launched with (``<sweeps>/<name>.base.yaml``).
        space: the parameters as dicts (:class:`Param` fields).
        trials: how many trials to run (any end: complete, pruned or failed).
        parallel: trials running at once.
        backend / slurm: ``local`` or ``slurm`` and the Slurm options (``SlurmOptions`` fields).
        sampler / pruner / metric / seed: as given to ``workbench sweep``.
    """

    name: str
    config: str
    space: list[dict[str, Any]]
    trials: int
    parallel: int = 1
    backend: str = "local"
    sampler: str = "tpe"
    pruner: str = "median"
    metric: str = mn.CV_NDCG
    seed: int | None = None
    slurm: dict[str, Any] | None = None
    created: str = ""
    params: list[Param] = field(default_factory=list, repr=False)

    def __post_init__(self):
        self.params = [Param(**{**d, "choices": tuple(d["choices"]) if d.get("choices") else None}) for d in self.space]

    def to_attr(self) -> dict[str, Any]:
        """The JSON-able form stored in the study."""
        d = asdict(self)
        d.pop("params")
        return d

    @property
    def fold_metric(self) -> str:
        """The per-fold best of the metric's family: ``cv/ndcg`` -> ``fold/ndcg``."""
        return mn.fold_name(self.metric[len(mn.CV_PREFIX) :])


def sweeps_dir(store: RunStore | str | Path) -> Path:
    """``<folder of runs.db>/sweeps``: the sweeps' journals, base configs and best configs (``store``:
    a :class:`RunStore` or the path of runs.db)."""
    path = store.path if isinstance(store, RunStore) else store
    return Path(os.path.abspath(path)).parent / "sweeps"


def journal_path(store: RunStore | str | Path, name: str) -> Path:
    """The study journal of sweep ``name``: ``<sweeps>/<name>.journal``."""
    return sweeps_dir(store) / f"{name}.journal"


def _storage(path: Path):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return JournalStorage(JournalFileBackend(str(path)))


def _grid_sampler_class():
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's grid sampler without its ``study.stop()`` once the grid is covered: that works
        inside ``study.optimize`` only and raises after ``tell`` (the driver counts trials itself)."""

        def after_trial(self, study, trial, state, values) -> None:
            return None

    return GridSampler


def _GridSampler(grid, seed=None):
    return _grid_sampler_class()(grid, seed=seed)


def make_sampler(settings: SweepSettings):
    """The Optuna sampler of ``settings.sampler`` (tpe, random, or grid over every value).

    Raises:
        ConfigError: grid with a float parameter, or more trials than grid points.
    """
    import optuna

    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    if settings.sampler == "grid":
        grid = {p.key: p.grid() for p in settings.params}
        points = math.prod(len(v) for v in grid.values())
        if settings.trials > points:
            raise ConfigError(f"--trials {settings.trials}: the grid has {points} points (--sampler grid)")
        return _grid_sampler_class()(grid, seed=settings.seed)
    return optuna.samplers.TPESampler(seed=settings.seed)


def make_pruner(settings: SweepSettings, folds: int | None = None):
    """The Optuna pruner of ``settings.pruner``: ``median`` (Optuna's defaults: 5 trials before any
    prune, compared at the same fold), ``hyperband`` (resources = folds, 1..``folds``), ``none``."""
    import optuna

    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(2, int(folds or 2)), reduction_factor=3)
    return optuna.pruners.NopPruner()


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"--{what} {value!r}: must be one of {', '.join(allowed)}")


def create_sweep(
    store: RunStore | str | Path,
    config_path: str | Path,
    space_path: str | Path,
    trials: int,
    parallel: int = 1,
    backend: str = "local",
    sampler: str = "tpe",
    pruner: str = "median",
    metric: str = mn.CV_NDCG,
    name: str | None = None,
    seed: int | None = None,
    overrides: list[str] | None = None,
    slurm_opts: Any = None,
):
    """Check everything, then create the sweep: its journal (the study, direction maximize, the
    settings as its user attribute) and its base config ``<sweeps>/<name>.base.yaml`` (the config with
    ``overrides``). Nothing exists when a check fails.

    Args:
        store: runs.db (a :class:`RunStore`, or its path: runs.db is then not created here, so a
            refused sweep leaves nothing); the sweep's files go to ``<its folder>/sweeps``.
        config_path / space_path: the training config and the search space (:func:`load_space`).
        trials / parallel: trials in all (>= 1), running at once (>= 1).
        backend, sampler, pruner, metric: one of :data:`BACKENDS`, :data:`SAMPLERS`, :data:`PRUNERS`,
            :data:`METRICS`.
        name: the sweep's name (default: the config's name and the time, ``NAME-YYYYmmdd-HHMMSS``).
        seed: the sampler's seed (None: random).
        overrides: ``--set`` overrides of the base config.
        slurm_opts: :class:`core.runs.slurm.SlurmOptions` for ``backend="slurm"``.

    Returns:
        (study, settings).

    Raises:
        ConfigError: one line: a bad option, space, config or data selection, an existing sweep name.
        DataError: the config's data selection.
        WorkbenchError: no Slurm for ``backend="slurm"``.
    """
    import optuna

    for what, value, allowed in (
        ("backend", backend, BACKENDS),
        ("sampler", sampler, SAMPLERS),
        ("pruner", pruner, PRUNERS),
        ("metric", metric, METRICS),
    ):
        _check_choice(what, value, allowed)
    if trials < 1 or parallel < 1:
        raise ConfigError(f"--trials {trials} / --parallel {parallel}: both must be >= 1")
    base = list(overrides or [])
    params = load_space(space_path, config_path, base)
    cfg = load_config(config_path, base)
    name = name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not _NAME_RE.match(name):
        raise ConfigError(f"--name {name!r}: letters, digits, '.', '_' and '-' only")
    if journal_path(store, name).exists():
        raise ConfigError(
            f"{journal_path(store, name)}: sweep {name} exists (continue it: `workbench sweep resume {name}`)"
        )
    settings = SweepSettings(
        name=name,
        config=str(sweeps_dir(store) / f"{name}.base.yaml"),
        space=[{k: (list(v) if k == "choices" and v else v) for k, v in asdict(p).items()} for p in params],
        trials=int(trials),
        parallel=int(parallel),
        backend=backend,
        sampler=sampler,
        pruner=pruner,
        metric=metric,
        seed=seed,
        slurm=asdict(slurm_opts) if slurm_opts is not None else None,
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    make_sampler(settings)  # grid over a float parameter is refused here
    from core.runs.launcher import validate_any

    validate_any(cfg)  # the data selection, once, before anything exists
    if backend == "slurm":
        from core.runs import slurm

        slurm.require_slurm()
    if not isinstance(store, RunStore):
        from core.runs.store import check_db_location

        check_db_location(store)
    sweeps_dir(store).mkdir(exist_ok=True)
    save_config(cfg, settings.config)
    study = optuna.create_study(
        storage=_storage(journal_path(store, name)),
        study_name=name,
        direction="maximize",
        sampler=make_sampler(settings),
        pruner=make_pruner(settings, cfg.train.folds),
    )
    study.set_user_attr("sweep", settings.to_attr())
    return study, settings


def open_sweep(store: RunStore, name: str, pruner=None):
    """An existing sweep's study (its sampler and pruner made again from its settings, or ``pruner``).

    Returns:
        (study, settings).

    Raises:
        WorkbenchError: no sweep ``name`` next to this runs.db (one line naming the journal).
    """
    import optuna

    path = journal_path(store, name)
    if not _NAME_RE.match(name or "") or not path.is_file():
        known = ", ".join(list_sweep_names(store)) or "none"
        raise WorkbenchError(f"{path}: no sweep {name!r} (sweeps here: {known})")
    storage = _storage(path)
    try:
        settings = SweepSettings(**optuna.load_study(study_name=name, storage=storage).user_attrs["sweep"])
    except (KeyError, TypeError) as exc:
        raise WorkbenchError(f"{path}: not a workbench sweep ({exc})") from None
    folds = load_config(settings.config).train.folds if Path(settings.config).is_file() else 2
    study = optuna.load_study(
        study_name=name,
        storage=storage,
        sampler=make_sampler(settings),
        pruner=pruner if pruner is not None else make_pruner(settings, folds),
    )
    return study, settings


def list_sweep_names(store: RunStore) -> list[str]:
    """The names of the sweeps whose journal is in ``<sweeps>``, sorted."""
    folder = sweeps_dir(store)
    return sorted(p.stem for p in folder.glob("*.journal")) if folder.is_dir() else []


# ---------------------------------------------------------------------------------- the driver
@dataclass
class Progress:
    """Where a sweep stands: trials ended by state, running, the best value and its trial."""

    name: str
    total: int
    complete: int = 0
    running: int = 0
    pruned: int = 0
    failed: int = 0
    best: float | None = None
    best_trial: int | None = None

    @property
    def done(self) -> int:
        """Trials ended in any state."""
        return self.complete + self.pruned + self.failed

    def line(self) -> str:
        """``done 3 / running 2 / pruned 1 / failed 0 of 6, best 0.8123 (trial 2)``."""
        best = f"best {self.best:.4f} (trial {self.best_trial})" if self.best is not None else "best -"
        return (
            f"sweep {self.name}: done {self.complete} / running {self.running} / pruned {self.pruned} / "
            f"failed {self.failed} of {self.total}, {best}"
        )


def progress_of(study, settings: SweepSettings) -> Progress:
    """Count the study's trials (orphans, asked but never launched, are left out)."""
    from optuna.trial import TrialState

    p = Progress(settings.name, settings.trials)
    for t in counted_trials(study):
        if t.state == TrialState.COMPLETE:
            p.complete += 1
            if t.value is not None and (p.best is None or t.value > p.best):
                p.best, p.best_trial = t.value, t.number
        elif t.state == TrialState.PRUNED:
            p.pruned += 1
        elif t.state == TrialState.FAIL:
            p.failed += 1
        else:
            p.running += 1
    return p


def counted_trials(study) -> list:
    """The trials that count towards the sweep's total: all but the orphans (a driver killed between
    asking a trial and launching its run: user attribute ``orphan``)."""
    return [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("orphan")]


def _run_value(store: RunStore, run_id: str, metric: str) -> float | None:
    rows = [r for r in store.metrics(run_id, [metric]) if r["fold"] == -1]
    return float(rows[-1]["value"]) if rows else None


def _dotted(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def untagged_run(store: RunStore, settings: SweepSettings, params: dict[str, Any]) -> str | None:
    """The run a driver launched for a trial but was killed before tagging (between ``launch`` and
    :meth:`RunStore.set_sweep_trial`): the newest run without a sweep tag whose config holds every
    sampled value and the base config's name and output folder; None when there is none."""
    if not params:
        return None
    base = load_config(settings.config) if Path(settings.config).is_file() else None
    for r in store.list_records(limit=500):
        if r.sweep is not None or (
            base is not None and (r.name, r.config.get("output_dir")) != (base.name, base.output_dir)
        ):
            continue
        if all(_same(_dotted(r.config, k), v) for k, v in params.items()):
            return r.id
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)
    return a == b


class _Watched:
    """A running trial: its Optuna handle, run id and the folds already reported."""

    def __init__(self, trial, run_id: str, reported: set[int]):
        self.trial, self.run_id, self.reported = trial, run_id, reported


def launch_trial(store: RunStore, settings: SweepSettings, overrides: list[str]) -> str:
    """Start one trial's run as ``workbench launch`` would (detached, supervised), or submit it to
    Slurm with the sweep's options; returns the run id.

    Raises:
        ConfigError / DataError / WorkbenchError: as :func:`core.runs.launcher.launch` /
            :func:`core.runs.slurm.submit` (nothing is created).
    """
    if settings.backend == "slurm":
        from core.runs import slurm
        from core.runs.launcher import load_any_config

        opts = slurm.SlurmOptions(**(settings.slurm or {}))
        run_id, _ = slurm.submit(load_any_config(settings.config, overrides), store, opts, settings.config)
        return run_id
    from core.runs.launcher import launch

    run_id, _ = launch(settings.config, overrides, store)
    return run_id


def drive(
    store: RunStore,
    study,
    settings: SweepSettings,
    poll_s: float = 2.0,
    on_poll: Callable[[Progress], None] | None = None,
    launch_fn: Callable[[RunStore, SweepSettings, list[str]], str] = launch_trial,
) -> Progress:
    """Run the sweep until ``settings.trials`` trials have ended (or ``sweep stop`` asked it to end).

    Re-attaches first: each trial RUNNING in the study is matched to its run by its ``run_id`` user
    attribute (or runs.db's ``sweep``/``trial`` tag, or, for a run launched but never tagged, its config:
    :func:`untagged_run`) and watched again; one asked but never launched is
    told FAIL and marked ``orphan`` (it does not count); one whose prune was under way when its
    driver died ends pruned. Then, every ``poll_s`` seconds:
    :func:`core.runs.launcher.refresh_statuses` (crashed local runs, Slurm states and journals); each
    new ``fold/<metric>`` row of a running trial is reported (step = fold) and ``should_prune()`` asked
    (pruned: :func:`core.runs.launcher.stop_run`, then ``pruned`` in runs.db, rows kept); a finished
    run is told its ``cv/<metric>`` (FAIL when absent); a failed, crashed or stopped run FAIL; new
    trials are asked and launched while fewer than ``parallel`` run and fewer than ``trials`` exist.
    A pruned trial's run that reads ``stopped`` again (a Slurm job's journal ingested after the prune)
    is marked ``pruned`` again.
    Killing the driver never stops a run.

    Args:
        on_poll: called with the :class:`Progress` after every poll (a progress line).
        launch_fn: starts a trial's run (tests may stub it); default :func:`launch_trial`.

    Returns:
        The final :class:`Progress`.
    """
    import optuna
    from optuna.trial import TrialState

    from core.runs.launcher import refresh_statuses, stop_run

    watched: dict[int, _Watched] = {}
    tagged = {r.trial: r.id for r in store.sweep_runs(settings.name)}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        run_id = t.user_attrs.get("run_id") or tagged.get(t.number) or untagged_run(store, settings, t.params)
        if run_id is not None and t.number not in tagged:
            store.set_sweep_trial(run_id, settings.name, t.number)
        if run_id is None:
            optuna.trial.Trial(study, t._trial_id).set_user_attr("orphan", True)
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            continue
        trial = optuna.trial.Trial(study, t._trial_id)
        if "run_id" not in t.user_attrs:
            trial.set_user_attr("run_id", run_id)
        watched[t.number] = _Watched(trial, run_id, set(t.intermediate_values))

    def finish(w: _Watched, state, value: float | None = None) -> None:
        study.tell(w.trial, value if state == TrialState.COMPLETE else None, state=state, skip_if_finished=True)
        watched.pop(w.trial.number, None)

    def prune(w: _Watched, fold: int) -> None:
        w.trial.set_user_attr("pruning", fold)  # a driver killed mid-prune: resume ends it as pruned
        stop_run(store, w.run_id)
        status = store.mark_pruned(w.run_id, f"pruned by sweep {settings.name} after fold {fold}")
        if status == Status.FINISHED:  # it ended before the stop reached it
            value = _run_value(store, w.run_id, settings.metric)
            finish(w, TrialState.COMPLETE if value is not None else TrialState.FAIL, value)
        else:
            finish(w, TrialState.PRUNED)

    def check(w: _Watched) -> None:
        run = store.get_record(w.run_id)
        if run.status == Status.FINISHED:
            value = _run_value(store, w.run_id, settings.metric)
            finish(w, TrialState.COMPLETE if value is not None else TrialState.FAIL, value)
            return
        if run.status == Status.PRUNED or (not run.active and "pruning" in w.trial.user_attrs):
            store.mark_pruned(w.run_id, f"pruned by sweep {settings.name}")
            finish(w, TrialState.PRUNED)
            return
        if not run.active:  # failed, crashed, stopped, partial
            finish(w, TrialState.FAIL)
            return
        rows = [r for r in store.metrics(w.run_id, [settings.fold_metric]) if r["fold"] >= 0]
        new = False
        for r in sorted(rows, key=lambda r: r["fold"]):
            if r["fold"] not in w.reported:
                w.trial.report(float(r["value"]), step=int(r["fold"]))
                w.reported.add(int(r["fold"]))
                new = True
        if new and w.trial.should_prune():
            prune(w, max(w.reported))

    def stop_asked() -> bool:
        return bool(optuna.load_study(study_name=settings.name, storage=study._storage).user_attrs.get("stop"))

    while True:
        refresh_statuses(store)
        for w in list(watched.values()):
            check(w)
        pruned = {t.user_attrs.get("run_id") for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))}
        for run in store.sweep_runs(settings.name):
            if run.id in pruned and run.status == Status.STOPPED:  # a Slurm job's journal said stopped later
                store.mark_pruned(run.id, f"pruned by sweep {settings.name}")
        stopping = stop_asked()
        while not stopping and len(watched) < settings.parallel and len(counted_trials(study)) < settings.trials:
            trial = study.ask({p.key: p.distribution() for p in settings.params})
            overrides = [override(k, v) for k, v in trial.params.items()]
            try:
                run_id = launch_fn(store, settings, overrides)
            except (ConfigError, WorkbenchError) as exc:  # a sampled combination the config refuses
                trial.set_user_attr("error", str(exc))
                study.tell(trial, state=TrialState.FAIL)
                continue
            store.set_sweep_trial(run_id, settings.name, trial.number)
            trial.set_user_attr("run_id", run_id)
            watched[trial.number] = _Watched(trial, run_id, set())
        progress = progress_of(study, settings)
        if on_poll is not None:
            on_poll(progress)
        if not watched and (stopping or progress.done >= settings.trials):
            return progress
        time.sleep(poll_s)


def stop_sweep(store: RunStore, name: str, grace: float = 10.0) -> list[tuple[int, str, str]]:
    """``workbench sweep stop``: ask a running driver to launch nothing more (study user attribute
    ``stop``; ``resume`` clears it) and stop every active run of the sweep
    (:func:`core.runs.launcher.stop_run`).

    Returns:
        [(trial number, run id, status afterwards)] of the runs stopped.

    Raises:
        WorkbenchError: no such sweep.
    """
    from concurrent.futures import ThreadPoolExecutor

    from core.runs.launcher import refresh_statuses, stop_run

    study, _ = open_sweep(store, name)
    study.set_user_attr("stop", True)
    refresh_statuses(store)
    active = [run for run in store.sweep_runs(name) if run.active]

    def stop_one(run) -> tuple[int, str, str]:  # all at once: each its own connection
        own = RunStore(store.path)
        try:
            return run.trial, run.id, str(stop_run(own, run.id, grace=grace))
        finally:
            own.close()

    if not active:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(active))) as pool:
        return list(pool.map(stop_one, active))


def resume_sweep(store: RunStore, name: str):
    """Open a sweep to drive it again (``workbench sweep resume``): clears a ``sweep stop``.

    Returns:
        (study, settings).

    Raises:
        WorkbenchError: no such sweep, or another driver of it is alive on this host.
    """
    study, settings = open_sweep(store, name)
    if study.user_attrs.get("stop"):
        study.set_user_attr("stop", False)
    return study, settings


# ---------------------------------------------------------------------------------- reports
def trial_rows(store: RunStore, study, settings: SweepSettings) -> list[dict[str, Any]]:
    """The sweep's trials sorted by value (best first, trials without a value last, by number):
    ``{trial, run_id, state, status, value, params}`` (``status``: the run's status in runs.db)."""
    runs = {r.id: r for r in store.sweep_runs(settings.name)}
    rows = []
    for t in counted_trials(study):
        run_id = t.user_attrs.get("run_id")
        status = str(runs[run_id].status) if run_id in runs else "-"
        rows.append(
            {
                "trial": t.number,
                "run_id": run_id,
                "state": t.state.name.lower(),
                "status": status,
                "value": t.value,
                "params": dict(t.params),
            }
        )
    rows.sort(key=lambda r: (r["value"] is None, -(r["value"] or 0.0), r["trial"]))
    return rows


def best_config(store: RunStore, study, settings: SweepSettings) -> tuple[list[str], Path] | None:
    """The best trial's overrides and its run's full config written as ``<sweeps>/<name>.best.yaml``
    (``workbench train`` takes it as is); None before any trial completed."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not done:
        return None
    best = max(done, key=lambda t: t.value)
    sets = [override(k, v) for k, v in best.params.items()]
    path = sweeps_dir(store) / f"{settings.name}.best.yaml"
    run_id = best.user_attrs.get("run_id")
    try:
        cfg = config_from_dict(store.get_record(run_id).config) if run_id else load_config(settings.config, sets)
    except WorkbenchError:
        cfg = load_config(settings.config, sets)
    save_config(cfg, path)
    return sets, path


def importances(study) -> tuple[dict[str, float] | None, str]:
    """Parameter importances of the complete trials: fANOVA (Hutter et al., ICML 2014, Optuna's
    ``FanovaImportanceEvaluator``, offline), else mean decrease in impurity of a random forest.

    Returns:
        ({param: importance, summing to 1}, the evaluator's name), or (None, why not): fewer than 2
        complete trials, or no evaluator could fit them.
    """
    import warnings

    import optuna
    from optuna.trial import TrialState

    n = len([t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None])
    if n < 2:
        return None, f"{n} complete trial(s): importances need at least 2"
    why = ""
    for label, make in (
        ("fANOVA", optuna.importance.FanovaImportanceEvaluator),
        ("mean decrease impurity", optuna.importance.MeanDecreaseImpurityImportanceEvaluator),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                values = optuna.importance.get_param_importances(study, evaluator=make(seed=0))
            if values and all(math.isfinite(v) for v in values.values()):
                return dict(values), label
            why = f"{label}: no finite importances"
        except Exception as exc:  # noqa: BLE001 - an evaluator that cannot fit these trials: try the next
            why = f"{label}: {type(exc).__name__}: {exc}"
    return None, why


# ---------------------------------------------------------------------------------- one driver at a time
def driver_file(store: RunStore, name: str) -> Path:
    """``<sweeps>/<name>.driver``: the pid, process create time and host of the sweep's live driver."""
    return sweeps_dir(store) / f"{name}.driver"


def claim_driver(store: RunStore, name: str) -> None:
    """Record this process as the sweep's driver.

    Raises:
        WorkbenchError: another driver of the sweep is alive on this host (one line with its pid).
    """
    import psutil

    path = driver_file(store, name)
    try:
        other = json.loads(path.read_text())
    except (OSError, ValueError):
        other = None
    if other and other.get("host") == socket.gethostname() and other.get("pid") != os.getpid():
        try:
            alive = abs(psutil.Process(int(other["pid"])).create_time() - float(other["create_time"])) < 1.0
        except (psutil.Error, KeyError, TypeError, ValueError):
            alive = False
        if alive:
            raise WorkbenchError(f"{path}: sweep {name} is already driven by pid {other['pid']} on this host")
    me = {"pid": os.getpid(), "create_time": psutil.Process().create_time(), "host": socket.gethostname()}
    path.write_text(json.dumps(me))


def release_driver(store: RunStore, name: str) -> None:
    """Remove this process's driver record (a killed driver leaves it; the next one sees it dead)."""
    path = driver_file(store, name)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass
