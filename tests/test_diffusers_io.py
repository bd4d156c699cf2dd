"""diffusers AutoencoderKL import/export (diffusers_io.py) against diffusers itself, on photos."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.numpy import load_file, save_file

from dgae_jax import diffusers_io, trainer, validation
from dgae_jax.autoencoder import Autoencoder
from dgae_jax.errors import ConfigError
from dgae_jax.steps import build_steps
from dgae_jax.tasks.ae import AutoencoderTask

from fakes import mesh_of
from helpers import DIFFUSERS_SIZE as SIZE, diffusers_config as small_config
from helpers import photo_crops, random_diffusers_vae, synthetic_state


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("diffusers") / "vae"
    vae = random_diffusers_vae(small_config())
    vae.save_pretrained(path)
    return path, vae


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


# Jitted once for the module: the tests that share a config and batch shape compile once.
encode = jax.jit(Autoencoder.encode)
decode = jax.jit(Autoencoder.decode)


def ours_and_theirs(cfg, params, vae, x):
    """(posterior mean, logvar, decoded mean) of our model and of diffusers', NHWC."""
    ae = Autoencoder.from_config(cfg, with_lpips=False)
    params = {m: params[m] for m in ("encoder", "decoder")}  # one pytree type: one compile
    post = encode(ae, params, jnp.asarray(x))
    out = decode(ae, params, post.mean, jax.random.key(0))
    with torch.no_grad():
        dist = vae.encode(nchw(x)).latent_dist
        sample = vae.decode(nchw(post.mean)).sample
    return ((post.mean, post.logvar, out),
            (nhwc(dist.mean), nhwc(dist.logvar), nhwc(sample)))


def assert_close(ours, theirs):
    for name, a, b in zip(("mean", "logvar", "decoded"), ours, theirs):
        err = float(np.max(np.abs(np.asarray(a) - b)))
        assert err < 1e-4, f"{name}: max abs difference {err}"


def test_loaded_weights_match_diffusers_on_photos(diffusers_dir):
    path, vae = diffusers_dir
    cfg = small_config()
    params = diffusers_io.load_params(path, cfg, ("encoder", "decoder"))
    abstract = jax.eval_shape(Autoencoder.from_config(cfg, with_lpips=False).init,
                              jax.random.key(0))
    for module in ("encoder", "decoder"):
        assert jax.tree.structure(params[module]) == jax.tree.structure(abstract[module])
        for p, a in zip(jax.tree.leaves(params[module]), jax.tree.leaves(abstract[module])):
            assert isinstance(p, np.ndarray) and p.dtype == np.float32 and p.shape == a.shape
    assert_close(*ours_and_theirs(cfg, params, vae, photo_crops(3, SIZE, seed=0)))


def test_legacy_attention_names_load_the_same(diffusers_dir, tmp_path):
    """SD-VAE's published files still name attention tensors query/key/value/proj_attn."""
    path, _ = diffusers_dir
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for name, t in load_file(str(path / diffusers_io.WEIGHTS_FILE)).items():
        for new, old in legacy.items():
            name = name.replace(f".{new}.", f".{old}.")
        renamed[name] = t
    assert any(".query." in n for n in renamed)
    shutil.copy(path / diffusers_io.CONFIG_FILE, tmp_path / diffusers_io.CONFIG_FILE)
    save_file(renamed, str(tmp_path / diffusers_io.WEIGHTS_FILE))
    cfg = small_config()
    a = diffusers_io.load_params(path, cfg, ("encoder",))
    b = diffusers_io.load_params(tmp_path, cfg, ("encoder",))
    jax.tree.map(np.testing.assert_array_equal, a, b)


def random_params(cfg) -> dict:
    """Random weights in the shapes of our init, discriminator included (numpy: an eager
    Autoencoder.init takes about 15 s on 2 cores). Kernels have variance 1/fan-in; norm scales
    and all biases are perturbed from 1 and 0, so that a swapped mapping shows."""
    rng = np.random.default_rng(0)

    def leaf(path, a):
        noise = rng.standard_normal(a.shape).astype(np.float32)
        if path[-1].key == "kernel":
            return noise / np.float32(np.sqrt(np.prod(a.shape[:-1])))
        return (path[-1].key == "scale") + np.float32(0.1) * noise

    abstract = jax.eval_shape(Autoencoder.from_config(cfg, with_lpips=False).init,
                              jax.random.key(0))
    return jax.tree_util.tree_map_with_path(leaf, abstract)


def test_export_loads_in_diffusers_and_round_trips(tmp_path):
    cfg = small_config()
    params = random_params(cfg)
    assert "discriminator" in params  # the demo conv baseline trains with a GAN; not exported
    path = tmp_path / "export"
    diffusers_io.save(path, cfg, params, scaling_factor=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary left over

    vae = AutoencoderKL.from_pretrained(path).eval()
    assert vae.config.scaling_factor == 0.5 and vae.config.sample_size == SIZE
    assert_close(*ours_and_theirs(cfg, params, vae, photo_crops(3, SIZE, seed=1)))

    loaded = diffusers_io.load_params(path, cfg, ("encoder", "decoder"))
    for m in ("encoder", "decoder"):
        assert jax.tree.structure(loaded[m]) == jax.tree.structure(params[m])
        jax.tree.map(np.testing.assert_array_equal, loaded[m], params[m])
    with pytest.raises(ConfigError, match="already exists"):
        diffusers_io.save(path, cfg, params, scaling_factor=0.5)


def changed_copy(path, out, weights=True, **changes):
    """`path` copied to `out` with `changes` to its config.json (check_compatible does not read
    the weights, so an empty file stands in for them)."""
    out.mkdir()
    if weights:
        (out / diffusers_io.WEIGHTS_FILE).touch()
    theirs = json.loads((path / diffusers_io.CONFIG_FILE).read_text())
    (out / diffusers_io.CONFIG_FILE).write_text(json.dumps({**theirs, **changes}))
    return out


PLAIN_DOWN, PLAIN_UP = "'DownEncoderBlock2D'", "'UpDecoderBlock2D'"


@pytest.mark.parametrize("case,modules,expected", [
    ("latent", ("encoder",), "latent_channels=16 but model.latent_channels needs 8"),
    ("blocks", ("encoder",), "layers_per_block=1 but model.encoder.num_res_blocks needs 2"),
    ("groups", ("decoder",), "norm_num_groups=8 but model.norm_groups needs 4"),
    ("encoder_attn", ("encoder",),
     f"down_block_types=[{PLAIN_DOWN}, 'AttnDownEncoderBlock2D', {PLAIN_DOWN}, {PLAIN_DOWN}, "
     f"{PLAIN_DOWN}] but model.encoder.attn_resolutions=(8,) at image_size=32 needs "
     f"[{PLAIN_DOWN}, {PLAIN_DOWN}, 'AttnDownEncoderBlock2D', {PLAIN_DOWN}, {PLAIN_DOWN}]"),
    ("decoder_attn", ("encoder", "decoder"),
     f"up_block_types=[{PLAIN_UP}, {PLAIN_UP}, {PLAIN_UP}, 'AttnUpDecoderBlock2D', {PLAIN_UP}] "
     f"but model.conv_decoder.attn_resolutions=() at image_size=32 needs [{PLAIN_UP}, "
     f"{PLAIN_UP}, {PLAIN_UP}, {PLAIN_UP}, {PLAIN_UP}]"),
    ("use_quant_conv", ("encoder",),
     "use_quant_conv=False but our encoder's quant_conv needs True"),
    ("mid_block_add_attention", ("decoder",),
     "mid_block_add_attention=False but our mid-block attention needs True"),
    ("no_weights", ("encoder",), f"no {diffusers_io.WEIGHTS_FILE}"),
    ("no_directory", ("encoder",), "no such directory"),
])
def test_check_compatible_names_field_and_mismatch(diffusers_dir, tmp_path, case, modules,
                                                   expected):
    path, _ = diffusers_dir
    cfg = small_config()
    if case in ("use_quant_conv", "mid_block_add_attention"):
        path = changed_copy(path, tmp_path / "changed", **{case: False})
    elif case == "no_weights":
        path = changed_copy(path, tmp_path / "changed", weights=False)
    elif case == "no_directory":
        path = tmp_path / "nowhere"
    else:
        {"latent": lambda: cfg.model.update(latent_channels=8),
         "blocks": lambda: cfg.model.encoder.update(num_res_blocks=2),
         "groups": lambda: cfg.model.update(norm_groups=4),
         "encoder_attn": lambda: cfg.model.encoder.update(attn_resolutions=(8,)),
         "decoder_attn": lambda: cfg.model.conv_decoder.update(attn_resolutions=()),
         }[case]()
    with pytest.raises(ConfigError) as e:
        diffusers_io.check_compatible(path, cfg, modules, "init.encoder_from")
    message = str(e.value)
    assert message.startswith(f"init.encoder_from: {path}: ") and "\n" not in message
    assert expected in message


def test_training_starts_from_the_diffusers_weights(diffusers_dir, tmp_path):
    path, _ = diffusers_dir
    cfg = small_config()
    cfg.init.update(encoder_from=str(path), decoder_from=str(path))
    cfg.sharding.min_fsdp_size = 1  # shard what can be, so placement is checked
    validation.validate(cfg, "train", workdir=str(tmp_path), device_count=8)
    task = AutoencoderTask(cfg, "export")
    pretrained = task.pretrained_params()
    assert set(pretrained) == {"encoder", "decoder"}
    fns = build_steps(cfg, task, mesh_of(2, 4))
    shardings = jax.tree.map(lambda a: a.sharding, fns.abstract_state)
    state = jax.device_put(synthetic_state(fns.abstract_state), shardings)
    started = trainer._start_from(state, pretrained)
    for key in ("params", "ema"):
        for module in ("encoder", "decoder"):
            for got, want in zip(jax.tree.leaves(started[key][module]),
                                 jax.tree.leaves(pretrained[module])):
                np.testing.assert_array_equal(np.asarray(got), want)
        for got, was in zip(jax.tree.leaves(started[key]), jax.tree.leaves(state[key])):
            assert got.sharding == was.sharding
        assert started[key]["discriminator"] is state[key]["discriminator"]
    assert started["opt_state"] is state["opt_state"]
    cfg.model.latent_channels = 8
    with pytest.raises(ConfigError, match=r"init.encoder_from: .*latent_channels=16"):
        validation.validate(cfg, "train", workdir=str(tmp_path))
