"""Pruning core: named stages, structured per-stage pruning, cost metrics."""

from yoloprune.pruning.costs import Costs, count_flops, count_params, flops_by_module, measure_costs
from yoloprune.pruning.prune import kept_width, prune, prune_candidate, prune_like
from yoloprune.pruning.stages import Stage, find_stages, prunable_stage_names

__all__ = [
    "Costs",
    "Stage",
    "count_flops",
    "count_params",
    "find_stages",
    "flops_by_module",
    "kept_width",
    "measure_costs",
    "prunable_stage_names",
    "prune",
    "prune_candidate",
    "prune_like",
]
