"""The experiment config in one place: the schema (:mod:`.schema`), the objectives, constraints and reward
(:mod:`.objectives`) and reading YAML (:mod:`.loading`). It loads no ML library: results, reports and the
database commands start without torch."""

from yoloprune.config.loading import config_from_dict, load_config, parse_assignments
from yoloprune.config.objectives import Constraint, Objective, RewardConfig
from yoloprune.config.schema import (
    BUILTIN_PREFIX,
    LONG_FINETUNE,
    BudgetConfig,
    CostTarget,
    EngineConfig,
    ExperimentConfig,
    FinetuneConfig,
    LatencyTarget,
    LocalTarget,
    ModelSource,
    NniConfig,
    RemoteTarget,
    ScreenConfig,
    WorkersConfig,
    latency_target,
)

__all__ = [
    "BUILTIN_PREFIX",
    "LONG_FINETUNE",
    "BudgetConfig",
    "Constraint",
    "CostTarget",
    "EngineConfig",
    "ExperimentConfig",
    "FinetuneConfig",
    "LatencyTarget",
    "LocalTarget",
    "ModelSource",
    "NniConfig",
    "Objective",
    "RemoteTarget",
    "RewardConfig",
    "ScreenConfig",
    "WorkersConfig",
    "config_from_dict",
    "latency_target",
    "load_config",
    "parse_assignments",
]
