"""Config variants, validation errors and the `--mode=summary` command line."""

import json
import subprocess
import sys

import pytest

from dgae_jax import config_lib
from dgae_jax.validation import validate as validate_for

from helpers import config_file


def validate(config):
    validate_for(config, "summary")


def test_variants():
    c = config_lib.autoencoder_config(16, "c=8,size=M,res=128")
    assert (c.model.latent_channels, c.model.unet.width, c.image_size) == (8, 192, 128)
    conv = config_lib.autoencoder_config(32, "decoder=conv")
    assert conv.model.decoder == "conv" and conv.loss.gan_weight == 0.5
    assert conv.model.latent_channels == 64
    demo = config_lib.autoencoder_config(16, "demo")
    assert demo.image_size == 64 and demo.model.dtype == "float32"
    validate(demo)


def test_decoder_shape_variants_apply_to_the_configured_decoder():
    """width= and blocks= shape the U-Net, or the conv decoder with decoder=conv, after the
    demo's sizes; the other decoder's section is left as it was."""
    dgae = config_lib.autoencoder_config(16, "demo,c=8,blocks=2")
    demo = config_lib.autoencoder_config(16, "demo,c=8")
    assert (dgae.model.unet.width, dgae.model.unet.num_res_blocks) == (16, 2)
    assert dgae.model.conv_decoder == demo.model.conv_decoder
    conv = config_lib.autoencoder_config(16, "demo,c=8,decoder=conv,width=16")
    assert (conv.model.conv_decoder.width, conv.model.conv_decoder.num_res_blocks) == (16, 1)
    assert conv.model.unet == demo.model.unet
    assert config_lib.autoencoder_config(16, "size=M,width=160").model.unet.width == 160
    validate(dgae)
    validate(conv)


def test_readme_demo_config():
    """configs/demo.py: 8x8x16 latents of 64 px crops, 1,800 steps; its variants pass through."""
    get_config = config_file("demo.py")
    demo = get_config()
    assert demo.name == "demo" and demo.total_steps == 1_800 and demo.eval_every == 900
    assert (demo.image_size, demo.model.spatial_factor, demo.model.latent_channels) == (64, 8, 16)
    validate(demo)
    assert get_config("decoder=conv").model.decoder == "conv"


@pytest.mark.parametrize("arg,match", [("colour=red", "unknown config variant 'colour'"),
                                       ("size=XL", "size='XL'"),
                                       ("decoder=gan", "decoder='gan'"),
                                       ("width=0", "width='0' is not a positive integer"),
                                       ("blocks=two", "blocks='two' is not a positive")])
def test_bad_variants(arg, match):
    with pytest.raises(ValueError, match=match):
        config_lib.autoencoder_config(16, arg)


def test_validation_names_the_field():
    c = config_lib.autoencoder_config(16)
    c.image_size = 200
    with pytest.raises(ValueError, match="image_size=200 is not divisible by the spatial factor"):
        validate(c)
    c = config_lib.autoencoder_config(16)
    c.diffusion.sampler = "ddim"
    with pytest.raises(ValueError, match="diffusion.sampler='ddim'"):
        validate(c)
    c = config_lib.autoencoder_config(16, "res=96")
    with pytest.raises(ValueError, match="model.unet.channel_mult"):
        validate(c)


@pytest.mark.slow  # an end-to-end CLI run that traces the 256 px train step
def test_summary_cli_prints_json_last():
    out = subprocess.run(
        [sys.executable, "-m", "dgae_jax.main", "--config=configs/f16.py", "--mode=summary",
         "--config.batch_size=8"], capture_output=True, text=True, check=True, timeout=600)
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["latent_shape"] == [16, 16, 16]
    assert abs(record["decoder_params"] / 122e6 - 1) < 0.03
    assert 25e6 < record["encoder_params"] < 36e6
    assert record["train_step_flops"] > 1e12 * 8  # > 1 TFLOP per 256 px image
    assert "encoder/mid_attn" in out.stdout  # the per-module table
