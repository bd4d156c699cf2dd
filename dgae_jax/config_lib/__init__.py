"""Builds the configs the files in `configs/` expose, one module per task.

A config file calls a builder with `arg`, the text after the colon in
`--config=configs/f16.py:c=8,size=M`: comma-separated variants, each `key=value` or a bare flag.
common.py holds what every task's config shares.
"""

from dgae_jax.config_lib.autoencoder import autoencoder_config
from dgae_jax.config_lib.common import default_data_config
from dgae_jax.config_lib.distill import distill_config
from dgae_jax.config_lib.ldm import ldm_config

__all__ = ["autoencoder_config", "default_data_config", "distill_config", "ldm_config"]
