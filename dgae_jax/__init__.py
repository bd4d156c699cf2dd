"""dgae_jax: the Diffusion-Guided Autoencoder (DGAE, arXiv 2506.09644) in JAX/Flax."""

import importlib.metadata as _metadata
import os as _os

# jaxlib 0.10's XLA:CPU sends convolutions through YNNPACK, which trains our U-Net slower than
# XLA's own (Eigen) convolutions (benchmarks/unet_vs_diffusers.py times a step either way).
# Only XLA:CPU reads the flag. Set it yourself in XLA_FLAGS
# to choose otherwise; other jaxlib versions are left alone, as the flag is experimental and an
# unknown flag stops XLA.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
if (_metadata.version("jaxlib").startswith("0.10.")
        and _YNN_FLAG not in _os.environ.get("XLA_FLAGS", "")):
    _os.environ["XLA_FLAGS"] = f"{_os.environ.get('XLA_FLAGS', '')} {_YNN_FLAG}=".strip()
