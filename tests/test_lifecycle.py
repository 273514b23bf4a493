"""The run lifecycle: a stop signal is a request honoured at safe points, writes are atomic."""

from __future__ import annotations

import logging
import os
import signal

import pandas as pd
import pytest
import torch

from core.errors import WorkbenchError
from core.runs.lifecycle import RunStopped, atomic_write, check_stop, recorded_run, stop_requested
from core.runs.store import RunStore


def test_sigterm_inside_a_library_try_except_still_stops_the_run(tmp_path, tiny_bert, monkeypatch):
    """The cause of the CI flake: transformers' BatchEncoding.convert_to_tensors wraps its
    torch.tensor call in ``except Exception`` and raises ValueError("Unable to create tensor").
    A SIGTERM landing there used to raise RunStopped inside that try, so the run ended
    ``failed`` with exit 1. Here the signal is delivered exactly there, every time."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_bert))
    store = RunStore(tmp_path / "runs.db")
    run_id = store.create_run("t", {})
    real_tensor = torch.tensor
    sent = []

    def tensor_then_sigterm(*a, **k):
        if not sent:  # one SIGTERM, delivered inside the library's try block
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs as soon as this call returns
        return real_tensor(*a, **k)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunStopped):
        with recorded_run(store, run_id, logging.NullHandler()):
            monkeypatch.setattr(torch, "tensor", tensor_then_sigterm)
            enc = tok(["red shoes", "a blue shirt for men"], padding=True, return_tensors="pt")
            monkeypatch.setattr(torch, "tensor", real_tensor)
            assert stop_requested() and enc["input_ids"].shape[0] == 2  # the library call completed
            check_stop("the next step")
    run = store.get_run(run_id)
    assert run["status"] == "stopped" and run["exit_code"] == 143
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
    assert not stop_requested()  # the flag does not leak into the next run of this process


def test_a_duplicate_signal_is_ignored_a_later_second_one_stops_at_once(tmp_path, monkeypatch):
    """`workbench stop` signals the process group and the supervisor forwards the signal too: the
    trainer gets two SIGTERMs within microseconds; that must not raise inside arbitrary code. A
    second signal after SECOND_SIGNAL_AFTER_S (a second Ctrl+C) raises at once."""
    import time

    import core.runs.lifecycle as lifecycle

    monkeypatch.setattr(lifecycle, "SECOND_SIGNAL_AFTER_S", 0.2)
    store = RunStore(tmp_path / "runs.db")
    run_id = store.create_run("t", {})
    with pytest.raises(RunStopped, match="second signal"):
        with recorded_run(store, run_id, logging.NullHandler()):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # the duplicate: no exception here
            assert stop_requested()
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGINT)  # later: raises at once
            raise AssertionError("not reached")
    assert store.get_run(run_id)["status"] == "stopped"


def test_a_stop_during_the_last_writes_still_reads_stopped(tmp_path):
    store = RunStore(tmp_path / "runs.db")
    run_id = store.create_run("t", {})
    with pytest.raises(RunStopped):
        with recorded_run(store, run_id, logging.NullHandler()):
            os.kill(os.getpid(), signal.SIGTERM)  # after the last check_stop of the body
    assert store.get_run(run_id)["status"] == "stopped"


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "oof.parquet"
    pd.DataFrame({"example_id": [1, 2]}).to_parquet(target)
    before = target.read_bytes()

    def bad(p):
        p.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(WorkbenchError, match=r"oof.parquet: cannot write \(No space left on device\)") as info:
        atomic_write(target, bad)
    assert "\n" not in str(info.value)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["oof.parquet"]
