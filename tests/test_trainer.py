"""The shared trainer: sharded steps equal the single-device step; resume is exact."""

import glob
import logging
import os

import jax
import numpy as np
import pytest

from dgae_jax import config_lib, parallel, steps, trainer
from dgae_jax.errors import ConfigError
from dgae_jax.data import pipeline
from dgae_jax.tasks.ae import AutoencoderTask
from dgae_jax.tasks.ldm import LatentDiffusionTask
from fakes import SyntheticLatentTask, ldm_train_config, mesh_of, recording


def train_config(tiny_config, decoder="diffusion", gan=0.0):
    cfg = tiny_config(8, decoder, size=32, c=4, gan=gan)
    cfg.batch_size = 8
    cfg.data.name = "embedded"
    cfg.data.crop = "random_resized"
    cfg.data.eval_size = 8
    cfg.optimizer.warmup_steps = 1
    cfg.sharding.min_fsdp_size = 0  # shard every parameter that divides
    cfg.total_steps = 6
    cfg.log_every = 2
    cfg.eval_every = 1000  # only at the end
    cfg.checkpoint_every = 4
    cfg.ema_decay = 0.9
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("decoder,gan", [("diffusion", 0.0), ("conv", 0.5)])
def test_sharded_step_equals_single_device(tiny_config, decoder, gan):
    cfg = train_config(tiny_config, decoder, gan)
    if decoder == "conv":
        cfg.loss.lpips_weight = 0.0  # the diffusion case covers LPIPS; this keeps compiles short
    assert_sharded_steps_match(cfg, AutoencoderTask(cfg), next(iter(pipeline.train_dataset(cfg))))


def test_sharded_ldm_step_equals_single_device():
    cfg = config_lib.ldm_config("demo")
    cfg.model.update(hidden=32, depth=2, heads=2, num_classes=4)
    cfg.update(batch_size=8, total_steps=6)
    cfg.optimizer.warmup_steps = 1
    cfg.sharding.min_fsdp_size = 0
    task = LatentDiffusionTask(cfg, "summary")
    rng = np.random.default_rng(0)
    local = {"latent": rng.standard_normal((8, 4, 4, 16)).astype(np.float32),
             "label": rng.integers(0, 4, 8).astype(np.int32)}
    assert_sharded_steps_match(cfg, task, local)


def assert_sharded_steps_match(cfg, task, local):
    """Two train steps on mesh (2, 4) update the parameters as on one device."""
    assert jax.device_count() == 8, "conftest must provide 8 CPU devices"
    # A large step and an Adam epsilon far above float32 noise in the gradients: the parameter
    # updates then reflect the gradients (Adam would turn noise in ~0 gradients into +-lr).
    cfg.optimizer.update(lr=1e-2, eps=1e-3)
    results = {}
    for data, fsdp in [(1, 1), (2, 4)]:  # (2, 4) splits the batch over both axes
        mesh = mesh_of(data, fsdp)
        fns = steps.build_steps(cfg, task, mesh)
        model = jax.device_put(task.model, parallel.replicated(mesh))
        state = fns.init(model, jax.random.key(0))
        init = jax.device_get(state["params"])
        for _ in range(2):  # the first step has learning rate 0 (warm-up)
            state, metrics = fns.train_step(model, state, parallel.global_batch(local, mesh))
        if fsdp > 1:
            specs = [str(x.sharding.spec) for x in jax.tree.leaves(state["params"])]
            assert sum("fsdp" in s for s in specs) > len(specs) // 2
        updates = jax.tree.map(np.subtract, jax.device_get(state["params"]), init)
        results[(data, fsdp)] = (updates, jax.device_get(metrics))
    reference = results.pop((1, 1))
    for mesh_shape, (updates, metrics) in results.items():
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(metrics[key], reference[1][key], rtol=1e-5)
        # Updates are of the order of lr = 1e-2. Summation order differs between the meshes, and
        # the GAN's adaptive weight (a ratio of gradient norms) amplifies that float32 noise to
        # ~5e-5 on single elements; a sharding error would be of the order of the updates.
        for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(reference[0])):
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4, err_msg=str(mesh_shape))


@pytest.mark.parametrize("kind", [pytest.param("autoencoder", marks=pytest.mark.slow), "ldm"])
def test_exact_resume_after_sigterm(tiny_config, tmp_path, kind, caplog):
    if kind == "autoencoder":
        cfg, task_cls = train_config(tiny_config), recording(AutoencoderTask)
    else:
        cfg, task_cls = ldm_train_config(), recording(SyntheticLatentTask)
    mesh = mesh_of(2, 4)
    straight = task_cls(cfg)
    profiled = cfg.copy_and_resolve_references()
    profiled.profile_steps = (4, 6)
    with caplog.at_level(logging.INFO):
        want = trainer.train_and_evaluate(profiled, str(tmp_path / "straight"), straight, mesh)
    assert "train step compiled in" in caplog.text
    assert glob.glob(str(tmp_path / "straight" / "profile" / "**" / "*.xplane.pb"),
                     recursive=True)

    first = task_cls(cfg, signal_at=3)  # SIGTERM arrives while step 3 is prepared
    stopped = trainer.train_and_evaluate(cfg, str(tmp_path / "resumed"), first, mesh)
    assert int(stopped["step"]) == 3
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["3"]
    second = task_cls(cfg)
    got = trainer.train_and_evaluate(cfg, str(tmp_path / "resumed"), second, mesh)

    assert first.log + second.log == straight.log  # same batches, same order, none skipped
    assert len(straight.log) == 6
    assert int(got["step"]) == int(want["step"]) == 6
    for a, b in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(jax.device_get(want))):
        np.testing.assert_array_equal(a, b)
    if kind == "autoencoder":
        for run in ("straight", "resumed"):
            assert os.path.exists(tmp_path / run / "eval" / "6.json")
            assert os.path.exists(tmp_path / run / "images" / "6.png")


def test_invalid_configs_fail_at_start(tiny_config, tmp_path):
    cfg = train_config(tiny_config)
    cfg.batch_size = 12
    with pytest.raises(ConfigError, match="batch_size=12"):
        trainer.train_and_evaluate(cfg, str(tmp_path), AutoencoderTask(cfg), mesh_of(8, 1))
    cfg = train_config(tiny_config)
    cfg.data.name = "imagenet"
    with pytest.raises(ConfigError, match="data.name='imagenet'"):
        trainer.train_and_evaluate(cfg, str(tmp_path), AutoencoderTask(cfg), mesh_of(1, 1))
