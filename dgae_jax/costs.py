"""What XLA says a computation costs, for the summary, the benchmark and the train step's
start-up report."""

from __future__ import annotations

import jax

GIB = 2**30


def hlo_flops(lowered: jax.stages.Lowered) -> float:
    """FLOPs of a lowered step from XLA's cost analysis of the backend-independent HLO (a GPU's
    compiled module hides convolutions in cuDNN calls its own analysis does not count)."""
    cost = lowered.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
