"""Progress of the long modes: a bar on a terminal, plain log lines anywhere else."""

import io
import logging

from dgae_jax import progress


def test_off_a_terminal_each_refresh_is_one_log_line(caplog):
    caplog.set_level(logging.INFO)
    with progress.bar(4, "eval", every_s=0, terminal=False) as meter:
        for _ in range(4):
            meter.update(1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval")]
    assert lines and all( "\r" not in line and "\n" not in line
                         for line in lines)
    assert "4/4" in lines[-1] and "image/s" in lines[-1] and "100%" in lines[-1]
    assert any("2/4" in line and "<" in line for line in lines)  # elapsed<remaining: the ETA


def test_quiet_shows_nothing(caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    with progress.bar(2, "eval", every_s=0, quiet=True) as meter:
        meter.update(2)
    with progress.bar(2, "eval", every_s=0, terminal=False, quiet=True) as meter:
        meter.update(2)
    assert not [r for r in caplog.records if r.getMessage().startswith("eval")]
    assert not stderr.getvalue()
