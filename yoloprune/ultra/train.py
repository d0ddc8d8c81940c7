"""Fine-tune a pruned model with the Ultralytics trainer without it rebuilding the unpruned network.

``YOLO(pruned).train()`` silently rebuilds the full model from the stored YAML and transfers only the
weights whose shapes still match (../shared/FINDINGS.md). :class:`PrunedDetectionTrainer` hands the
trainer the pruned module itself, and :func:`finetune` checks the parameter count did not change.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from yoloprune.data.check import DatasetInfo, inspect_dataset
from yoloprune.errors import EvaluatorError, InternalError
from yoloprune.log import get_logger
from yoloprune.offline import configure_offline
from yoloprune.ultra.val import ValResult, check_classes, validator_result

configure_offline()

from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402
from ultralytics.nn.distill_model import DistillationModel  # noqa: E402
from ultralytics.nn.tasks import load_checkpoint  # noqa: E402

LOGGER = get_logger(__name__)

#: Defaults for a short fine-tune of an already trained, pruned network (any can be overridden).
FINETUNE_DEFAULTS: dict[str, Any] = {
    # On a converged base (100 epochs, mAP50-95 0.354), uniform pruning to -25% FLOPs, BN re-estimated, 2
    # epochs: SGD lr0 0.01 with Ultralytics' gradient accumulation recovered 66% of the base's mAP50-95,
    # lr0 0.001 with one optimizer step per batch 75% (81% after 4 epochs); at -50% FLOPs 20% against 33%
    # (README, "Proxy recovery"; experiments/proxy_recovery.py). Higher rates first damage the pruned net
    # (lr0 0.005: 0.036 after one epoch, from 0.192 before it). No warm-up: Ultralytics' lasts at least 100
    # optimizer steps, i.e. several epochs of a small set, and starts biases at lr 0.1.
    "optimizer": "SGD",
    "lr0": 0.001,
    "warmup_epochs": 0,
    "plots": False,
    "val": True,
    "verbose": False,
    "exist_ok": True,
    "deterministic": True,
    "seed": 0,
}

EpochCallback = Callable[[int, dict[str, float]], None]


class PrunedDetectionTrainer(DetectionTrainer):
    """A DetectionTrainer that trains the module it is given, never one rebuilt from a YAML."""

    def __init__(self, model: nn.Module, overrides: dict[str, Any]) -> None:
        self._pruned = model
        super().__init__(overrides=overrides)
        setattr(self, "model", model)  # noqa: B010  (BaseTrainer types it as a path)

    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
        return self._pruned

    def setup_model(self) -> dict[str, Any] | None:
        """On resume, load the interrupted run's weights into the pruned module; its checkpoint restores the rest.

        A distilled run's checkpoint holds Ultralytics' ``DistillationModel`` (student and feature projector,
        no teacher): the student's weights go into the pruned module and the wrapper is rebuilt around it.
        """
        if not self.resume:
            return None
        weights, ckpt = load_checkpoint(str(self.args.resume))
        student = getattr(weights, "student_model", weights)
        state, mine = student.float().state_dict(), self._pruned.state_dict()
        if state.keys() != mine.keys() or any(state[k].shape != mine[k].shape for k in mine):
            raise EvaluatorError(
                f"cannot resume from {self.args.resume}: it holds a different architecture. "
                "Remove that run folder to start the fine-tune again."
            )
        self._pruned.load_state_dict(state)
        model: nn.Module = self._pruned
        if isinstance(weights, DistillationModel) and self.args.distill_model:
            setattr(self._pruned, "args", self.args)  # noqa: B010  (the wrapper reads imgsz and dis from it)
            model = DistillationModel(teacher_model=self.args.distill_model, student_model=self._pruned)
            model.projector.load_state_dict(weights.projector.float().state_dict())
        setattr(self, "model", model)  # noqa: B010
        return dict(ckpt)


@dataclass
class FinetuneResult:
    """What a fine-tune produced.

    Attributes:
        model: the best-fitness weights (stock Ultralytics modules, float32, eval mode).
        epochs: per-epoch validation metrics, ``{"map50": .., "map50_95": ..}``.
        val: the trainer's final validation of ``model``, with per-class AP.
        val_seconds: time spent validating inside the fine-tune (per epoch and final).
        best: path of the trainer's ``best.pt`` (None once the run folder is removed).
        resumed_from: the epoch (0-based) an interrupted run resumed at; ``epochs`` then lists only
            the epochs run by this call.
    """

    model: nn.Module
    epochs: list[dict[str, float]] = field(default_factory=list)
    val: ValResult | None = None
    val_seconds: float = 0.0
    best: Path | None = None
    resumed_from: int | None = None


def finetune(
    model: nn.Module,
    data: str | Path | DatasetInfo,
    *,
    epochs: int,
    imgsz: int,
    project: str | Path,
    name: str = "finetune",
    batch: int = 16,
    device: str = "cpu",
    workers: int = 0,
    on_epoch: EpochCallback | None = None,
    keep_run: bool = True,
    resume: bool = False,
    teacher: nn.Module | str | Path | None = None,
    distill: float = 0.0,
    **overrides: Any,
) -> FinetuneResult:
    """Fine-tune ``model`` (a copy) for ``epochs`` on ``data``; returns the best weights and per-epoch mAP.

    Args:
        on_epoch: called after each epoch's validation with ``(epoch, {"map50", "map50_95"})``;
            it may raise to stop the run (e.g. ``optuna.TrialPruned``), which propagates.
        keep_run: keep the Ultralytics run folder (weights, results.csv); False removes it at the end.
        resume: continue an interrupted run of the same ``project``/``name`` and ``epochs`` from its
            ``last.pt`` (weights, optimizer, EMA, epoch); a finished or absent run starts afresh.
        teacher: the model to distil from (usually the unpruned base), a module or a checkpoint path.
        distill: weight of the distillation loss (Ultralytics' ``dis``; 0: no distillation). Ultralytics'
            ``DistillationModel`` matches the student's neck features (through a trained 1x1 projector) to the
            teacher's, weighted by the teacher's class scores; the projector is dropped from the result.
        overrides: any Ultralytics training argument (``lr0``, ``mosaic``, ``optimizer``...).
    """
    if epochs < 1:
        raise EvaluatorError(f"epochs must be >= 1, got {epochs}.")
    if distill < 0 or (distill > 0 and teacher is None):
        raise EvaluatorError(f"distillation needs a teacher model and a weight > 0, got weight {distill}.")
    info = data if isinstance(data, DatasetInfo) else inspect_dataset(data)
    check_classes(model, info)
    project = Path(project).resolve()
    if distill > 0 and teacher is not None:
        overrides = {**overrides, "distill_model": str(_teacher_path(teacher, info, project / name)), "dis": distill}
    work = copy.deepcopy(model).float().train()
    params = count_params(work)
    args = _trainer_args(
        info, project, name, overrides, epochs=epochs, imgsz=imgsz, batch=batch, device=device, workers=workers
    )
    resumed_from = _resumable(project / name / "weights" / "last.pt", epochs) if resume else None
    if resumed_from is not None:
        args["resume"] = str(project / name / "weights" / "last.pt")
        LOGGER.info("resuming the interrupted fine-tune in %s at epoch %d", project / name, resumed_from + 1)
    trainer = PrunedDetectionTrainer(work, args)
    history: list[dict[str, float]] = []
    val_clock = _record_epochs(trainer, history, on_epoch)
    trained, best, final = _run_trainer(trainer, info, keep_run)
    if count_params(trained) != params:
        raise InternalError(
            f"fine-tuning changed the architecture ({params} -> {count_params(trained)} parameters): the trainer "
            "rebuilt the model (yoloprune's Ultralytics adapter)."
        )
    return FinetuneResult(trained, history, final, val_clock["total"], best if keep_run else None, resumed_from)


def _trainer_args(
    info: DatasetInfo,
    project: Path,
    name: str,
    overrides: dict[str, Any],
    *,
    epochs: int,
    imgsz: int,
    batch: int,
    device: str,
    workers: int,
) -> dict[str, Any]:
    """The trainer's arguments: :data:`FINETUNE_DEFAULTS`, this run's settings, then ``overrides``."""
    return {
        **FINETUNE_DEFAULTS,
        "model": "yoloprune_pruned",  # a label only: the trainer gets the module, never loads this
        "data": str(info.write_resolved(project / name)),
        "epochs": epochs,
        "imgsz": imgsz,
        "batch": batch,
        "device": device,
        "workers": workers,
        "project": str(project),
        "name": name,
        "amp": device not in ("cpu", "mps"),
        # One optimizer step per batch: Ultralytics accumulates gradients up to a nominal 64 images, which
        # leaves a short fine-tune of a small set a dozen steps (2 epochs of 400 images at batch 16: 12).
        "nbs": batch,
        **overrides,
    }


def _record_epochs(
    trainer: PrunedDetectionTrainer, history: list[dict[str, float]], on_epoch: EpochCallback | None
) -> dict[str, float]:
    """Append each epoch's mAP to ``history`` (then call ``on_epoch``) and time the validations; returns the clock."""

    def _epoch_end(tr: DetectionTrainer) -> None:
        if tr.epoch >= tr.epochs:  # final_eval re-runs this callback with epoch + 1
            return
        found: dict[str, Any] = dict(tr.metrics or {})
        metrics = {
            "map50": float(found.get("metrics/mAP50(B)", 0.0)),
            "map50_95": float(found.get("metrics/mAP50-95(B)", 0.0)),
        }
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(tr.epoch, metrics)

    val_clock = {"start": 0.0, "total": 0.0}

    def _val_start(_v: object) -> None:
        val_clock["start"] = time.perf_counter()

    def _val_end(_v: object) -> None:
        val_clock["total"] += time.perf_counter() - val_clock["start"]

    trainer.add_callback("on_fit_epoch_end", _epoch_end)
    trainer.add_callback("on_val_start", _val_start)  # the trainer's validator copies these callbacks
    trainer.add_callback("on_val_end", _val_end)
    return val_clock


def _run_trainer(
    trainer: PrunedDetectionTrainer, info: DatasetInfo, keep_run: bool
) -> tuple[nn.Module, Path, ValResult | None]:
    """Run the trainer; returns its best (else last) weights in float32, their path and its final validation."""
    run_dir = Path(trainer.save_dir)
    try:
        trainer.train()
        best = Path(trainer.best) if Path(trainer.best).exists() else Path(trainer.last)
        trained, _ = load_checkpoint(str(best))
        final = validator_result(trainer.validator, info) if trainer.validator is not None else None
    finally:
        if not keep_run:  # the run folder goes even when training fails
            shutil.rmtree(run_dir, ignore_errors=True)
    return trained.float(), best, final


def _teacher_path(teacher: nn.Module | str | Path, info: DatasetInfo, run: Path) -> Path:
    """A checkpoint of ``teacher`` that Ultralytics' distillation loads (a module is saved into the run folder)."""
    if isinstance(teacher, (str, Path)):
        path = Path(teacher).resolve()
        if not path.is_file():
            raise EvaluatorError(f"teacher checkpoint {path} does not exist; give the unpruned model's .pt file.")
        return path
    check_classes(teacher, info)
    from yoloprune.ultra.checkpoint import save_checkpoint

    return save_checkpoint(teacher, run / "teacher.pt")


def _resumable(last: Path, epochs: int) -> int | None:
    """The epoch (0-based) an interrupted run of ``epochs`` epochs would resume at, or None."""
    if not last.is_file():
        return None
    try:
        _, ckpt = load_checkpoint(str(last))
    except Exception as e:  # a file cut short by the interruption: start afresh
        LOGGER.warning("cannot read %s (%s); starting the fine-tune afresh", last, e)
        return None
    start = int(ckpt.get("epoch", -1)) + 1
    planned = int((ckpt.get("train_args") or {}).get("epochs", -1))
    if ckpt.get("optimizer") is None or planned != epochs or not 0 < start < epochs:
        return None  # finished (optimizer stripped), or a run of another length
    return start


def count_params(model: nn.Module) -> int:
    """Parameters of ``model`` (to check that training kept the pruned architecture)."""
    return sum(p.numel() for p in model.parameters())
