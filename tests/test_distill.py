"""The distillation task (distill.py): the loss worked by hand, the student's start, and the
student decoding through the loaders every mode and the API use."""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dgae_jax import api, config_lib, diffusion, parallel, trainer, validation
from dgae_jax.modes import sweep
from dgae_jax.errors import ConfigError
from dgae_jax.metrics import lpips
from dgae_jax.tasks import ldm as ldm_task
from dgae_jax.tasks.distill import DistillationTask, teacher_run
from dgae_jax.tasks.trained import load_autoencoder

from fakes import mesh_of, recording
from helpers import OVERRIDES, config_file, override, photo_crops, save_run


def teacher_config(factor):
    """The f`factor` demo autoencoder at test size (32 px), decoding in 2 steps."""
    return override(config_lib.autoencoder_config(factor, "demo"),
                    {**OVERRIDES, "diffusion.sample_steps": 2})


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """{factor: (workdir, EMA parameters)} of an f8 and an f16 autoencoder run checkpointed at
    step 5."""
    out = {}
    for factor in (8, 16):
        workdir = tmp_path_factory.mktemp(f"teacher{factor}") / "run"
        out[factor] = str(workdir), save_run(workdir, teacher_config(factor), 5)["ema"]
    return out


@pytest.fixture(scope="module")
def teacher(teachers):
    return teachers[16]


def student_config(teacher_dir, user_set=None, **extra):
    """configs/distill.py:demo with `user_set` applied as the command line does, completed from
    the teacher run, then `extra` applied."""
    cfg = override(config_lib.distill_config("demo"), user_set or {})
    cfg.distill.update(teacher=teacher_dir, teacher_steps=3)
    DistillationTask.complete_config(cfg, user_set or {})
    return override(cfg, extra)


@pytest.fixture(scope="module")
def task(teacher):
    cfg = student_config(teacher[0], **{"distill.student_steps": (1, 2),
                                        "distill.mse_weight": 1.0, "distill.lpips_weight": 0.5,
                                        "distill.gt_mse_weight": 0.3,
                                        "distill.gt_lpips_weight": 0.2})
    validation.validate(cfg, "train", workdir=teacher[0])
    return DistillationTask(cfg, "eval")


def test_one_config_file_takes_the_networks_of_any_teacher(teachers):
    get_config = config_file("distill.py")
    for factor, (workdir, _) in teachers.items():
        cfg = get_config("demo")
        cfg.distill.teacher = workdir
        user_set = {"data.eval_crops": 2, "optimizer.lr": 0.1}  # as the CLI applies them
        DistillationTask.complete_config(override(cfg, user_set), user_set)
        want = teacher_config(factor)
        assert cfg.model.to_dict() == want.model.to_dict() and cfg.image_size == 32
        assert cfg.model.spatial_factor == factor and cfg.loss.lpips_net == "alexnet"
        assert cfg.name == f"f{factor}-demo-student" and cfg.task == "distill"
        assert cfg.data.eval_crops == 2 and cfg.data.name == want.data.name  # the user's wins
        assert cfg.optimizer.lr == 0.1 and cfg.total_steps == 1_200  # the recipe's
        validation.validate(cfg, "train", workdir=workdir)


def test_a_network_field_the_user_set_must_be_the_teachers(teacher):
    student_config(teacher[0], {"model.unet.width": 8, "image_size": 32})  # the same: fine
    with pytest.raises(ConfigError, match=r"^model.unet.width=16, but distill.teacher='\S*' was "
                       r"trained with 8: a student has its teacher's networks"):
        student_config(teacher[0], {"model.unet.width": 16})
    with pytest.raises(ConfigError, match=r"^distill.teacher is required"):
        DistillationTask.complete_config(config_lib.distill_config("demo"), {})


@pytest.mark.parametrize("factor", [8, 16])
def test_the_student_starts_as_the_teacher(teachers, factor):
    workdir, ema = teachers[factor]
    task = DistillationTask(student_config(workdir), "export")
    assert task.teacher_step == 5 and task.config.distill.teacher_step == 5
    latent_shape = [32 // factor, 32 // factor, task.config.model.latent_channels]
    assert task.describe({"decoder": 1})["latent_shape"] == latent_shape  # --mode=summary's
    assert task.benchmark_components((), None, None, None) == {}  # --mode=benchmark: the step
    params = task.init_params(task.model, jax.random.key(0))
    for got, want in zip(jax.tree.leaves(params["decoder"]), jax.tree.leaves(ema["decoder"])):
        np.testing.assert_array_equal(np.asarray(got), want)
    # So its 1-step decode is the teacher's 1-step decode, from any latent and noise.
    ae = task.model.autoencoder
    z = jax.random.normal(jax.random.key(1), (2, *latent_shape))
    noise = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    decode = jax.jit(lambda p: ae.decode_from_noise(p, z, noise, 1))
    np.testing.assert_array_equal(decode(task.model.student(params)),
                                  decode(jax.tree.map(jnp.asarray, ema)))


@pytest.mark.slow  # compiles the loss and its gradient through 3 + 1 + 2 U-Net steps twice
def test_loss_by_hand(task):
    model, d = task.model, task.config.distill
    ae = model.autoencoder
    params = task.init_params(model, jax.random.key(0))
    params = jax.tree.map(lambda p: p * 1.05 + 0.01, params)  # a student that has moved
    x = jnp.asarray(photo_crops(4, 32, seed=0))
    rng = jax.random.key(3)
    loss_fn = type(model).loss_fn
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=1, has_aux=True))(
        model, params, {"image": x}, rng)
    assert set(grads) == {"decoder"}  # the teacher is not trained
    assert float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))) > 0

    @jax.jit
    def by_hand(model, params, x):
        enc = model.teacher["encoder"]
        z = ae.encode({"encoder": enc}, x).mean
        noise = jax.random.normal(rng, x.shape)
        target = diffusion.sample(lambda x_t, t: ae.velocity(model.teacher, x_t, t, z), noise,
                                  3, "euler", "uniform")
        student = {"encoder": enc, "decoder": params["decoder"]}
        terms = {"teacher_gt_mse": jnp.mean((target - x) ** 2)}
        for k in (1, 2):
            # k Euler steps written out: x <- x + (t_next - t) v, t from 1 to 0.
            out, ts = noise, np.linspace(1.0, 0.0, k + 1)
            for t, t_next in zip(ts[:-1], ts[1:]):
                out = out + (t_next - t) * ae.velocity(student, out, jnp.full((4,), t), z)
            for prefix, reference in (("", target), ("gt_", x)):
                terms[f"{prefix}mse_{k}"] = jnp.mean((out - reference) ** 2)
                terms[f"{prefix}lpips_{k}"] = jnp.mean(lpips.lpips_distance(
                    model.autoencoder.lpips_weights, out, reference, net="alexnet"))
        return terms

    terms = jax.device_get(by_hand(model, params, x))
    assert set(metrics) == {"loss", *terms}
    for name, value in terms.items():
        assert metrics[name] == pytest.approx(float(value), rel=1e-4), name
    want = sum(d.mse_weight * terms[f"mse_{k}"] + d.lpips_weight * terms[f"lpips_{k}"]
               + d.gt_mse_weight * terms[f"gt_mse_{k}"] + d.gt_lpips_weight * terms[f"gt_lpips_{k}"]
               for k in (1, 2)) / 2
    assert (d.mse_weight, d.lpips_weight, d.gt_mse_weight, d.gt_lpips_weight) == (1, 0.5, 0.3, 0.2)
    assert float(loss) == pytest.approx(float(want), rel=1e-4)

    # Without the teacher's terms (the default recipe) the teacher's decoder is not run.
    ground_truth_only = copy.deepcopy(task.config)
    ground_truth_only.distill.update(mse_weight=0.0, lpips_weight=0.0)
    model = dataclasses.replace(model, autoencoder=dataclasses.replace(
        ae, config=ml_collections.FrozenConfigDict(ground_truth_only)))
    _, shapes = jax.eval_shape(loss_fn, model, params, {"image": x}, rng)
    assert set(shapes) == {"loss", "gt_mse_1", "gt_lpips_1", "gt_mse_2", "gt_lpips_2"}


@pytest.mark.slow
def test_a_student_run_decodes_with_the_teachers_encoder(task, teacher, tmp_path):
    teacher_dir, ema = teacher
    cfg = task.config
    state = {"step": np.int32(7), "params": {"decoder": ema["decoder"]},
             "opt_state": {}, "rng": np.zeros(2, np.uint32), "nonfinite": np.int32(0),
             "ema": {"decoder": jax.tree.map(lambda p: p + 0.5, ema["decoder"])}}
    save_run(tmp_path / "student", cfg, 7, task=task, state=state)
    mesh = parallel.local_mesh()
    step, _, params = load_autoencoder(cfg, str(tmp_path / "student"), mesh)
    assert step == 7
    for got, want in zip(jax.tree.leaves(params["encoder"]), jax.tree.leaves(ema["encoder"])):
        np.testing.assert_array_equal(np.asarray(got), want)
    # The DiT decodes its samples with a student of the autoencoder its cache was made with.
    assert ldm_task.student_config(str(tmp_path / "student"),
                                   {"workdir": teacher_dir, "step": 5}).task == "distill"
    with pytest.raises(ConfigError, match="is not a student of the cache's autoencoder"):
        ldm_task.student_config(str(tmp_path / "student"), {"workdir": teacher_dir, "step": 4})
    ae = api.load(tmp_path / "student")
    assert ae.step == 7 and ae.config.diffusion.sample_steps == 1
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(ae.params["decoder"])[0]),
                                  jax.tree.leaves(ema["decoder"])[0] + 0.5)


@pytest.mark.slow
def test_exact_resume(teacher, tmp_path):
    cfg = student_config(teacher[0], **{"batch_size": 8, "data.eval_size": 8})
    cfg.distill.update(teacher_steps=2, student_steps=(1,))
    cfg.update(total_steps=4, log_every=2, eval_every=1000, checkpoint_every=2)
    task_cls, mesh = recording(DistillationTask), mesh_of(2, 4)
    straight = task_cls(cfg)
    want = trainer.train_and_evaluate(cfg, str(tmp_path / "straight"), straight, mesh)
    first = task_cls(cfg, signal_at=3)  # SIGTERM while step 3 is prepared
    assert int(trainer.train_and_evaluate(cfg, str(tmp_path / "resumed"), first, mesh)["step"]) == 3
    second = task_cls(cfg)
    got = trainer.train_and_evaluate(cfg, str(tmp_path / "resumed"), second, mesh)
    assert first.log + second.log == straight.log and len(straight.log) == 4
    assert set(got["params"]) == {"decoder"}
    for a, b in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(jax.device_get(want))):
        np.testing.assert_array_equal(a, b)
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(want["params"]),
                                                      jax.tree.leaves(teacher[1]["decoder"]))]
    assert any(moved)  # the student trained
    assert (tmp_path / "straight" / "eval" / "4.json").exists()  # with the teacher's encoder


def test_the_sweep_puts_student_and_teacher_on_one_plot(task):
    grid = task.sweep_settings()
    assert [(s["decoder"], s["steps"]) for s in grid] == [
        ("student", 1), ("student", 2), ("student", 4), ("teacher", 1), ("teacher", 2),
        ("teacher", 4), ("teacher", 8), ("teacher", 25)]
    rows = [dict(s, nfe=s["steps"], psnr=20.0 + s["steps"]) for s in grid]
    assert sweep.plot(rows).startswith(b"\x89PNG")
    assert sorted({sweep._line(r) for r in rows}) == [("student", "euler", "uniform"),
                                                     ("teacher", "euler", "uniform")]


def test_a_teacher_of_other_networks_is_refused(teacher):
    cfg = student_config(teacher[0], **{"model.unet.width": 16})
    with pytest.raises(ConfigError, match=r"model.unet.width=8, this config 16"):
        teacher_run(cfg)
    cfg = student_config(teacher[0])
    cfg.distill.teacher_step = 9
    with pytest.raises(ConfigError, match=r"distill.teacher_step=9: \S* has no checkpoint of that step \(it has \[5\]\)"):
        teacher_run(cfg)
