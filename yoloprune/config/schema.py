"""The experiment config's schema: every section, typed, frozen and validated (pydantic).

Objectives, constraints and the reward are in :mod:`.objectives`; reading a YAML file is :mod:`.loading`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, field_validator, model_validator

from yoloprune.config.objectives import Constraint, Objective, RewardConfig, latency_target_of
from yoloprune.errors import did_you_mean
from yoloprune.registry import LATENCY_BACKENDS, NNI_TUNERS, PRUNERS, SEARCH_METHODS
from yoloprune.spaces.space import SearchSpace

BUILTIN_PREFIX = "builtin:"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSource(_Section):
    """A model YAML, optionally with weights (a ``.pt``) to load into it."""

    yaml: str
    weights: str | None = None


#: The long fine-tune's default recipe over the proxy's (``finetune.long``; measured in the README's "Long
#: fine-tune recipe": ``experiments/proxy_recovery.py --setup demo --epochs 10``).
LONG_FINETUNE: dict[str, Any] = {"lr0": 0.005, "warmup_epochs": 1, "cos_lr": True}


class FinetuneConfig(_Section):
    """The proxy fine-tune of every candidate.

    Attributes:
        epochs: fine-tune epochs per trial (0: BN re-estimation only).
        batch: batch size.
        workers: dataloader workers.
        bn_batches: batches for BN-statistics re-estimation before the fine-tune (0: off).
        skip_infeasible: when a constraint on cost (FLOPs, params, size) is already violated after pruning,
            record the trial as infeasible with its BN-re-estimated mAP instead of fine-tuning it.
        distill: knowledge distillation from the unpruned base during the fine-tune: the weight of the
            distillation loss (Ultralytics' ``dis``; 6.0 is its default). 0: off.
        rounds: progressive pruning: reach the candidate's ratios in this many prune/fine-tune rounds
            (ratios x 1/n, 2/n ... 1), sharing ``epochs`` between them. 1: prune once, then fine-tune.
        overrides: any Ultralytics training argument (``lr0``, ``optimizer``, ``mosaic``...).
        long: the long fine-tune's recipe (``yoloprune export``, and ``calibrate``/``fidelity`` that predict
            it), Ultralytics arguments applied over ``overrides``. By default a one-epoch warm-up to lr0 0.005,
            cosine decay, and mosaic augmentation until the last quarter of the epochs (``close_mosaic``, unless
            set here): on a converged base at -50% FLOPs this recovered 82% of the base's mAP50-95 in 10 epochs
            and 101% in 30, where the proxy's recipe (lr0 0.001, no warm-up, mosaic off) recovered 69% and 88%
            (README, "Long fine-tune recipe"). A short proxy is damaged by such a rate; a long fine-tune
            recovers from it. ``{}``: the proxy's recipe.
    """

    epochs: int = Field(3, ge=0)
    batch: int = Field(16, ge=1)
    workers: int = Field(0, ge=0)
    bn_batches: int = Field(10, ge=0)
    skip_infeasible: bool = True
    distill: float = Field(0.0, ge=0)
    rounds: int = Field(1, ge=1)
    overrides: dict[str, Any] = Field(default_factory=dict)
    long: dict[str, Any] = Field(default_factory=lambda: dict(LONG_FINETUNE))

    def for_long(self, epochs: int) -> FinetuneConfig:
        """This fine-tune as the long one (the export's) of ``epochs``: ``long`` applied over ``overrides``, mosaic
        closed for the last quarter unless ``long`` says otherwise, every candidate fine-tuned."""
        recipe = {**self.overrides, "close_mosaic": max(1, epochs // 4), **self.long}
        return self.model_copy(update={"epochs": epochs, "skip_infeasible": False, "overrides": recipe})

    @model_validator(mode="after")
    def _distill_in_one_place(self) -> FinetuneConfig:
        for section in ("overrides", "long"):
            clash = sorted({"distill_model", "dis", "epochs"} & getattr(self, section).keys())
            if clash:
                raise ValueError(
                    f"finetune.{section} sets {', '.join(clash)}: use finetune.distill (the weight; the teacher is "
                    "the experiment's base model) and finetune.epochs or `--epochs`"
                )
        if self.distill > 0 and self.epochs == 0:
            raise ValueError("finetune.distill needs finetune.epochs >= 1 (distillation happens during the fine-tune)")
        if self.rounds > max(self.epochs, 1):
            raise ValueError(
                f"finetune.rounds ({self.rounds}) needs finetune.epochs >= rounds (each pruning round fine-tunes at "
                f"least one epoch); got epochs {self.epochs}"
            )
        return self


class ScreenConfig(_Section):
    """Cheap screening before the proxy fine-tunes (EagleEye's adaptive-BN evaluation).

    ``candidates`` allocations, drawn at random and put on the cost target, are each pruned, their BN
    statistics re-estimated and validated on ``images`` held-out training images (seconds each; images BN
    re-estimation does not read, so screening never selects on the validation set); only the best ``keep``
    at each target value get the proxy fine-tune, as the search's first trials.
    """

    candidates: int = Field(200, ge=2)
    keep: int = Field(8, ge=1)
    images: int = Field(64, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _keep_fewer(self) -> ScreenConfig:
        if self.keep > self.candidates:
            raise ValueError(
                f"keep ({self.keep}) must not exceed candidates ({self.candidates}): screening keeps the best of them"
            )
        return self


class CostTarget(_Section):
    """Where every candidate's cost must land: ``{metric: flops_reduction, value: 0.5, tolerance: 0.01}``.

    Attributes:
        metric: ``flops_reduction``, ``params_reduction`` or ``latency_reduction.<target>`` (a configured
            latency target).
        value: the reduction to reach, in (0, 1), or a list of them for a front at several budgets.
        tolerance: how far (absolute) a candidate's achieved reduction may lie from the value.
        max_measurements: for a latency metric, real measurements per candidate to confirm (and correct)
            the latency model's projection.
    """

    metric: str
    value: float | list[float]
    tolerance: float = Field(0.01, gt=0, lt=0.5)
    max_measurements: int = Field(3, ge=1)

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        if v in ("flops_reduction", "params_reduction") or (v.startswith("latency_reduction.") and v.split(".", 1)[1]):
            return v
        options = ["flops_reduction", "params_reduction", "latency_reduction.<target>"]
        raise ValueError(f"unknown cost_target metric '{v}'.{did_you_mean(v, options)} Known: {', '.join(options)}")

    @field_validator("value")
    @classmethod
    def _fractions(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if not values or any(not 0.0 < x < 1.0 for x in values):
            raise ValueError(
                f"cost_target value(s) {values} must lie in (0, 1): a reduction, e.g. 0.5 for half the FLOPs"
            )
        if len(set(values)) != len(values):
            raise ValueError(f"cost_target values repeat: {values}")
        return v

    @property
    def values(self) -> list[float]:
        return list(self.value) if isinstance(self.value, list) else [self.value]

    @property
    def latency_target(self) -> str | None:
        return latency_target_of(self.metric)


class NniConfig(_Section):
    """How ``yoloprune nni`` runs the search as an NNI experiment.

    Attributes:
        tuner: the tuner NNI gets: its ``tpe``, ``evolution`` or ``random`` (they maximise the scalar
            reward), or ``optuna``: this engine's sampler (``engine.sampler``) on the objectives and
            constraints, wrapped as an NNI tuner (:data:`yoloprune.registry.NNI_TUNERS`).
        trial_concurrency: NNI trials run at once on this machine.
    """

    tuner: str = "tpe"
    trial_concurrency: int = Field(1, ge=1)

    @field_validator("tuner")
    @classmethod
    def _known_tuner(cls, v: str) -> str:
        return NNI_TUNERS.check(v)


class WorkersConfig(_Section):
    """How workers sharing a study find each other's dead trials.

    Attributes:
        heartbeat_s: how often a running trial tells the database it is alive (seconds).
        grace_s: a running trial silent for this long belongs to a dead worker: it is failed and retried.
        max_retries: how many times an interrupted trial is queued again.
    """

    heartbeat_s: int = Field(10, ge=1)
    grace_s: int = Field(60, ge=2)
    max_retries: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _grace_after_heartbeat(self) -> WorkersConfig:
        if self.grace_s <= self.heartbeat_s:
            raise ValueError(f"grace_s ({self.grace_s}) must exceed heartbeat_s ({self.heartbeat_s})")
        return self


#: Keys of ``engine`` before it had ``nni`` and ``workers`` sections: still read, into their sections.
_MOVED = {
    "nni_tuner": ("nni", "tuner"),
    "trial_concurrency": ("nni", "trial_concurrency"),
    "heartbeat_s": ("workers", "heartbeat_s"),
    "grace_s": ("workers", "grace_s"),
    "max_retries": ("workers", "max_retries"),
}


class EngineConfig(_Section):
    """Which search engine samples candidates, and how.

    Attributes:
        name: ``optuna`` (embedded; NNI comes as a second engine).
        sampler: the search method: an Optuna sampler over allocations (``tpe``, ``cmaes``, ``nsga2``,
            ``random``, ``grid``), ``uniform`` (one ratio on every searched stage, at each cost target) or
            ``sensitivity`` (per-stage sensitivity curves after BN re-estimation, then one global
            trade-off bisected to each cost target, as ModelOpt's FastNAS) or ``tp_global``
            (Torch-Pruning's global pruning at each cost target, a reference). The last three need a
            ``cost_target``. See :mod:`yoloprune.search.methods`; the names are
            :data:`yoloprune.registry.SEARCH_METHODS`.
        screen: cheap screening of many candidates before the proxy fine-tunes (needs a ``cost_target``).
        seed: sampler seed (None: random).
        startup_trials: trials sampled at random before TPE models the space, and before the pruner acts.
        pruner: stop hopeless trials on their per-epoch mAP: ``none``, ``median``, ``successive_halving``
            or ``hyperband`` (:data:`yoloprune.registry.PRUNERS`).
        nni: the NNI engine (:class:`NniConfig`).
        workers: heartbeats and retries of workers sharing a study (:class:`WorkersConfig`).

    The flat keys of earlier versions (``nni_tuner``, ``trial_concurrency``, ``heartbeat_s``, ``grace_s``,
    ``max_retries``) are still read, into their sections.
    """

    name: Literal["optuna"] = "optuna"
    sampler: str = "tpe"
    screen: ScreenConfig | None = None
    seed: int | None = 0
    startup_trials: int = Field(4, ge=0)
    pruner: str = "none"
    nni: NniConfig = Field(default_factory=NniConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)

    @model_validator(mode="before")
    @classmethod
    def _sections_of_flat_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not _MOVED.keys() & data.keys():
            return data
        out = {k: v for k, v in data.items() if k not in _MOVED}
        for key, (section, field) in _MOVED.items():
            if key in data:
                current = out.get(section)
                out[section] = {**(current if isinstance(current, dict) else {}), field: data[key]}
        return out

    @field_validator("sampler")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return SEARCH_METHODS.check(v)

    @field_validator("pruner")
    @classmethod
    def _known_pruner(cls, v: str) -> str:
        return PRUNERS.check(v)


class BudgetConfig(_Section):
    """When the search stops: after ``trials`` finished trials (complete or pruned) or ``timeout_s``."""

    trials: int | None = Field(20, ge=1)
    timeout_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _some_budget(self) -> BudgetConfig:
        if self.trials is None and self.timeout_s is None:
            raise ValueError("give budget.trials, budget.timeout_s or both")
        return self


class _Target(_Section):
    """What every latency target has: its name, the input, the timing discipline and what a failure does.

    Attributes:
        name: used in metric names: ``latency_ms.<name>``, ``latency_ratio.<name>``...
        device: ``cpu`` or ``cuda`` / ``cuda:N`` (for a remote target: the device's own).
        precision: ``fp32``, ``fp16`` (on CUDA) or ``int8`` (``onnxruntime``, ``tensorrt`` and ``remote``: a
            Q/DQ ONNX quantized with the runtime's recipe, see :mod:`yoloprune.convert.quantize`).
        batch: batch size.
        imgsz: input size (default: the experiment's).
        warmup, min_runs, max_runs, cv_target: the timing discipline (repeat until the coefficient of
            variation is below ``cv_target``, within the run bounds).
        on_error: when a measurement fails (agent unreachable, runtime error): ``fail_trial`` records the
            trial as failed and the search goes on; ``stop`` also stops the search.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    device: str = "cpu"
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    batch: int = Field(1, ge=1)
    imgsz: int | None = Field(None, ge=32)
    warmup: int = Field(10, ge=0)
    min_runs: int = Field(20, ge=2)
    max_runs: int = Field(300, ge=2)
    cv_target: float = Field(0.05, gt=0)
    on_error: Literal["fail_trial", "stop"] = "fail_trial"


class LocalTarget(_Target):
    """A runtime on this machine whose measured latency the search can optimise or constrain.

    Attributes:
        backend: a registered latency backend (:data:`yoloprune.registry.LATENCY_BACKENDS`): ``onnxruntime``,
            ``torch`` or ``tensorrt``.
        threads: CPU intra-op threads (default: the runtime's).
        cuda_graph: replay a captured CUDA graph (torch on CUDA).
    """

    backend: str = "onnxruntime"
    threads: int | None = Field(None, ge=1)
    cuda_graph: bool = True

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v == "remote":
            raise ValueError("backend 'remote' measures on a device's `yoloprune agent`: give its url")
        return LATENCY_BACKENDS.check(v)

    @model_validator(mode="after")
    def _precision_runs_here(self) -> LocalTarget:
        if self.precision == "int8" and self.backend == "torch":
            raise ValueError(
                f"latency target '{self.name}': the torch backend has no int8; time INT8 with backend onnxruntime "
                "(CPU) or tensorrt (GPU)"
            )
        if self.precision == "fp16" and self.backend != "tensorrt" and not self.device.startswith("cuda"):
            raise ValueError(
                f"latency target '{self.name}': fp16 is timed on CUDA only; set device: cuda, or precision fp32/int8"
            )
        return self


class RemoteTarget(_Target):
    """A ``yoloprune agent`` on the target device, measuring there (``backend: remote``).

    Attributes:
        url: the agent (``http://host:8765``).
        remote_backend: the runtime the agent uses: ``onnxruntime`` or ``tensorrt``.
        token_env: the environment variable holding the agent's token (read once at start-up).
        timeout_s: how long one remote measurement may take (upload, queueing, engine build, timing).
        cafile: for an ``https://`` agent, the CA certificate (PEM) that signed its certificate (a self-signed
            certificate is its own CA); default: the system's CAs.
    """

    backend: Literal["remote"] = "remote"
    url: str = Field(min_length=1)
    remote_backend: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    token_env: str = "YOLOPRUNE_AGENT_TOKEN"
    timeout_s: float = Field(900.0, gt=0)
    cafile: str | None = None


def _target_kind(value: Any) -> str:
    backend = value.get("backend") if isinstance(value, dict) else getattr(value, "backend", None)
    return "remote" if backend == "remote" else "local"


#: A latency target: measured on this machine, or on a device through its agent (tagged by ``backend``).
LatencyTarget = Annotated[
    Annotated[LocalTarget, Tag("local")] | Annotated[RemoteTarget, Tag("remote")], Discriminator(_target_kind)
]


def latency_target(**fields: Any) -> LocalTarget | RemoteTarget:
    """A latency target from its fields (``backend: remote`` gives a :class:`RemoteTarget`)."""
    return TypeAdapter(LatencyTarget).validate_python(fields)


def _default_objectives() -> list[Objective]:
    return [Objective(metric="map50_95", direction="maximize"), Objective(metric="gflops", direction="minimize")]


def _default_constraints() -> list[Constraint]:
    return [Constraint(metric="map50_95_drop", max=0.02), Constraint(metric="flops_reduction", min=0.5)]


class ExperimentConfig(_Section):
    """A whole search experiment.

    Attributes:
        name: the experiment's (and its Optuna study's) name; re-running the same name resumes it.
        model: a trained ``.pt``, a model YAML with weights, or ``builtin:demo-base``.
        data: an Ultralytics dataset YAML, or ``builtin:synthetic``.
        imgsz: image size for training, validation and FLOPs.
        device: ``cpu``, ``0``... (default: the first GPU if any, else the CPU).
        space: the search space.
        finetune: the proxy fine-tune.
        objectives: what the search optimises (default: maximise mAP50-95, and minimise the first latency
            target's latency, or GFLOPs when no target is configured; with a ``cost_target`` of one value,
            mAP50-95 alone, since every candidate has that cost).
        constraints: hard limits (default: relative mAP50-95 drop <= 2%, FLOPs reduction >= 50%).
        targets: latency targets measured for every candidate (right after pruning, before fine-tuning).
        cost_target: put every candidate on this cost (FLOPs, params or latency reduction) before it is
            evaluated, so that the search compares allocations at equal cost; uniform pruning at the target
            is always candidate 0.
        reward: the scalar reward that ranks trials.
        engine: sampler, seed and pruner.
        budget: trial count and/or time budget.
        storage: a SQLAlchemy URL (default: ``sqlite:///<output>/study.db``).
        output: output folder (default ``outputs/<name>`` under the working directory).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128)
    model: str | ModelSource
    data: str
    imgsz: int = Field(640, ge=32)
    device: str | None = None
    space: SearchSpace
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    objectives: list[Objective] = Field(default_factory=_default_objectives, min_length=1)
    constraints: list[Constraint] = Field(default_factory=_default_constraints)
    targets: list[LatencyTarget] = Field(default_factory=list)
    cost_target: CostTarget | None = None
    reward: RewardConfig = Field(default_factory=RewardConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    storage: str | None = None
    output: str | None = None

    @field_validator("imgsz")
    @classmethod
    def _stride(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"imgsz {v} must be a multiple of 32 (the detectors' largest stride)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _latency_objective_by_default(cls, data: Any) -> Any:
        target = data.get("cost_target") if isinstance(data, dict) else None
        if isinstance(target, dict) and "objectives" not in data and not isinstance(target.get("value"), list):
            # Every candidate sits on one cost: accuracy is the only thing left to optimise.
            return {**data, "objectives": [{"metric": "map50_95", "direction": "maximize"}]}
        if isinstance(data, dict) and "objectives" not in data and data.get("targets"):
            first = data["targets"][0].get("name") if isinstance(data["targets"][0], dict) else None
            if first:
                data = {**data, "objectives": [{"metric": "map50_95", "direction": "maximize"},
                                               {"metric": f"latency_ms.{first}", "direction": "minimize"}]}  # fmt: skip
        return data

    @model_validator(mode="after")
    def _objectives_distinct(self) -> ExperimentConfig:
        names = [o.metric for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives repeat a metric: {names}")
        targets = [t.name for t in self.targets]
        if len(set(targets)) != len(targets):
            raise ValueError(f"latency target names repeat: {targets}")
        targeted = [self.cost_target.metric] if self.cost_target else []
        for metric in [*names, *(c.metric for c in self.constraints), self.reward.cost, *targeted]:
            target = latency_target_of(metric)
            if target is not None and target not in targets:
                raise ValueError(
                    f"metric '{metric}' names latency target '{target}', which is not configured "
                    f"(targets: {', '.join(targets) or 'none'}); add it under targets:"
                )
        if self.engine.sampler == "cmaes" and len(self.objectives) > 1:
            raise ValueError(
                "engine.sampler 'cmaes' optimises one objective; give a single cost_target value (its default "
                "objective is map50_95 alone) or objectives: [{metric: map50_95, direction: maximize}]"
            )
        if self.cost_target is None:
            needs = [x for x in (self.engine.sampler,) if x in ("uniform", "sensitivity", "tp_global")]
            if needs or self.engine.screen is not None:
                what = f"engine.sampler '{needs[0]}'" if needs else "engine.screen"
                raise ValueError(
                    f"{what} needs a cost_target (candidates are compared at equal cost), e.g. "
                    "cost_target: {metric: flops_reduction, value: 0.5}"
                )
        return self

    @property
    def output_dir(self) -> Path:
        return Path(self.output or Path("outputs") / self.name).resolve()

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.output_dir / 'study.db'}"
