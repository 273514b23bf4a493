"""A wheel works from any folder (issue 13, item 8).

Builds the wheel of the working tree (pyproject.toml, README.md, core/, workbench/ copied to a temp
folder, so nothing is written into the repository), installs it with ``--no-deps`` into a fresh
venv and runs the installed ``workbench`` from an empty temp folder. The venv sees the project's
dependencies (torch, transformers, ...) through a ``.pth`` line naming the test interpreter's
site-packages: a path line only, so that folder's own ``.pth`` files (the editable install's import
hook back to this checkout) are not run, and ``core`` / ``workbench`` come from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from conftest import REPO


def _run(cmd, cwd, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_runs_from_an_empty_folder(tmp_path):
    t0 = time.perf_counter()
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for pkg in ("core", "workbench"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # --no-build-isolation: the build backend is the test venv's setuptools (>= 77: torch requires it)
    res = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", src],
        cwd=tmp_path,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    (wheel,) = (tmp_path / "dist").glob("esci_workbench-*.whl")

    venv = tmp_path / "venv"
    res = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    py = venv / "bin" / "python"
    res = _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "-q", wheel], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
    site = Path(res.stdout.strip())
    (site / "_project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "elsewhere"  # an empty folder: no configs/, no repository
    work.mkdir()
    res = _run(
        [
            py,
            "-c",
            "import sys, core, workbench, core.demo as d, core.config as c; "
            "print(core.__file__); print(workbench.__file__); "
            "print(c.resolve_config_path(d.DEFAULT_CONFIG)); print(*sys.path, sep='\\n')",
        ],
        cwd=work,
    )
    assert res.returncode == 0, res.stderr
    core_file, workbench_file, demo_config, *path = res.stdout.splitlines()
    assert Path(core_file).is_relative_to(site) and Path(workbench_file).is_relative_to(site)
    assert Path(demo_config) == site / "core" / "bundled_configs" / "demo.yaml"
    assert not any(p and Path(p).resolve() in (REPO, REPO / "core", REPO / "workbench") for p in path), path

    exe = venv / "bin" / "workbench"
    res = _run([exe, "demo", "--help"], cwd=work)
    assert res.returncode == 0 and "--data" in res.stdout, res.stderr
    res = _run([exe, "configs", "list"], cwd=work)
    assert res.returncode == 0 and all(n in res.stdout for n in ("ablation", "demo_e5", "pretrain")), res.stderr
    # the bundled demo config is found and read (its range check is what refuses the run)
    res = _run([exe, "train", "demo.yaml", "--set", "train.epochs=0", "--db", work / "runs.db"], cwd=work)
    assert res.returncode == 2 and "demo.yaml: train.epochs=0: must be >= 1" in res.stderr, res.stderr
    assert _run([exe, "configs", "copy", "demo"], cwd=work).returncode == 0 and (work / "demo.yaml").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["demo.yaml"]  # nothing else written in the folder
    assert time.perf_counter() - t0 < 120
