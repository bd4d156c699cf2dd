"""The latent cache: exact contents, ids once each, statistics, resume after SIGKILL, refusals.

One autoencoder run (configs/f16.py:demo shrunk to 32 px, 2x2x16 latents) is checkpointed once
and cached once on the 8 CPU devices for the whole module; the CLI test runs the same config in
subprocesses, so its cache must equal the module's one.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import grain
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from dgae_jax import validation
from dgae_jax.cache import format, job, reader, throughput
from dgae_jax.data import pipeline, sources
from dgae_jax.errors import BadImage, ConfigError
from dgae_jax.tasks.ae import AutoencoderTask

from helpers import cli_args, demo_config, save_run, write_image

STEP = 7
COUNTS = {"train": 15, "eval": 32}  # the embedded photos: 15 train, 4 x 8 fixed eval crops


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A checkpointed autoencoder (step 7) and its cache, made in-process on 8 devices."""
    root = tmp_path_factory.mktemp("latent_cache")
    cfg = demo_config()
    cfg.cache.dir = str(root / "cache")
    task = AutoencoderTask(cfg)
    workdir = str(root / "ae")
    state = save_run(workdir, cfg, STEP, task=task)
    summary = job.cache_latents(cfg, workdir, task)
    return types.SimpleNamespace(cfg=cfg, task=task, workdir=workdir, dir=cfg.cache.dir,
                                 root=root, summary=summary,
                                 encoder=state["ema"]["encoder"])


@pytest.fixture(scope="module")
def direct(run):
    """Every example encoded directly (one jitted call, one device), float32, with its label."""
    images, labels = {}, {}
    for role in COUNTS:
        src = sources.make_source(run.cfg, role)
        views = [pipeline.eval_example(i, source=src, count=len(src), size=32)
                 for i in range(len(src))]
        images[role] = np.stack([v["image"] for v in views])
        labels[role] = np.array([v["label"] for v in views])
    x = np.concatenate([images["train"], images["eval"]])
    x = np.concatenate([x, x[:, :, ::-1]])  # then every image flipped

    @jax.jit
    def encode(params, x):
        q = run.task.model.encode({"encoder": params}, x.astype(jnp.float32) / 127.5 - 1.0)
        return q.mean, q.logvar

    mean, logvar = jax.device_get(encode(run.encoder, x))
    n = len(x) // 2
    out, start = {}, 0
    for role, count in COUNTS.items():
        rows = slice(start, start + count)
        flipped = slice(n + start, n + start + count)
        out[role] = {"mean": mean[rows], "logvar": logvar[rows], "flip_mean": mean[flipped],
                     "flip_logvar": logvar[flipped], "label": labels[role]}
        start += count
    return out


def read_all(directory, role):
    src = reader.LatentSource(directory, role)
    return [src[i] for i in range(len(src))]


# --------------------------------------------------------------------------- contents

def test_records_round_trip_bit_exactly():
    rng = np.random.default_rng(0)
    for dtype in format.DTYPES.values():
        arrays = [rng.standard_normal((3, 2, 5)).astype(dtype) for _ in range(4)]
        arrays[0].flat[:3] = [np.inf, np.nan, 1e-40]
        record = format.decode_record(format.encode_record(12, 3, arrays))
        assert (record["id"], record["label"]) == (12, 3)
        for field, a in zip(format.FIELDS, arrays):
            assert record[field].dtype == dtype
            assert record[field].tobytes() == a.tobytes()
    two = format.decode_record(format.encode_record(0, 0, arrays[:2]))
    assert set(two) == {"id", "label", "mean", "logvar"}


def test_cache_equals_direct_encoding(run, direct):
    assert jax.device_count() == 8
    assert run.summary["written"] == run.summary["shards"] == 4 + 8
    manifest = format.load_manifest(run.dir, expected_config=run.cfg)
    assert manifest["step"] == STEP and manifest["latent_shape"] == [2, 2, 16]
    assert manifest["dtype"] == "bfloat16" and manifest["flip"] is True
    assert manifest["checkpoint"] == {"workdir": run.workdir, "step": STEP}
    for role, n in COUNTS.items():
        entry = manifest["splits"][role]
        assert entry["num_examples"] == n
        ranges = [(s["start"], s["end"]) for s in entry["shards"]]
        assert ranges == [(k, min(n, k + 4)) for k in range(0, n, 4)]  # tile [0, n)
        assert sum(s["count"] for s in entry["shards"]) == n
        # Every record of the files, read raw: each id exactly once, in order.
        ids = []
        for s in entry["shards"]:
            shard_file = ArrayRecordReader(os.path.join(run.dir, s["file"]))
            ids += [int(format.decode_record(r)["id"]) for r in shard_file.read_all()]
            shard_file.close()
        assert ids == list(range(n))
        records = read_all(run.dir, role)
        assert [int(r["label"]) for r in records] == direct[role]["label"].tolist()
        for field in format.FIELDS:
            stored = np.stack([r[field] for r in records])
            want = direct[role][field]
            np.testing.assert_allclose(stored, want, rtol=2 ** -8, atol=1e-6, err_msg=field)
            # bfloat16 of the same float32 values, up to one rounding step of the encoder noise
            assert np.mean(stored == want.astype(ml_dtypes.bfloat16).astype(np.float32)) > 0.95
        flip_gap = np.abs(direct[role]["flip_mean"] - direct[role]["mean"]).mean()
        assert flip_gap > 1e-3  # the flipped entries are really another image


def test_statistics_are_the_closed_form(run, direct):
    mu = direct["train"]["mean"].astype(np.float64).reshape(-1, 16)
    var = np.exp(direct["train"]["logvar"].astype(np.float64)).reshape(-1, 16)
    mean = mu.mean(0)
    std = np.sqrt(mu.var(0) + var.mean(0))
    stats = format.load_manifest(run.dir)["stats"]
    assert stats["split"] == "train" and stats["positions"] == 15 * 2 * 2
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats["std"], std, rtol=1e-5)
    # The sidecars' partial sums combine to the same numbers.
    sums = None
    for path in sorted(glob.glob(os.path.join(run.dir, "train-*.json"))):
        sums = format.add_sums(sums, json.load(open(path))["sums"])
    assert format.latent_stats(sums)["std"] == stats["std"]


def test_reader_normalises_samples_and_flips(run):
    src = reader.LatentSource(run.dir, "train", expected_config=run.cfg)
    m, s = src.mean, src.std
    example = src[3]
    mean_op = reader.SampleLatent(m, s, mode="mean", flip=False)
    out = mean_op(example, np.random.default_rng(0))
    np.testing.assert_array_equal(out["latent"], (example["mean"] - m) / s)
    assert (out["id"], out["label"], out["flipped"]) == (3, example["label"], False)
    sample_op = reader.SampleLatent(m, s, mode="sample", flip=True)
    got = sample_op(example, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    prefix = "flip_" if rng.uniform() < 0.5 else ""
    z = example[prefix + "mean"] + np.exp(0.5 * example[prefix + "logvar"]) * rng.standard_normal(
        (2, 2, 16), dtype=np.float32)
    np.testing.assert_allclose(got["latent"], (z - m) / s, rtol=1e-6)
    assert got["flipped"] == (prefix == "flip_")

    ds = reader.latent_dataset(run.dir, "train", seed=1, verify=False)
    a, b = list(ds), list(reader.latent_dataset(run.dir, "train", seed=1, verify=False))
    assert [int(x["id"]) for x in a] == list(range(15))
    assert all(np.array_equal(x["latent"], y["latent"]) for x, y in zip(a, b))  # (seed, index)
    assert 0 < sum(bool(x["flipped"]) for x in a) < 15
    again = list(reader.latent_dataset(run.dir, "train", seed=2, verify=False))
    assert not np.array_equal(a[0]["latent"], again[0]["latent"])
    batch = next(iter(ds.shuffle(seed=0).batch(5).to_iter_dataset(grain.ReadOptions())))
    assert batch["latent"].shape == (5, 2, 2, 16) and batch["latent"].dtype == np.float32


def test_rerun_of_a_complete_cache_writes_nothing(run):
    again = job.cache_latents(run.cfg, run.workdir, run.task)
    assert again["written"] == 0 and again["step"] == STEP


def test_benchmark_times_the_job_and_the_encoder(run):
    cfg = run.cfg.copy_and_resolve_references()
    cfg.cache.update(dir="", benchmark=48)
    record = throughput.benchmark(cfg, run.workdir, run.task)
    assert record["images"] == 48 and record["batch_size"] == 8 and record["devices"] == 8
    assert record["cache_images_per_sec"] > 0 and record["encode_images_per_sec"] > 0
    assert record["bytes_per_1000_images"] > 1000 * 24  # at least the record headers


# --------------------------------------------------------------------------- refusals

def copy_cache(run, name):
    path = run.root / name
    shutil.copytree(run.dir, path)
    return str(path)


def test_damaged_or_foreign_caches_are_refused(run):
    other = demo_config(**{"model.latent_channels": 8})
    with pytest.raises(ConfigError, match="was made by another autoencoder config"):
        reader.LatentSource(run.dir, "train", expected_config=other)
    with pytest.raises(ConfigError, match="no split 'test'"):
        reader.LatentSource(run.dir, "test")

    missing = copy_cache(run, "missing")
    os.remove(os.path.join(missing, "eval-00002-of-00008.array_record"))
    with pytest.raises(ConfigError, match=r"latent cache shard \S*missing/eval-00002-of-00008"
                                          r"\.array_record is missing"):
        reader.LatentSource(missing, "eval")

    corrupt = copy_cache(run, "corrupt")
    path = os.path.join(corrupt, "train-00001-of-00004.array_record")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    reader.LatentSource(corrupt, "eval")  # the other split is intact
    with pytest.raises(ConfigError, match=r"latent cache shard \S*corrupt/train-00001-of-00004"
                                          r"\.array_record is corrupted"):
        reader.LatentSource(corrupt, "train")

    incomplete = copy_cache(run, "incomplete")
    os.remove(os.path.join(incomplete, "manifest.json"))
    with pytest.raises(ConfigError, match=r"latent cache \S*incomplete is incomplete: no "
                                          r"manifest\.json"):
        reader.LatentSource(incomplete, "train")


def test_job_refuses_bad_inputs(run, tmp_path):
    cfg = demo_config()

    def validate(cfg):
        validation.validate(cfg, "cache_latents", workdir=run.workdir, device_count=8)

    with pytest.raises(ConfigError, match="cache.dir is required for --mode=cache_latents"):
        validate(cfg)
    cfg.cache.dir = str(tmp_path / "out")
    empty = tmp_path / "not_a_run"
    with pytest.raises(ConfigError, match=r"no checkpoint in \S*not_a_run/checkpoints: "
                                          "expected a trained run's workdir"):
        job.cache_latents(cfg, str(empty), run.task)
    assert not empty.exists()  # nothing created in a wrong workdir
    cfg.cache.step = 3
    with pytest.raises(ConfigError, match=r"cache.step=3: \S* has no checkpoint of that step"):
        job.cache_latents(cfg, run.workdir, run.task)
    cfg.cache.step = None
    cfg.cache.dtype = "int8"
    with pytest.raises(ConfigError, match="cache.dtype='int8'"):
        validate(cfg)
    cfg.cache.dtype = "bfloat16"
    cfg.cache.batch_size = 12
    with pytest.raises(ConfigError, match=r"cache.batch_size=12 \(global\) is not divisible"):
        validate(cfg)

    # Shards of another run (here another dtype) are never mixed into a resumed cache.
    cfg.cache.batch_size = 8
    cfg.cache.dir = copy_cache(run, "foreign")
    os.remove(os.path.join(cfg.cache.dir, "manifest.json"))
    cfg.cache.dtype = "float16"
    with pytest.raises(ConfigError, match=r"train-00000-of-00004\.json belongs to another caching "
                                          r"run \(dtype='bfloat16', this run 'float16'\)"):
        job.cache_latents(cfg, run.workdir, run.task)
    cfg.cache.update(dtype="bfloat16", crops_per_image=2)  # other images behind the eval ids
    with pytest.raises(ConfigError, match=r"eval-00000-of-00008\.json belongs to another caching "
                                          r"run \(data_sha256="):
        job.cache_latents(cfg, run.workdir, run.task)
    with pytest.raises(ConfigError, match=r"manifest\.json describes another cache \(differs in "
                                          "dtype\\)"):
        job.cache_latents(dict_copy(run.cfg, dtype="float16"), run.workdir, run.task)


def dict_copy(cfg, **cache):
    out = cfg.copy_and_resolve_references()
    out.cache.update(cache)
    return out


# --------------------------------------------------------------------------- the CLI

@pytest.mark.slow
def test_cli_resumes_after_sigkill_to_the_same_cache(run, tmp_path):
    out = tmp_path / "cache"
    # One image per batch and two per shard: 24 shards, so a kill lands in the middle.
    cmd = [sys.executable, "-m", "dgae_jax.main", *cli_args(), f"--workdir={run.workdir}",
           "--mode=cache_latents", f"--config.cache.dir={out}", "--config.cache.batch_size=1",
           "--config.cache.examples_per_shard=2"]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while not glob.glob(str(out / "*.array_record")):
            assert proc.poll() is None, open(tmp_path / "first.log").read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = glob.glob(str(out / "*.array_record"))
    assert not (out / "manifest.json").exists(), "the job finished before it was killed"
    assert 0 < len(done) < 24

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["shards"] == 24 and summary["written"] == 24 - len(done)
    assert not glob.glob(str(out / "*.tmp"))  # leftovers overwritten and renamed

    # The same records, byte for byte, as the uninterrupted in-process run (one image per
    # device there too), and the same statistics from the partial sums of both runs' sidecars.
    manifest = format.load_manifest(out, expected_config=run.cfg)
    reference = format.load_manifest(run.dir)
    assert [len(manifest["splits"][r]["shards"]) for r in COUNTS] == [8, 16]
    for role, n in COUNTS.items():
        got = reader.LatentSource(out, role)
        want = reader.LatentSource(run.dir, role)
        assert [int(got[i]["id"]) for i in range(len(got))] == list(range(n))
        assert [got.records[i] for i in range(n)] == [want.records[i] for i in range(n)]
    np.testing.assert_allclose(manifest["stats"]["mean"], reference["stats"]["mean"],
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(manifest["stats"]["std"], reference["stats"]["std"], rtol=1e-12)


@pytest.mark.slow
def test_unreadable_images_are_left_out_and_listed(run, tmp_path):
    """A folder with an unreadable image: the cache has no record for its id (no substitute
    under it), lists it in the manifest and sidecar, and the reader yields the others; with
    data.bad_images='error' the job stops naming the file."""
    root = tmp_path / "images"
    for k in range(6):
        write_image(root / "train" / "c" / f"im{k}.png", 40, 48, k)
    (root / "train" / "c" / "im3b.png").write_bytes(b"not a png")  # id 4 in sorted order
    cfg = demo_config(**{"data.name": "folder", "data.dir": str(root), "data.eval_split": "train",
                         "cache.dir": str(tmp_path / "cache")})
    cfg.cache.splits = ("train",)
    job.cache_latents(cfg, run.workdir, run.task)
    manifest = format.load_manifest(cfg.cache.dir)
    entry = manifest["splits"]["train"]
    assert entry["missing"] == [4] and entry["num_ids"] == 7 and entry["num_examples"] == 6
    assert sum(len(s["missing"]) for s in entry["shards"]) == 1
    records = read_all(cfg.cache.dir, "train")
    assert [int(r["id"]) for r in records] == [0, 1, 2, 3, 5, 6]
    source = sources.make_source(cfg, "train")
    views = np.stack([pipeline.eval_example(i, source=source, count=7, size=32)["image"]
                      for i in (0, 1, 2, 3, 5, 6)])
    q = run.task.model.encode({"encoder": run.encoder}, views.astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_allclose(np.stack([r["mean"] for r in records]), q.mean, rtol=1e-2,
                               atol=1e-3)  # stored as bfloat16

    cfg.data.bad_images = "error"
    cfg.cache.dir = str(tmp_path / "cache_error")
    with pytest.raises(BadImage, match="im3b.png"):
        job.cache_latents(cfg, run.workdir, run.task)
