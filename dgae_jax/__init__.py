"""dgae_jax: the Diffusion-Guided Autoencoder (DGAE, arXiv 2506.09644) in JAX/Flax."""
