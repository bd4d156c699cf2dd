"""Builders shared by the test modules: tiny configs, synthetic runs, crops of real photos and
image files. A test module takes them from here, not from another test module or conftest, so
that each test module runs alone and none runs another's set-up."""

import importlib.util
import pathlib

import jax
import ml_collections
import numpy as np
from PIL import Image
from skimage.transform import resize

from dgae_jax import config_lib, parallel
from dgae_jax.data import sources

# ---------------------------------------------------------------------------------- configs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def config_file(name: str):
    """The `get_config` of configs/<name>, the module --config=configs/<name> loads."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"),
                                                  ROOT / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config


def override(cfg, fields: dict):
    """Sets dotted config fields ({'model.unet.width': 8}) in place; returns `cfg`."""
    for key, value in fields.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def make_tiny_config(factor=8, decoder="diffusion", *, size=32, c=4, gan=0.0):
    """An autoencoder config of `factor` with every network a few channels wide (16-32 px), so
    that a test compiles it in seconds."""
    levels = {8: 4, 16: 5, 32: 6}[factor]
    cfg = config_lib.autoencoder_config(factor, f"decoder={decoder},c={c}")
    cfg.image_size = size
    cfg.batch_size = 4
    cfg.model.dtype = "float32"
    cfg.model.norm_groups = 4
    cfg.model.encoder.update(width=8, channel_mult=(1,) + (2,) * (levels - 1), num_res_blocks=1,
                             attn_resolutions=(8,))
    cfg.model.unet.update(width=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                          head_channels=8)
    cfg.model.conv_decoder.update(width=8, channel_mult=(1,) + (2,) * (levels - 1),
                                  num_res_blocks=1, attn_resolutions=(8,))
    cfg.model.discriminator.update(width=8, num_layers=2)
    cfg.diffusion.sample_steps = 4
    cfg.loss.lpips_net = "alexnet"
    cfg.loss.gan_weight = gan
    cfg.loss.gan_start = 0
    cfg.data.eval_subset = ""
    cfg.eval.rfid = False  # tests that need the FID Inception use conftest's fixture
    return cfg


# A small diffusers AutoencoderKL and our config of its architecture: the demo conv baseline (5
# levels, widths 32..128) at 32 px, with attention at one level (feature size 16: level 1 of 5,
# so the decoder's is up_blocks.3 and a reversed level order would show).
DIFFUSERS_SIZE, DIFFUSERS_ATTN = 32, 16


def diffusers_config():
    cfg = config_lib.autoencoder_config(16, "demo,decoder=conv")
    cfg.image_size = DIFFUSERS_SIZE
    cfg.model.dtype = "float32"
    cfg.model.encoder.attn_resolutions = (DIFFUSERS_ATTN,)
    cfg.model.conv_decoder.attn_resolutions = (DIFFUSERS_ATTN,)
    return cfg


def random_diffusers_vae(cfg):
    """A diffusers AutoencoderKL of `cfg`'s architecture with every parameter perturbed, so that
    norm scales, biases and each conv/linear weight differ from their defaults (needs torch and
    diffusers, the test extra's)."""
    import torch
    from diffusers import AutoencoderKL

    enc = cfg.model.encoder
    attn = [cfg.image_size // 2**i in enc.attn_resolutions for i in range(len(enc.channel_mult))]
    vae = AutoencoderKL(
        block_out_channels=[enc.width * m for m in enc.channel_mult],
        down_block_types=["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        up_block_types=["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in attn[::-1]],
        layers_per_block=enc.num_res_blocks, latent_channels=cfg.model.latent_channels,
        norm_num_groups=cfg.model.norm_groups, sample_size=cfg.image_size)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in vae.parameters():
            if p.ndim > 1:
                p.mul_(1 + 0.1 * torch.randn_like(p))
            else:
                p.add_(0.1 * torch.randn_like(p))
    return vae.eval()


# configs/f16.py:demo made tiny; scalars only, so the CLI can pass them as --config.K=V.
OVERRIDES = {"image_size": 32, "model.encoder.width": 8, "model.unet.width": 8,
             "model.unet.head_channels": 8, "model.conv_decoder.width": 8, "eval.rfid": False,
             "cache.batch_size": 8, "cache.examples_per_shard": 4,
             "cache.crops_per_image": 1}


def demo_config(**extra):
    """configs/f16.py:demo with OVERRIDES (32 px, 2x2x16 latents) and `extra` applied."""
    return override(config_lib.autoencoder_config(16, "demo"), {**OVERRIDES, **extra})


def cli_args(**extra):
    """The --config flags that give the CLI the config demo_config(**extra) gives in-process."""
    return ["--config=configs/f16.py:demo"] + [f"--config.{k}={v}"
                                                for k, v in {**OVERRIDES, **extra}.items()]


def data_config(name="embedded", *, size=32, batch=4, seed=0, **data):
    """A config with only the fields the data pipeline reads."""
    cfg = ml_collections.ConfigDict(dict(image_size=size, seed=seed, batch_size=batch,
                                         data=config_lib.default_data_config()))
    cfg.data.name = name
    cfg.data.update(data)
    return cfg


def folder_config(root, **kw):
    """data_config of an image folder `root` with splits `train` and `val`."""
    return data_config("folder", dir=str(root), train_split="train", eval_split="val", **kw)


# ---------------------------------------------------------------------------------- runs


def synthetic_weights(abstract):
    """He-style random weights built in numpy in the shapes of `abstract` (norm scales 1,
    integers 0). Compiling the real init of a whole autoencoder takes about a minute on 2 cores;
    tests of what reads a checkpoint, or of a train step, only need some weights."""
    rng = np.random.default_rng(0)

    def leaf(path, a):
        if not jax.numpy.issubdtype(a.dtype, jax.numpy.floating):
            return np.zeros(a.shape, a.dtype)
        if parallel.path_name(path).endswith("scale"):
            return np.ones(a.shape, a.dtype)
        fan_in = int(np.prod(a.shape[:-1])) or 1
        return (rng.standard_normal(a.shape) / np.sqrt(fan_in)).astype(a.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def synthetic_state(abstract):
    """A train state of `synthetic_weights`, EMA != params, in the shapes of `abstract`."""
    state = synthetic_weights(abstract)
    state["ema"] = jax.tree.map(lambda p: 0.9 * p + 0.02, state["params"])
    return state


def save_run(workdir, cfg, step, *, task=None, state=None) -> dict:
    """Makes `workdir` a run of `cfg` with one checkpoint, of `state` at `step`, and returns the
    state. By default the state is synthetic_state of an autoencoder of `cfg` (numpy: saved in a
    second, restored sharded) and `task` the autoencoder task, whose data iterator is saved
    with it."""
    # Local imports: the task and the checkpointer bring in TensorFlow (seconds), which the
    # tests that only need configs or photos do without.
    from dgae_jax import checkpoint
    from dgae_jax.steps import build_steps
    from dgae_jax.tasks.ae import AutoencoderTask

    task = task or AutoencoderTask(cfg, "export")
    if state is None:
        abstract = build_steps(cfg, task, parallel.make_mesh(cfg.mesh)).abstract_state
        state = synthetic_state(abstract)
    ckpt = checkpoint.Checkpoints(str(workdir), cfg)
    ckpt.save(step, state, iter(task.train_data(0, 1)), force=True)
    ckpt.close()
    return state


# ---------------------------------------------------------------------------------- images

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # colour photos bundled with scikit-image


def photo_crops(n: int, size, *, seed=None, names=PHOTOS, dtype=np.float32) -> np.ndarray:
    """n square crops of real photographs, cycling through `names` (sources.load_photo names),
    resized with antialiasing to `size` (an int or (height, width)).

    Without `seed` each crop is the centred square of a photo's shorter side; with it, a random
    square half as wide, so that crops of the same photo differ. float32 in [-1, 1] (the models'
    input range) or, with dtype=np.uint8, pixel values.
    """
    rng = None if seed is None else np.random.default_rng(seed)
    shape = (size, size) if isinstance(size, int) else tuple(size)
    out = []
    for i in range(n):
        photo = sources.load_photo(names[i % len(names)])
        h, w = photo.shape[:2]
        if rng is None:
            side = min(h, w)
            y, x = (h - side) // 2, (w - side) // 2
        else:
            side = min(h, w) // 2
            y, x = rng.integers(0, h - side), rng.integers(0, w - side)
        out.append(resize(photo[y:y + side, x:x + side], shape, anti_aliasing=True))
    out = np.stack(out)
    if dtype == np.uint8:
        return np.round(out * 255).astype(np.uint8)
    return (out * 2.0 - 1.0).astype(np.float32)


def write_image(path, h, w, seed):
    """An h x w file of random RGB pixels at `path` (its format from the suffix)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def take(ds, n, it=None):
    """The next n elements of `it`, by default a new iterator of `ds`."""
    it = iter(ds) if it is None else it
    return [next(it) for _ in range(n)]
