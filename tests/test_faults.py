"""Faults injected into training runs: non-finite steps are skipped and counted, a streak of them
stops the run with the last finite state checkpointed; an error inside the loop lets the
checkpoint in flight finish and exits with the one original error; a corrupt checkpoint is never
restored; SIGKILL at any moment loses nothing; an unwritable workdir or a failed save stops in
one line with only complete checkpoints left."""

import errno
import logging
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dgae_jax import checkpoint, parallel, runs, steps, trainer
from dgae_jax.errors import CheckpointWriteError, ConfigError, CorruptCheckpoint
from dgae_jax.validation import validate
from fakes import PoisonedTask, SyntheticLatentTask, ldm_train_config, mesh_of

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_a_nonfinite_step_is_not_applied_and_is_counted():
    cfg = ldm_train_config()
    task = PoisonedTask(cfg, poison=(1, 2))
    mesh = mesh_of(1, 1)
    fns = steps.build_steps(cfg, task, mesh)
    model = jax.device_put(task.model, parallel.replicated(mesh))
    state = fns.init(model, jax.random.key(0))
    batches = iter(task.train_data(0, 1))
    history = []
    for _ in range(4):
        before = jax.device_get(state)
        state, metrics = fns.train_step(model, state, parallel.global_batch(next(batches), mesh))
        history.append((before, jax.device_get(state), jax.device_get(metrics)))
    for i, (before, after, metrics) in enumerate(history):
        assert after["step"] == i + 1  # every step is taken: the next one draws new data
        skipped = i in (1, 2)
        assert metrics["nonfinite"] == float(skipped)
        assert after["nonfinite"] == {0: 0, 1: 1, 2: 2, 3: 0}[i]  # the streak, reset when finite
        for key in ("params", "opt_state", "ema"):
            same = all(np.array_equal(a, b) for a, b in
                       zip(jax.tree.leaves(before[key]), jax.tree.leaves(after[key])))
            assert same == skipped or (key == "params" and i == 0), (i, key)  # lr 0 at step 0
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(after["params"]))
    logged = trainer._mean_metrics([m for _, _, m in history])
    assert logged["nonfinite_steps"] == 2
    np.testing.assert_allclose(logged["loss"], np.mean([history[0][2]["loss"],
                                                        history[3][2]["loss"]]), rtol=1e-6)


def test_a_streak_of_nonfinite_steps_stops_with_the_last_finite_state_saved(tmp_path):
    cfg = ldm_train_config()
    cfg.update(total_steps=10, log_every=1, checkpoint_every=2, max_nonfinite_steps=2)
    mesh = mesh_of(1, 1)
    with pytest.raises(FloatingPointError, match=r"^steps 4-5 all had a non-finite loss or "
                       r"gradient \(max_nonfinite_steps=2\)"):
        trainer.train_and_evaluate(cfg, str(tmp_path / "run"), PoisonedTask(cfg, range(3, 99)),
                                   mesh)
    directory = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(directory)) == ["2", "4"]  # complete, nothing half-written
    task = SyntheticLatentTask(cfg)  # three clean steps of the same run
    fns = steps.build_steps(cfg, task, mesh)
    model = jax.device_put(task.model, parallel.replicated(mesh))
    want, batches = fns.init(model, jax.random.key(cfg.seed)), iter(task.train_data(0, 1))
    for _ in range(3):
        want, _ = fns.train_step(model, want, parallel.global_batch(next(batches), mesh))
    step, got = checkpoint.Checkpoints(str(tmp_path / "run"), cfg).restore(fns.abstract_state)
    assert step == 4 and int(got["nonfinite"]) == 1
    for key in ("params", "opt_state", "ema"):  # step 4 was skipped: the state of step 3
        for a, b in zip(jax.tree.leaves(jax.device_get(got[key])),
                        jax.tree.leaves(jax.device_get(want[key]))):
            np.testing.assert_array_equal(a, b)


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from dgae_jax import trainer
from fakes import FailingData, PoisonedTask, ldm_train_config, mesh_of

cfg = ldm_train_config()
cfg.update(total_steps=10, log_every=1, checkpoint_every=2, max_nonfinite_steps=1)
task = {task}
trainer.train_and_evaluate(cfg, {workdir!r}, task, mesh_of(1, 1))
"""


@pytest.mark.parametrize("task,error,checkpoints", [
    pytest.param("PoisonedTask(cfg, range(2, 99))", "NonFiniteSteps: steps 3-3 all had", ["2"],
                 marks=pytest.mark.slow),
    ("FailingData(cfg, fail_at=5)", "OSError: cannot read shard 7 (batch 5)", ["2", "4"]),
])
def test_an_error_in_the_loop_exits_with_it_alone_and_keeps_the_saved_checkpoint(
        tmp_path, task, error, checkpoints):
    """In a fresh interpreter, as a user's run: the checkpoint saved asynchronously just before
    the failure completes, and the error is the only traceback."""
    workdir = str(tmp_path / "run")
    script = SCRIPT.format(tests=TESTS, task=task, workdir=workdir)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.count("Traceback") == 1, result.stderr[-3000:]
    assert error in result.stderr.strip().splitlines()[-1]
    assert "cannot schedule new futures" not in result.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == checkpoints


def largest_file(directory) -> str:
    files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
    return max(files, key=os.path.getsize)


def flip_bytes(path, count=64) -> None:
    """Inverts `count` bytes in the middle of `path`."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size // 2)
        chunk = f.read(count)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


def run_to(cfg, workdir, steps_total, **overrides):
    cfg = cfg.copy_and_resolve_references()
    cfg.update(total_steps=steps_total, **overrides)
    return trainer.train_and_evaluate(cfg, str(workdir), SyntheticLatentTask(cfg), mesh_of(1, 1))


def assert_same_state(got, want):
    for a, b in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(jax.device_get(want))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("damage", ["flip state data",
                                    pytest.param("delete ema file", marks=pytest.mark.slow)])
def test_a_corrupt_checkpoint_is_never_restored(tmp_path, damage, caplog):
    """The newest checkpoint damaged: training falls back to the previous one (moved aside, never
    deleted) and ends bit-equal to an uninterrupted run; without fallback it stops in one line;
    evaluation's loader uses the older step and says so, and refuses the damaged one by name."""
    cfg = ldm_train_config()
    cfg.update(log_every=1, checkpoint_every=2)
    want = run_to(cfg, tmp_path / "straight", 6)
    run_to(cfg, tmp_path / "run", 4)
    step_dir = tmp_path / "run" / "checkpoints" / "4"
    if damage == "flip state data":
        flip_bytes(largest_file(step_dir / "state"))
    else:
        os.remove(largest_file(step_dir / "ema"))
    item = "state" if damage == "flip state data" else "ema"

    with pytest.raises(CorruptCheckpoint, match=rf"^checkpoint 4: item '{item}' .* "
                       r"\(restore_fallback=True uses the newest intact checkpoint\)$") as error:
        run_to(cfg, tmp_path / "run", 6, restore_fallback=False)
    assert "\n" not in str(error.value)

    task = SyntheticLatentTask(cfg)
    if item == "ema":
        with pytest.raises(CorruptCheckpoint, match="^checkpoint 4: item 'ema' cannot be read"):
            runs.restore_ema(cfg, str(tmp_path / "run"), task.init_params, task.model,
                                  mesh_of(1, 1), step=4)
        with caplog.at_level(logging.INFO):
            step, _ = runs.restore_ema(cfg, str(tmp_path / "run"), task.init_params,
                                            task.model, mesh_of(1, 1))
        assert step == 2 and "checkpoint 4: item 'ema'" in caplog.text
        assert "restored the EMA parameters of step 2" in caplog.text
        assert os.path.isdir(step_dir)  # evaluation moves nothing

    with caplog.at_level(logging.INFO):
        got = run_to(cfg, tmp_path / "run", 6)
    assert f"checkpoint 4: item '{item}'" in caplog.text
    assert "resumed from the checkpoint of step 2" in caplog.text
    aside = os.listdir(tmp_path / "run" / "corrupt_checkpoints")
    assert len(aside) == 1 and aside[0].startswith("4-")
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "4", "6"]
    assert_same_state(got, want)


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from absl import logging
from dgae_jax import trainer
from fakes import NarratedTask, ldm_train_config, mesh_of

cfg = ldm_train_config()
cfg.update(total_steps=12, log_every=1, checkpoint_every=2, eval_every=5)
logging.set_verbosity(logging.INFO)
trainer.train_and_evaluate(cfg, {workdir!r}, NarratedTask(cfg), mesh_of(1, 1))
"""


def run_and_kill(workdir, env, kill_when):
    """Runs the narrated job; SIGKILLs it the moment `kill_when(line or None, checkpoint
    names)` is true (checked on every output line and every millisecond), or lets it finish.
    Returns (killed, the complete checkpoints before the start, the output)."""
    script = KILL_SCRIPT.format(tests=TESTS, workdir=str(workdir))
    ckpts = workdir / "checkpoints"
    names = lambda: set(os.listdir(ckpts)) if ckpts.exists() else set()  # noqa: E731
    before = {n for n in names() if n.isdigit()}
    proc = subprocess.Popen([sys.executable, "-u", "-c", script], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    output, deadline = [], time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        try:
            line = lines.get(timeout=0.001)
            output.append(line)
        except queue.Empty:
            line = None
        if kill_when(line, names()):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True, before, "".join(output)
    proc.wait(timeout=60)
    while not lines.empty():
        output.append(lines.get())
    return False, before, "".join(output)


def second_batch_line():
    """A kill condition true at the second batch the restarted run hands out: between two
    steps, whichever checkpoint the run resumed from."""
    seen = []

    def when(line, names):
        if line and line.startswith("BATCH"):
            seen.append(line)
        return len(seen) >= 2
    return when


def a_new_checkpoint():
    """A kill condition true as soon as a checkpoint the run did not start with is complete."""
    first = []

    def when(line, names):
        done = {n for n in names if n.isdigit()}
        if not first:
            first.append(done)
        return bool(done - first[0])
    return when


@pytest.mark.slow
def test_kill_9_at_any_moment_resumes_bit_exactly(tmp_path):
    """SIGKILL during an asynchronous save, between steps, during an evaluation and right after
    a save completed, restarting each time: every restart resumes from a complete checkpoint and
    the final state equals an uninterrupted run's, bit for bit."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jit"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    killed, _, output = run_and_kill(tmp_path / "straight", env, lambda line, names: False)
    assert not killed and "BATCH 12" in output

    moments = {
        "during a save": lambda line, names: any(".orbax-checkpoint-tmp" in n for n in names),
        "between two steps": second_batch_line(),
        "during an evaluation": lambda line, names: bool(line and line.startswith("EVAL")),
        "right after a save": a_new_checkpoint(),
        "during the next save": lambda line, names: any(".orbax-checkpoint-tmp" in n
                                                        for n in names),
    }
    workdir = tmp_path / "killed"
    for moment, kill_when in moments.items():
        killed, complete, output = run_and_kill(workdir, env, kill_when)
        assert killed, f"the run ended before the moment {moment!r}:\n{output[-2000:]}"
        if complete:  # the restart resumed from the newest checkpoint complete at its start
            assert f"resumed from the checkpoint of step {max(map(int, complete))}" in output
    killed, complete, output = run_and_kill(workdir, env, lambda line, names: False)
    assert not killed and f"resumed from the checkpoint of step {max(map(int, complete))}" in output
    assert not (workdir / "corrupt_checkpoints").exists()
    assert not [n for n in os.listdir(workdir / "checkpoints") if not n.isdigit()]

    cfg = ldm_train_config()
    fns = steps.build_steps(cfg, SyntheticLatentTask(cfg), mesh_of(1, 1))
    restored = [checkpoint.Checkpoints(str(d), cfg).restore(fns.abstract_state)
                for d in (workdir, tmp_path / "straight")]
    assert restored[0][0] == restored[1][0] == 12
    assert_same_state(restored[0][1], restored[1][1])


def test_an_unwritable_workdir_fails_in_one_line_at_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cfg = ldm_train_config()
    cfg.cache.dir = str(tmp_path)
    with pytest.raises(ConfigError, match=r"^--workdir='.*a_file/run' cannot be created: "
                       r"'.*a_file' is not a directory$"):
        validate(cfg, "train", workdir=str(blocker / "run"))


def test_a_failed_save_stops_in_one_line_leaving_only_complete_checkpoints(tmp_path,
                                                                           monkeypatch):
    """The disk fills up at the save of step 4: the run stops with one error naming the save and
    the cause; the complete checkpoint of step 2 is untouched and nothing half-written stays."""
    save = ocp.CheckpointManager.save

    def full_disk_at_4(self, step, *args, **kwargs):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, step, *args, **kwargs)
    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk_at_4)
    cfg = ldm_train_config()
    cfg.update(log_every=1, checkpoint_every=2)
    with pytest.raises(CheckpointWriteError, match=r"^cannot save checkpoint 4 .* in .*"
                       r"checkpoints: OSError: \[Errno 28\] No space left on device$"):
        run_to(cfg, tmp_path / "run", 6)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]
    monkeypatch.undo()
    fns = steps.build_steps(cfg, SyntheticLatentTask(cfg), mesh_of(1, 1))
    step, _ = checkpoint.Checkpoints(str(tmp_path / "run"), cfg).restore(fns.abstract_state)
    assert step == 2
