"""Signals and temporary paths: a SIGINT never strands a temporary file or directory."""
from __future__ import annotations

import os
import signal
import time

import pytest
import typer

from isep.cli.common import run_command, scratch_dir, scratch_file
from isep.errors import ExitStatus, Interrupted
from isep.signals import raise_interrupted, signals_deferred


@pytest.fixture
def handlers_restored():
    """run_command installs its own SIGINT/SIGTERM handlers: give pytest its own back."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.fixture
def sigint_raises(handlers_restored):
    signal.signal(signal.SIGINT, raise_interrupted)


def test_a_signal_inside_signals_deferred_is_raised_when_the_block_ends(sigint_raises):
    reached_end_of_block = False
    with pytest.raises(Interrupted) as info:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here, and must not raise yet
            reached_end_of_block = True
    assert reached_end_of_block
    assert info.value.status == ExitStatus.INTERRUPTED


def test_without_deferral_the_signal_raises_at_once(sigint_raises):
    with pytest.raises(Interrupted):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)


def test_run_command_removes_scratch_paths_whatever_the_outcome(tmp_path, capsys, handlers_restored):
    made = []

    def interrupted_body():
        made.append(scratch_dir("scratch-", str(tmp_path)))
        (open(os.path.join(made[-1], "part"), "wb")).close()
        fd, path = scratch_file("scratch-", str(tmp_path), "a scratch file")
        os.close(fd)
        made.append(path)
        raise Interrupted(signal.SIGTERM)

    with pytest.raises(typer.Exit) as info:
        run_command("isep-test", False, interrupted_body)
    assert info.value.exit_code == ExitStatus.TERMINATED
    assert len(made) == 2 and not any(os.path.exists(p) for p in made)
    assert os.listdir(tmp_path) == []
    assert "interrupted by signal 15" in capsys.readouterr().err
