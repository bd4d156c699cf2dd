"""Every mode as a 2-process JAX job (2 x 4 CPU devices over localhost), as a multi-host run does,
against the same mode as 1 process with 8 devices (the same device setup, one process).

One tiny f8 DGAE is trained once for the module (2 processes, 2 steps, a checkpoint per step);
then: an exact resume of its step 1, a decoder trained on its frozen encoder, `--mode=eval`, `--mode=cache_latents`, a latent DiT trained
on the 2-process cache and `--mode=sample` of it, `python -m dgae_jax.fid`, and a resume refused
on another process count. Each 2-process result must equal the 1-process one, and only process
0 writes files.
"""

import concurrent.futures
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from dgae_jax import parallel
from dgae_jax.cache import reader
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
        "--config.loss.lpips_net=alexnet", "--config.loss.lpips_weight=0.5",
        "--config.optimizer.warmup_steps=0", "--config.optimizer.lr=1e-3",
        "--config.optimizer.end_lr=1e-3",
        "--config.data.eval_size=8", "--config.eval.num_images=8", "--config.eval.rfid=False",
        "--config.log_every=1", "--config.eval_every=1000", "--config.checkpoint_every=1"]
# Cheap XLA CPU compilation (the same for every run, so results stay comparable).
FAST_COMPILE = {"XLA_FLAGS": "--xla_backend_optimization_level=0 "
                             "--xla_llvm_disable_expensive_passes=true"}
# A small latent DiT (configs/ldm_f16.py:demo shrunk) on the 4x4x4 latents of TINY at 32 px.
TINY_DIT = ["--config=configs/ldm_f16.py:demo", "--config.model.latent_size=4",
            "--config.model.latent_channels=4", "--config.model.hidden=32",
            "--config.model.depth=1", "--config.model.heads=2", "--config.batch_size=8",
            "--config.diffusion.sample_steps=2", "--config.eval.num_images=6",
            "--config.eval.fid_samples=0", "--config.log_every=1", "--config.eval_every=1000",
            "--config.checkpoint_every=1"]
STEPS = 2  # of the module's autoencoder and DiT


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


def job_env(fast_compile: bool = True) -> dict[str, str]:
    """The jobs' environment: FAST_COMPILE, the compilation cache shared by all tests (conftest
    sets one) and single-threaded OpenBLAS: the jobs' processes share the machine's cores, and
    numpy's eigh (FID) threads fighting each other are 3x slower than one thread each."""
    env = dict(FAST_COMPILE) if fast_compile else {}
    env["OPENBLAS_NUM_THREADS"] = "1"
    env["JAX_COMPILATION_CACHE_DIR"] = (os.environ.get("JAX_COMPILATION_CACHE_DIR")
                                        or os.path.join(tempfile.gettempdir(), "dgae_jax_jit"))
    return env


def job(args, processes: int = 2, *, module: str = "dgae_jax.main", check: bool = True,
        fast_compile: bool = True) -> list[multiprocess.ProcessResult]:
    """`python -m module *args` as `processes` processes with 8 CPU devices in all."""
    results = multiprocess.run_processes(
        module, [str(a) for a in args], num_processes=processes,
        devices_per_process=8 // processes, timeout=400, cwd=str(REPO),
        extra_env=job_env(fast_compile))
    if check:
        assert [r.returncode for r in results] == [0] * processes, multiprocess.describe(results)
    return results


def concurrently(*calls):
    """Runs the calls (thunks) at once, e.g. a 2-process job beside the 1-process one it is
    compared with: 3 processes on 2 cores overlap their start-up, imports and host work."""
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(c) for c in calls]
        return [f.result() for f in futures]


def printed_json(result: multiprocess.ProcessResult) -> dict:
    """The JSON record a process printed last."""
    for line in reversed(result.output.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                pass
    raise AssertionError(f"process {result.process_id} printed no JSON record:\n"
                         f"{result.output[-3000:]}")


def same_record(results: list[multiprocess.ProcessResult]) -> dict:
    """The record every process printed; they must be identical."""
    records = [printed_json(r) for r in results]
    assert all(r == records[0] for r in records), records
    return records[0]


def copy_run(workdir, to, steps=None) -> Path:
    """A new run directory holding `workdir`'s checkpoints (all, or only `steps`)."""
    to = Path(to)
    source = Path(workdir) / "checkpoints"
    shutil.copytree(source, to / "checkpoints", ignore=None if steps is None else (
        lambda d, names: [n for n in names if d == str(source) and n.isdigit()
                          and int(n) not in steps]))
    return to


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


def only_lead_files(workdir, expected: set[str]) -> None:
    """What a 2-process eval / sample wrote into `workdir` (besides its checkpoints): the files
    `expected` and one TensorBoard events file, none from process 1."""
    files = {str(p.relative_to(workdir)) for p in Path(workdir).rglob("*")
             if p.is_file() and "checkpoints" not in p.relative_to(workdir).parts}
    events = {f for f in files if f.startswith("events.out.tfevents.")}
    assert len(events) == 1, files  # process 1's writer only logs
    assert files - events == expected, files


# --------------------------------------------------------------------------- the module's runs

@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory) -> Path:
    """TINY trained 2 steps by 2 processes, a checkpoint per step (and its eval at step 2)."""
    workdir = tmp_path_factory.mktemp("multiprocess") / "ae"
    job([*TINY, f"--config.total_steps={STEPS}", f"--workdir={workdir}"])
    assert checkpoint_dirs(workdir) == ["1", "2"]
    return workdir


def cache_args(workdir, directory) -> list[str]:
    """TINY's latent cache: 15 train + 32 eval images, 4 per shard: 12 shards, 6 per process."""
    return [*TINY, f"--config.total_steps={STEPS}", f"--workdir={workdir}",
            "--mode=cache_latents", f"--config.cache.dir={directory}",
            "--config.cache.crops_per_image=1", "--config.cache.examples_per_shard=4",
            "--config.cache.batch_size=8"]


@pytest.fixture(scope="module")
def caches(autoencoder):
    """The autoencoder's latent cache made by 2 processes and by 1; their printed records."""
    two, one = autoencoder.parent / "cache_2", autoencoder.parent / "cache_1"
    results = concurrently(lambda: job(cache_args(autoencoder, two)),
                           lambda: job(cache_args(autoencoder, one), processes=1))
    return two, one, results


@pytest.fixture(scope="module")
def dit(caches) -> Path:
    """A small DiT trained 2 steps by 2 processes on the 2-process cache."""
    workdir = caches[0].parent / "dit"
    job([*TINY_DIT, f"--config.cache.dir={caches[0]}", f"--config.total_steps={STEPS}",
         f"--workdir={workdir}"])
    assert checkpoint_dirs(workdir) == ["1", "2"]
    return workdir


# --------------------------------------------------------------------------- the tests

@pytest.mark.slow
def test_two_processes_checkpoint_and_resume_exactly(autoencoder, tmp_path):
    """The module's step-1 checkpoint (as a 1-step run saves it) resumed to step 2 by 2
    processes, against the module's uninterrupted 2 steps: equal bit for bit."""
    data = sorted(os.listdir(autoencoder / "checkpoints" / "1" / "data"))
    assert data == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    resumed = copy_run(autoencoder, tmp_path / "resumed", steps={1})
    assert checkpoint_dirs(resumed) == ["1"]

    results = job([*TINY, "--config.total_steps=2", f"--workdir={resumed}"])
    assert all("resumed from the checkpoint of step 1" in r.output for r in results)
    assert checkpoint_dirs(resumed) == ["1", "2"]

    a, b = saved_state(resumed, 2), saved_state(autoencoder, 2)
    assert int(a["step"]) == 2
    paths_a, leaves_a = zip(*jax.tree_util.tree_leaves_with_path(a))
    paths_b, leaves_b = zip(*jax.tree_util.tree_leaves_with_path(b))
    assert paths_a == paths_b
    assert {jax.tree_util.keystr(p[:1]) for p in paths_a} == {
        "['ema']", "['nonfinite']", "['opt_state']", "['params']", "['rng']", "['step']"}
    for path, x, y in zip(paths_a, leaves_a, leaves_b):  # everything the state holds
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    # The resumed run really trained: its parameters and EMA moved since step 1.
    before = saved_state(resumed, 1)
    for item in ("params", "ema"):
        assert any(not np.array_equal(x, y) for x, y in
                   zip(jax.tree.leaves(before[item]), jax.tree.leaves(a[item]))), item


@pytest.mark.slow
def test_a_decoder_on_a_frozen_encoder_resumes_exactly_on_two_processes(autoencoder, tmp_path):
    """configs/sd_decoder.py with the module's run as its frozen encoder, by 2 processes: 2
    steps, and its step 1 resumed to step 2, equal bit for bit; the encoder in params and EMA
    is the source run's EMA encoder bit for bit, with no optimiser state; the decoder trained."""
    args = ["--config=configs/sd_decoder.py:demo", *TINY[1:],
            f"--config.init.encoder_from={autoencoder}", f"--config.total_steps={STEPS}"]
    straight = tmp_path / "straight"
    job([*args, f"--workdir={straight}"])
    resumed = copy_run(straight, tmp_path / "resumed", steps={1})
    results = job([*args, f"--workdir={resumed}"])
    assert all("resumed from the checkpoint of step 1" in r.output for r in results)
    a, b = saved_state(resumed, STEPS), saved_state(straight, STEPS)
    paths_a, leaves_a = zip(*jax.tree_util.tree_leaves_with_path(a))
    paths_b, leaves_b = zip(*jax.tree_util.tree_leaves_with_path(b))
    assert paths_a == paths_b
    for path, x, y in zip(paths_a, leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    source = saved_item(autoencoder, STEPS, "ema")["encoder"]
    for item in ("params", "ema"):
        for x, y in zip(jax.tree.leaves(a[item]["encoder"]), jax.tree.leaves(source)):
            np.testing.assert_array_equal(x, y)
    assert not [p for p in paths_a if jax.tree_util.keystr(p).startswith("['opt_state']")
                and "encoder" in jax.tree_util.keystr(p)]
    before = saved_state(resumed, 1)["params"]["decoder"]
    assert any(not np.array_equal(x, y) for x, y in
               zip(jax.tree.leaves(before), jax.tree.leaves(a["params"]["decoder"])))


@pytest.mark.slow
def test_resume_on_another_process_count_is_refused(autoencoder, tmp_path):
    """Training resumes only with the process count that saved the data position."""
    workdir = copy_run(autoencoder, tmp_path / "run")
    [result] = job([*TINY, "--config.total_steps=3", f"--workdir={workdir}"], processes=1,
                   check=False)
    assert result.returncode not in (0, None), result.output[-3000:]
    errors = [line for line in result.output.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1, result.output[-3000:]
    assert errors[0].startswith("config error: checkpoint 2 in ")
    assert "was saved by 2 processes and this run has 1" in errors[0], errors[0]
    assert result.output.strip().splitlines()[-1] == errors[0]
    assert checkpoint_dirs(workdir) == ["1", "2"]  # nothing trained, nothing saved


@pytest.mark.slow
def test_eval_two_processes_equals_one(autoencoder, inception_weights, tmp_path):
    """--mode=eval of the 2-process checkpoint by 2 processes and by 1: the same metrics (also
    those of the training run's own evaluation at its last step, which has no rFID) and the
    same image grid; process 0 alone writes eval/<step>.json, images/<step>.png and TensorBoard
    events."""
    two, one = copy_run(autoencoder, tmp_path / "two"), copy_run(autoencoder, tmp_path / "one")
    args = [*TINY, f"--config.total_steps={STEPS}", "--mode=eval", "--config.eval.rfid=True",
            f"--config.eval.inception_weights={inception_weights}"]
    results_2, results_1 = concurrently(lambda: job([*args, f"--workdir={two}"]),
                                        lambda: job([*args, f"--workdir={one}"], processes=1))
    record_2, record_1 = same_record(results_2), same_record(results_1)
    assert record_2["step"] == STEPS and record_2["num_images"] == 8
    metrics = [k for k in ("psnr", "ssim", "lpips", "rfid") if k in record_2]
    assert metrics == ["psnr", "ssim", "lpips", "rfid"] and set(record_1) == set(record_2)
    for key in metrics:
        assert record_2[key] == pytest.approx(record_1[key], rel=1e-5), key
    for key in metrics[:3]:  # the same per-image values, gathered from both processes
        assert record_2["bootstrap_std"][key] == pytest.approx(
            record_1["bootstrap_std"][key], rel=1e-4), key
    assert json.loads((two / "eval" / f"{STEPS}.json").read_text()) == record_2
    trained = json.loads((autoencoder / "eval" / f"{STEPS}.json").read_text())
    for key in ("psnr", "ssim", "lpips"):
        assert trained[key] == pytest.approx(record_2[key], rel=1e-5), key
    only_lead_files(two, {f"eval/{STEPS}.json", f"images/{STEPS}.png"})
    grid_2 = np.asarray(Image.open(two / "images" / f"{STEPS}.png"))
    grid_1 = np.asarray(Image.open(one / "images" / f"{STEPS}.png"))
    np.testing.assert_array_equal(grid_2, grid_1)  # the same images, in the same order


def without_stats(splits: dict) -> dict:
    return {name: {k: v for k, v in split.items() if k != "stats"}
            for name, split in splits.items()}


def close_stats(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], str):
            assert a[key] == b[key], key
        else:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-12, err_msg=key)


@pytest.mark.slow
def test_cache_latents_two_processes_equals_one(caches):
    """The 2-process cache: one manifest, every shard written once (half by each process) and
    byte-identical to the 1-process cache's, the same records and statistics."""
    two, one, (results_2, results_1) = caches
    records = [printed_json(r) for r in results_2]
    assert [r["written"] for r in records] == [6, 6]  # round-robin: each process wrote 6 shards
    assert all(r["shards"] == 12 for r in records)
    record_1 = printed_json(results_1[0])
    assert record_1["written"] == 12
    volatile = ("written", "images_per_sec", "cache_dir")
    assert all({k: v for k, v in r.items() if k not in volatile} ==
               {k: v for k, v in record_1.items() if k not in volatile} for r in records)
    assert record_1["examples"] == {"train": 15, "eval": 32}
    assert not [p for p in two.rglob("*") if "tmp" in p.name]

    # The same files: one manifest, and each shard with its sidecar.
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    manifest_2 = json.loads((two / "manifest.json").read_text())
    manifest_1 = json.loads((one / "manifest.json").read_text())
    shards = [s for split in manifest_2["splits"].values() for s in split["shards"]]
    assert len(shards) == 12
    for shard in shards:  # byte-identical shards (so the same sha256 in both manifests)
        assert (two / shard["file"]).read_bytes() == (one / shard["file"]).read_bytes()
    # The statistics agree to float64 round-off, not bit for bit: a shard's sums are added up
    # batch by batch, and the 1-process run's batches of 8 straddle the eval shards (they start
    # at id 15), where each process's batch of 4 is one shard.
    assert without_stats(manifest_2["splits"]) == without_stats(manifest_1["splits"])
    for split in manifest_2["splits"]:
        close_stats(manifest_2["splits"][split]["stats"], manifest_1["splits"][split]["stats"])
    close_stats(manifest_2["stats"], manifest_1["stats"])
    for shard in shards:
        sidecar = Path(shard["file"]).with_suffix(".json").name
        side_2, side_1 = (json.loads((d / sidecar).read_text()) for d in (two, one))
        assert side_2.pop("sums").keys() == side_1.pop("sums").keys() and side_2 == side_1
    for split, n in record_1["examples"].items():
        a, b = reader.LatentSource(two, split), reader.LatentSource(one, split)
        assert len(a) == len(b) == n
        for i in range(n):
            x, y = a[i], b[i]
            assert x.keys() == y.keys() and x["id"] == i
            for key in x:
                np.testing.assert_array_equal(x[key], y[key], err_msg=f"{split} {i} {key}")


@pytest.mark.slow
def test_sample_two_processes_equals_one(dit, caches, tmp_path):
    """--mode=sample of the 2-process DiT with one seed, by 2 processes and by 1: the same
    images; process 0 alone writes samples/<step>/ and TensorBoard events."""
    two, one = copy_run(dit, tmp_path / "two"), copy_run(dit, tmp_path / "one")
    args = [*TINY_DIT, f"--config.cache.dir={caches[0]}", f"--config.total_steps={STEPS}",
            "--mode=sample", "--config.sample.num=6", "--config.sample.seed=7",
            "--config.sample.classes=(0, 3, 5)"]
    results_2, results_1 = concurrently(lambda: job([*args, f"--workdir={two}"]),
                                        lambda: job([*args, f"--workdir={one}"], processes=1))
    record_2, record_1 = same_record(results_2), same_record(results_1)
    assert record_2["num"] == record_1["num"] == 6 and record_2["step"] == STEPS
    only_lead_files(two, {f"samples/{STEPS}/images.npz", f"samples/{STEPS}/grid.png"})
    with np.load(two / "samples" / str(STEPS) / "images.npz") as a, \
            np.load(one / "samples" / str(STEPS) / "images.npz") as b:
        assert a["arr_0"].shape == (6, 32, 32, 3) and a["arr_0"].dtype == np.uint8
        assert a["labels"].tolist() == b["labels"].tolist() == [0, 3, 5, 0, 3, 5]
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])  # exactly, not within rounding
        assert len({a["arr_0"][i].tobytes() for i in range(6)}) == 6  # not one image repeated


@pytest.mark.slow
def test_fid_two_processes_equals_one(dit, inception_weights, tmp_path):
    """`python -m dgae_jax.fid A B` (a folder of images against the DiT's 6 samples) by 2
    processes and by 1: the same FID, sFID, precision and recall."""
    from dgae_jax.data import sources
    folder = tmp_path / "real"
    folder.mkdir()
    crops = sources.FixedCrops(sources.EmbeddedPhotos("eval"), 32)
    for i in range(7):  # 7: the processes' shares differ (4 and 3), one batch each
        Image.fromarray(crops[i]["image"]).save(folder / f"{i}.png")
    samples = dit / "samples" / str(STEPS) / "images.npz"  # the DiT's evaluation at its end
    args = [folder, samples, "--batch_size=8", f"--inception_weights={inception_weights}"]
    results_2, results_1 = concurrently(
        lambda: job(args, module="dgae_jax.fid", fast_compile=False),
        lambda: job(args, processes=1, module="dgae_jax.fid", fast_compile=False))
    record_2, record_1 = same_record(results_2), same_record(results_1)
    assert record_2["a"]["count"] == 7 and record_2["b"]["count"] == 6
    assert set(record_2) == set(record_1)
    for key in ("fid", "sfid", "precision", "recall"):
        assert record_2[key] == pytest.approx(record_1[key], rel=1e-6), key
