"""One validation pass per (config, mode) names the bad field in one line, before any work."""

import importlib
import os
import pkgutil
import sys

import pytest
from absl import flags

import dgae_jax
from dgae_jax import config_lib, errors, main
from dgae_jax.errors import ConfigError
from dgae_jax.modes import MODES
from dgae_jax.tasks.registry import TASKS
from dgae_jax.validation import validate
from helpers import override

AE, LDM = "autoencoder", "ldm"


def configure(task: str, overrides: dict):
    cfg = (config_lib.autoencoder_config(16, "demo") if task == AE
           else config_lib.ldm_config("demo"))
    return override(cfg, overrides)


CASES = [  # task, mode, overrides, the text the one-line error must contain
    (AE, "train", {"total_steps": 0}, "total_steps=0 must be positive"),
    (AE, "train", {"batch_size": 12}, "batch_size=12 (global) is not divisible by the 8 devices"),
    (AE, "benchmark", {"mesh.data": 3}, "mesh.data x mesh.fsdp = 3 x 1 does not fit the 8"),
    (AE, "train", {"mesh.fsdp": 0}, "mesh.fsdp=0 must be positive or -1"),
    (AE, "train", {"ema_decay": 1.5}, "ema_decay=1.5 is not in [0, 1)"),
    (AE, "train", {"profile_steps": (5, 2)}, "profile_steps=(5, 2) is not ()"),
    (AE, "train", {"mesh.dcn_data": 0}, "mesh.dcn_data=0 must be positive"),
    (AE, "train", {"mesh.dcn_data": 3}, "mesh.data=8 is not divisible by mesh.dcn_data=3"),
    (AE, "train", {"optimizer.b2": 1.0}, "optimizer.b2=1.0 is not in [0, 1)"),
    (AE, "train", {"optimizer.lr": -1.0}, "optimizer.lr=-1.0 must not be negative"),
    (AE, "train", {"sharding.rules": (("[", "fsdp"),)}, "sharding.rules[0]: '[' is not a regex"),
    (AE, "summary", {"image_size": 100}, "image_size=100 is not divisible by the spatial factor"),
    (AE, "eval", {"model.decoder": "gan"}, "model.decoder='gan' is not one of"),
    (AE, "train", {"model.dtype": "float64"}, "model.dtype='float64' is not one of"),
    (AE, "eval", {"diffusion.sampler": "ddim"}, "diffusion.sampler='ddim' is not one of"),
    (AE, "eval", {"diffusion.sample_steps": 0}, "diffusion.sample_steps=0 must be positive"),
    (AE, "train", {"loss.lpips_net": "squeeze"}, "loss.lpips_net='squeeze' is not one of"),
    (AE, "train", {"loss.kl_weight": -1.0}, "loss.kl_weight=-1.0 must not be negative"),
    (AE, "train", {"data.name": "imagenet"}, "unknown data.name='imagenet'"),
    (AE, "train", {"data.crop": "center"}, "data.crop='center' is not one of"),
    (AE, "train", {"data.min_scale": 0.0}, "data.min_scale=0.0 is not in (0, 1]"),
    (AE, "eval", {"data.eval_subset": "imagenet_val_1k"}, "data.eval_subset='imagenet_val_1k'"),
    (AE, "eval", {"data.eval_crops": 0}, "data.eval_crops=0 must be >= 1"),
    (AE, "eval", {"eval.tag": "a/b"}, "eval.tag='a/b' must be letters, digits"),
    (LDM, "eval", {"eval.tag": "x y"}, "eval.tag='x y' must be letters, digits"),
    (AE, "cache_latents", {"data.name": "folder"}, "data.name='folder' needs data.dir"),
    (AE, "train", {"data.name": "folder", "data.dir": "/nonexistent"},
     "data.dir='/nonexistent' does not exist"),
    (AE, "eval", {"eval.inception_weights": "/nonexistent.npz"},
     "eval.inception_weights='/nonexistent.npz': no such file"),
    (AE, "cache_latents", {"cache.dir": ""}, "cache.dir is required for --mode=cache_latents"),
    (AE, "cache_latents", {"cache.dir": "/tmp/c", "cache.dtype": "int8"},
     "cache.dtype='int8' is not one of"),
    (AE, "cache_latents", {"cache.dir": "/tmp/c", "cache.splits": ("test",)},
     "cache.splits=('test',) must be distinct names"),
    (AE, "cache_latents", {"cache.dir": "/tmp/c", "cache.batch_size": 12},
     "cache.batch_size=12 (global) is not divisible by the 8 devices"),
    (AE, "sample", {}, "--mode=sample does not apply to task='autoencoder'"),
    (LDM, "train", {"sample.classes": (0, 99)}, "sample.classes=[99] are outside [0, 19)"),
    (LDM, "summary", {"model.heads": 5}, "model.hidden=128 does not split into model.heads=5"),
    (LDM, "benchmark", {"model.patch_size": 3}, "model.patch_size=3 does not divide"),
    (LDM, "sample", {"cache.dir": ""}, "cache.dir is required"),
    (LDM, "train", {"cache.dir": "/nonexistent"}, "cache.dir='/nonexistent' does not exist"),
    (LDM, "summary", {"cache.latent": "mode"}, "cache.latent='mode' is not one of"),
    (LDM, "summary", {"diffusion.guidance": -1.0}, "diffusion.guidance=-1.0 must not be"),
    (LDM, "cache_latents", {}, "--mode=cache_latents does not apply to task='ldm'"),
    (LDM, "train", {"diffusion.objective": "edm"}, "diffusion.objective='edm' is not one of"),
    (LDM, "sample", {"diffusion.sampler": "heun"}, "diffusion.sampler='heun' is not one of"),
    (LDM, "sample", {"diffusion.spacing": "reversed_log"}, "diffusion.spacing='reversed_log'"),
    (LDM, "train", {"diffusion.beta_end": 2.0}, "diffusion.beta_start=0.0001, beta_end=2.0"),
    (LDM, "eval", {"diffusion.sample_steps": 1001}, "diffusion.sample_steps=1001 is not in [2"),
    (LDM, "sample", {"diffusion.sample_steps": 1}, "diffusion.sample_steps=1 is not in [2, "),
    (LDM, "sample", {"diffusion.objective": "rf", "diffusion.sampler": "ddpm"},
     "diffusion.sampler='ddpm' is not one of euler, heun"),
    (AE, "sweep", {"model.decoder": "conv"}, "--mode=sweep needs model.decoder='diffusion'"),
    (AE, "sweep", {"eval.sweep_steps": (1, 0)}, "eval.sweep_steps=(1, 0) must be distinct"),
    (AE, "sweep", {"eval.sweep_steps": ()}, "eval.sweep_steps=() must be distinct positive"),
    (AE, "sweep", {"eval.sweep_samplers": ("ddim",)}, "eval.sweep_samplers=('ddim',) must be"),
    (AE, "sweep", {"eval.sweep_spacings": ()}, "eval.sweep_spacings=() must be distinct names"),
    (LDM, "sweep", {}, "--mode=sweep does not apply to task='ldm'"),
]


@pytest.mark.parametrize("task,mode,overrides,message", CASES,
                         ids=[f"{c[0]}-{c[1]}-{'+'.join(c[2]) or 'mode'}" for c in CASES])
def test_bad_field_is_one_line_naming_it(tmp_path, task, mode, overrides, message):
    cfg = configure(task, overrides)
    if task == LDM and "cache.dir" not in overrides:
        cfg.cache.dir = str(tmp_path)
    with pytest.raises(ConfigError) as error:
        validate(cfg, mode, workdir=str(tmp_path / "run"), device_count=8, process_count=1)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_the_default_configs_pass(tmp_path):
    for factor in (8, 16, 32):
        for arg in ("", "decoder=conv", "c=8,size=M", "demo"):
            validate(config_lib.autoencoder_config(factor, arg), "train",
                     workdir=str(tmp_path), device_count=8)
    for arg in ("", "objective=rf", "c=8,objective=rf,demo"):
        ldm = config_lib.ldm_config(arg)
        ldm.cache.dir = str(tmp_path)
        validate(ldm, "sample", workdir=str(tmp_path), device_count=8)


def test_missing_workdir_and_bad_fields_stop_before_any_file_work(tmp_path):
    cfg = configure(AE, {})
    with pytest.raises(ConfigError, match="--workdir is required for --mode=train"):
        validate(cfg, "train", workdir=None)
    workdir = tmp_path / "run"
    cfg = configure(AE, {"data.crop": "center"})
    with pytest.raises(ConfigError, match="data.crop"):
        main.run(cfg, "train", str(workdir))
    assert not os.path.exists(workdir)


def test_every_mode_serves_registered_tasks_and_every_task_trains():
    for name, mode in MODES.items():
        assert set(mode.tasks) <= set(TASKS), name
    for task in TASKS:
        assert {"train", "eval", "summary", "benchmark"} <= {
            name for name, mode in MODES.items() if task in mode.tasks}, task


def test_every_error_is_a_dgae_error_the_cli_prints_as_one_line(monkeypatch):
    """One base, so that `main` catches them all; a new error type elsewhere fails here."""
    for info in pkgutil.walk_packages(dgae_jax.__path__, "dgae_jax."):
        importlib.import_module(info.name)
    defined = {cls for module in list(sys.modules.values())
               if getattr(module, "__name__", "").startswith("dgae_jax")
               for cls in vars(module).values()
               if isinstance(cls, type) and issubclass(cls, BaseException)
               and cls.__module__.startswith("dgae_jax")}
    assert defined and all(cls.__module__ == "dgae_jax.errors" for cls in defined), defined
    assert all(issubclass(cls, errors.DGAEError) for cls in defined)
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["main"])  # main.main reads the (default) flag values
    for error, prefix in ((errors.LPIPSWeightsError("no LPIPS weights"), "stopped"),
                          (errors.CorruptCheckpoint(3, "ema", "does not match"), "stopped"),
                          (errors.InceptionWeightsError("no Inception weights"), "config error")):
        def fail(*args, error=error):
            raise error
        monkeypatch.setattr(main, "run", fail)
        with pytest.raises(SystemExit) as stopped:
            main.main(["main"])
        assert stopped.value.code == f"{prefix}: {error}"
