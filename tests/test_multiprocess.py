"""Training as a 2-process JAX job (2 x 4 CPU devices over localhost), as a multi-host run does:
checkpoints written by both processes, and an exact resume."""

import concurrent.futures
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dgae_jax import parallel
from dgae_jax.errors import ConfigError

import multiprocess

REPO = Path(__file__).resolve().parents[1]

# A tiny f8 DGAE, smaller than conftest.make_tiny_config (every process compiles it). The
# learning rate is constant (lr == end_lr, no warm-up), so the schedule does not depend on
# total_steps and a run resumed with more steps must match an uninterrupted one bit for bit.
TINY = ["--config=configs/f8.py:demo,c=4", "--config.image_size=32", "--config.batch_size=8",
        "--config.model.norm_groups=4", "--config.model.encoder.width=8",
        "--config.model.encoder.channel_mult=(1,2,2,2)", "--config.model.encoder.num_res_blocks=0",
        "--config.model.encoder.attn_resolutions=()", "--config.model.unet.width=8",
        "--config.model.unet.channel_mult=(1,)", "--config.model.unet.attn_resolutions=()",
        "--config.model.unet.head_channels=8", "--config.diffusion.sample_steps=1",
        "--config.loss.lpips_weight=0", "--config.optimizer.warmup_steps=0",
        "--config.optimizer.lr=1e-3", "--config.optimizer.end_lr=1e-3",
        "--config.data.eval_size=8", "--config.eval.num_images=8", "--config.eval.rfid=False",
        "--config.log_every=1", "--config.eval_every=1000", "--config.checkpoint_every=1"]
# Cheap XLA CPU compilation (the same for every run, so results stay comparable).
FAST_COMPILE = {"XLA_FLAGS": "--xla_backend_optimization_level=0 "
                             "--xla_llvm_disable_expensive_passes=true"}


def test_coordinator_variables_reach_jax(monkeypatch):
    """JAX reads JAX_COORDINATOR_ADDRESS itself but not the process count and index: without
    them every process would run alone, each as process 0 of the same run directory."""
    calls = []

    def initialize(num_processes=None, process_id=None):  # jax.distributed.initialize's checks
        if num_processes is None or process_id is None:
            raise ValueError("Number of processes must be defined.")
        calls.append((num_processes, process_id))

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    parallel.initialize_distributed()
    assert calls == [(2, 1)]
    monkeypatch.delenv("JAX_PROCESS_ID")
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID"):  # not a silent single process
        parallel.initialize_distributed()
    monkeypatch.setenv("JAX_PROCESS_ID", "first")
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID"):
        parallel.initialize_distributed()


def train(workdir, total_steps: int) -> list[multiprocess.ProcessResult]:
    env = dict(FAST_COMPILE)  # and share compiled steps between the runs (conftest sets one)
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(
        Path(workdir).parent / "jit_cache")
    results = multiprocess.run_processes(
        "dgae_jax.main", [*TINY, f"--config.total_steps={total_steps}", f"--workdir={workdir}"],
        num_processes=2, devices_per_process=4, timeout=400, cwd=str(REPO), extra_env=env)
    assert [r.returncode for r in results] == [0, 0], multiprocess.describe(results)
    return results


def checkpoint_dirs(workdir) -> list[str]:
    """The step directories, after checking that no temporary directory was left anywhere."""
    directory = Path(workdir) / "checkpoints"
    assert not [p for p in directory.rglob("*") if "tmp" in p.name], list(directory.rglob("*"))
    return sorted(os.listdir(directory))


def saved_item(workdir, step: int, item: str):
    """One item of a checkpoint as host numpy arrays."""
    path = Path(workdir) / "checkpoints" / str(step) / item
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def saved_state(workdir, step: int) -> dict:
    """A checkpoint's whole train state as host numpy arrays: its `state` item (params,
    optimiser, step, RNG) with the `ema` item (saved apart) under "ema"."""
    state = saved_item(workdir, step, "state")
    assert "ema" not in state, sorted(state)
    return dict(state, ema=saved_item(workdir, step, "ema"))


@pytest.mark.slow
def test_two_processes_checkpoint_and_resume_exactly(tmp_path):
    """1 step then resumed to 2, against 2 steps straight; each a 2 x 4-device job."""
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the two independent jobs overlap
        first = pool.submit(train, resumed, 1)
        uninterrupted = pool.submit(train, straight, 2)
        first.result(), uninterrupted.result()
    assert checkpoint_dirs(resumed) == ["1"]
    assert checkpoint_dirs(straight) == ["1", "2"]
    data = sorted(os.listdir(resumed / "checkpoints" / "1" / "data"))
    assert data == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

    results = train(resumed, 2)
    assert all("resumed from the checkpoint of step 1" in r.output for r in results)
    assert checkpoint_dirs(resumed) == ["1", "2"]

    a, b = saved_state(resumed, 2), saved_state(straight, 2)
    assert int(a["step"]) == 2
    paths_a, leaves_a = zip(*jax.tree_util.tree_leaves_with_path(a))
    paths_b, leaves_b = zip(*jax.tree_util.tree_leaves_with_path(b))
    assert paths_a == paths_b
    for path, x, y in zip(paths_a, leaves_a, leaves_b):  # params, EMA, optimiser, step, RNG
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    # The resumed run really trained: its parameters moved since step 1.
    before = saved_state(resumed, 1)["params"]
    assert any(not np.array_equal(x, y) for x, y in
               zip(jax.tree.leaves(before), jax.tree.leaves(a["params"])))
