"""Evaluation and perceptual metrics (LPIPS) used by dgae_jax."""
