"""Flax NNX modules only: no losses, no training logic, no mesh logic."""
