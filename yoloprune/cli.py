"""Command-line interface: ``yoloprune <command> ...``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yoloprune.device import default_device
from yoloprune.errors import ConfigError, EvaluatorError, InternalError, YoloPruneError
from yoloprune.log import get_logger, set_progress, set_verbosity
from yoloprune.tables import format_table

if TYPE_CHECKING:
    from yoloprune.config import ExperimentConfig

LOGGER = get_logger("cli")

#: The storage URL when the command line gives none: over the config's `storage`, and out of `ps`'s sight.
STORAGE_ENV = "YOLOPRUNE_STORAGE"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 for a user error, 70 for a bug in yoloprune, 130 after Ctrl-C,
    143 after SIGTERM)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides after an option land here
        if not hasattr(args, "overrides") or any(token.startswith("-") for token in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.quiet:
        set_verbosity("WARNING")
    set_progress(not getattr(args, "no_progress", False))  # the long steps' bars too, not only the trials'
    guard = _SigtermAsInterrupt()
    try:
        with guard:
            code = int(args.func(args) or 0)
    except YoloPruneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except InternalError as e:  # not the user's to fix: show where it broke, for the bug report
        import traceback

        traceback.print_exc()
        print(f"internal error: {e}", file=sys.stderr)
        return 70  # EX_SOFTWARE
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print("terminated (SIGTERM)" if terminated else "interrupted", file=sys.stderr)
        return SIGTERM_EXIT if terminated else CTRL_C_EXIT
    # A command that stops on an interrupt itself (search: "finished trials are kept...") returns 130 for both.
    return SIGTERM_EXIT if code == CTRL_C_EXIT and guard.terminated else code


#: Exit codes of a command stopped by Ctrl-C (SIGINT) or SIGTERM: 128 + the signal, as shells, ``timeout`` and
#: batch schedulers expect.
CTRL_C_EXIT, SIGTERM_EXIT = 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``docker stop``, a batch scheduler) stopping a command: handled as Ctrl-C is, but the
    process exits with 143 (128 + SIGTERM), not 130."""


class _SigtermAsInterrupt:
    """While a command runs, SIGTERM raises :class:`Terminated` in the main thread, so it stops the way Ctrl-C
    does: the running trial is recorded as interrupted (queued again on resume) and files are closed. A second
    SIGTERM ends the process at once. Only the main thread may set signal handlers; elsewhere this does nothing.
    :attr:`terminated` tells whether a SIGTERM came."""

    def __init__(self) -> None:
        self.terminated = False
        self.previous: Any = None

    def __enter__(self) -> None:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handler)

    def __exit__(self, *exc: object) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def _handler(self, signum: int, frame: object) -> None:
        import signal

        self.terminated = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="yoloprune", description=__doc__)
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stages", help="print a model's named stages with channels, params and FLOPs share")
    s.add_argument("model", help="a .pt checkpoint or a model YAML (e.g. yolov8n.yaml)")
    s.add_argument("--imgsz", type=int, default=640, help="image size for FLOPs (default 640)")
    s.set_defaults(func=_cmd_stages)

    s = sub.add_parser("prune", help="prune a model once with given per-stage ratios and save it")
    s.add_argument("model", help="a .pt checkpoint or a model YAML")
    s.add_argument("-o", "--output", required=True, help="where to write the pruned .pt")
    s.add_argument("--ratio", action="append", default=[], metavar="STAGE=R", help="e.g. backbone.p3=0.3 (repeat)")
    s.add_argument("--uniform", type=float, help="the same ratio for every prunable stage")
    s.add_argument("--importance", default="l1", help="l1, l2, bn_scale or random (default l1)")
    s.add_argument("--round-to", type=int, default=1, help="keep channel counts multiples of N (default 1)")
    s.add_argument("--imgsz", type=int, default=640, help="image size for FLOPs (default 640)")
    s.set_defaults(func=_cmd_prune)

    s = sub.add_parser("finetune", help="fine-tune a (pruned) checkpoint without rebuilding it, then save it")
    s.add_argument("model", help="a .pt checkpoint")
    s.add_argument("--data", required=True, help="dataset YAML")
    s.add_argument("-o", "--output", required=True, help="where to write the fine-tuned .pt")
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--imgsz", type=int, default=640)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--device", default=None, help="cpu, 0, 0,1 ... (default: cuda:0 if available)")
    s.add_argument("--project", default="runs/yoloprune", help="training run folder")
    s.add_argument("--teacher", default=None, help="distil from this checkpoint (usually the unpruned base .pt)")
    s.add_argument("--distill", type=float, default=6.0, help="distillation loss weight with --teacher (default 6.0)")
    s.set_defaults(func=_cmd_finetune)

    s = sub.add_parser("val", help="validate a checkpoint: mAP50, mAP50-95 and per-class AP")
    s.add_argument("model", help="a .pt checkpoint")
    s.add_argument("--data", required=True, help="dataset YAML")
    s.add_argument("--imgsz", type=int, default=640)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--device", default=None)
    s.set_defaults(func=_cmd_val)

    s = sub.add_parser("dataset", help="generate the built-in synthetic detection dataset")
    s.add_argument("output", help="folder to write (must be empty or a previous synthetic set)")
    s.add_argument("--train", type=int, default=400, help="training images (default 400)")
    s.add_argument("--val", type=int, default=100, help="validation images (default 100)")
    s.add_argument("--imgsz", type=int, default=256, help="image side (default 256)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_dataset)

    s = sub.add_parser("search", help="run (or resume) the search an experiment config describes")
    _config_args(s, "experiment YAML (see experiments/)")
    s.add_argument("--trials", type=int, help="override budget.trials")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("-v", "--verbose", action="store_true", help="show Ultralytics' own output")
    s.add_argument("--uniform", type=float, nargs="+", default=(), metavar="R",
                   help="first evaluate the uniform baseline: the same ratio R on every searched stage")  # fmt: skip
    s.add_argument("--warm-start", type=int, default=0, metavar="N",
                   help="first evaluate N candidates guided by the per-stage sensitivity scan (run once if missing)")  # fmt: skip
    s.set_defaults(func=_cmd_search)

    s = sub.add_parser("sensitivity", help="prune one stage at a time: the mAP each stage costs, what it saves")
    _config_args(s)
    s.add_argument("--ratio", type=float, default=None, help="ratio for every stage (default: its range's top)")
    s.add_argument("--epochs", type=int, default=0, help="fine-tune epochs per stage (default 0: BN only)")
    s.set_defaults(func=_cmd_sensitivity)

    s = sub.add_parser(
        "worker", help="join a search (shared storage, e.g. PostgreSQL): run its trials until the budget"
    )
    _config_args(s, "experiment YAML (the same file on every machine)")
    s.add_argument("--trials", type=int, help="override budget.trials")
    s.add_argument("--progress", action="store_true", help="show progress bars")
    s.add_argument("-v", "--verbose", action="store_true", help="show Ultralytics' own output")
    s.set_defaults(func=_cmd_worker)

    s = sub.add_parser("fidelity", help="re-train top and random trials longer: Kendall tau of the proxy's ranking")
    _config_args(s)
    s.add_argument("--top", type=int, default=3, help="best trials by reward to re-train (default 3)")
    s.add_argument("--random", type=int, default=3, help="other trials, drawn at random (default 3)")
    s.add_argument("--epochs", type=int, default=20, help="long fine-tune epochs (default 20)")
    s.set_defaults(func=_cmd_fidelity)

    s = sub.add_parser(
        "calibrate",
        help="long-fine-tune a few trials (uniform first): predict each trial's drop after the export's fine-tune",
    )
    _config_args(s)
    s.add_argument(
        "--candidates", type=int, default=4, help="trials to long-fine-tune, uniform first (default 4, min 3)"
    )
    s.add_argument("--epochs", type=int, default=30, help="the long fine-tune: use the export's --epochs (default 30)")
    s.add_argument("--max-error", type=float, default=0.02,
                   help="largest leave-one-out error (absolute drop) at which constraints use predictions (0.02)")  # fmt: skip
    s.add_argument("--no-reference", action="store_true",
                   help="skip fine-tuning the unpruned base as long (the like-for-like reference)")  # fmt: skip
    s.set_defaults(func=_cmd_calibrate)

    s = sub.add_parser("db", help="database maintenance: `db upgrade` brings an older schema to this version")
    s.add_argument("action", choices=["upgrade", "check"])
    s.add_argument("config", nargs="?", help="experiment YAML (its storage), or give --storage")
    s.add_argument("--storage", metavar="URL", help=f"storage URL (default: ${STORAGE_ENV}, else the config's)")
    s.set_defaults(func=_cmd_db)

    s = sub.add_parser("schema", help="print the experiment config's JSON schema, for completion in editors")
    s.set_defaults(func=_cmd_schema)

    s = sub.add_parser("results", help="print an experiment's Pareto front and write trials.csv")
    _config_args(s)
    s.add_argument("--all", action="store_true", help="print every trial, not only the front")
    s.set_defaults(func=_cmd_results)

    s = sub.add_parser("report", help="write the search's HTML report (plotly, offline) and trials.csv")
    _config_args(s)
    s.add_argument("--trial", type=int, default=None, help="trial for the per-class AP plot (default: the best)")
    s.add_argument("--output", default=None, help="HTML file (default <experiment output>/report.html)")
    s.add_argument("--open", action="store_true", help="then open it in the web browser")
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("export", help="rebuild a trial's model, fine-tune it fully, write .pt, .onnx and a model card")
    _config_args(s)
    s.add_argument("--trial", default="best", help="a trial number, or best (default)")
    s.add_argument("--policy", choices=["fastest", "most_accurate"], default="fastest",
                   help="what 'best' means: the fastest feasible trial, or the most accurate within --latency-budget-ms")  # fmt: skip
    s.add_argument("--latency-budget-ms", type=float, default=None)
    s.add_argument(
        "--epochs", type=int, default=30, help="fine-tune epochs (default 30), with the recipe finetune.long"
    )
    s.add_argument("--dynamic", action="store_true", help="ONNX with a dynamic batch dimension")
    s.add_argument("--engine", action="store_true", help="also build an FP16 TensorRT engine (needs TensorRT here)")
    s.add_argument("--int8", action="store_true",
                   help="also write an INT8 ONNX calibrated on training images and validate it (with --engine, an INT8 engine)")  # fmt: skip
    s.add_argument("--fresh", action="store_true", help="restart an interrupted fine-tune instead of resuming it")
    s.add_argument("--output", default=None, help="folder (default <experiment output>/export)")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("nni", help="run the search as an NNI experiment and follow it in NNI's web dashboard")
    _config_args(s)
    s.add_argument("--port", type=int, default=8080, help="dashboard port (default 8080; PORT+1 must be free too)")
    s.add_argument("--trials", type=int, help="override budget.trials")
    s.add_argument("--wait", action="store_true", help="block until the experiment is done, then print results")
    s.add_argument("--id", default=None, help="NNI experiment id (default: the one derived from the config's name)")
    s.add_argument("-v", "--verbose", action="store_true", help="show Ultralytics' and NNI's own output")
    action = s.add_mutually_exclusive_group()
    action.add_argument("--resume", action="store_true", help="continue a stopped NNI experiment")
    action.add_argument("--view", action="store_true", help="serve a stopped experiment's dashboard")
    action.add_argument("--stop", action="store_true", help="stop the experiment's NNI manager and dashboard")
    s.set_defaults(func=_cmd_nni)

    s = sub.add_parser("dashboard", help="follow a search in optuna-dashboard: named objectives, constraints in a note")
    _config_args(s)
    s.add_argument("--port", type=int, default=8081, help="port (default 8081; 0: any free port)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; the dashboard has no login and can delete studies)")  # fmt: skip
    s.set_defaults(func=_cmd_dashboard)

    s = sub.add_parser("latency", help="time models on a latency backend in one process; ratios to the first")
    s.add_argument("models", nargs="+", help=".pt checkpoints or model YAMLs; the first is the reference")
    s.add_argument("--backend", default="onnxruntime", help="onnxruntime (default), torch, tensorrt or remote")
    s.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    s.add_argument("--precision", default="fp32", help="fp32 (default), fp16 (CUDA) or int8")
    s.add_argument("--imgsz", type=int, default=640, help="input size (default 640)")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: the runtime's)")
    s.add_argument("--repeats", type=int, default=1, help="measure the models interleaved this many times")
    s.add_argument("--url", default=None, help="the agent's URL, for --backend remote")
    s.add_argument("--remote-backend", default="onnxruntime", help="the runtime the agent uses")
    s.add_argument("--cafile", default=None, help="the CA certificate (PEM) of an https:// agent's certificate")
    s.set_defaults(func=_cmd_latency)

    s = sub.add_parser("agent", help="serve latency measurements on this (target) device over HTTP")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--token", default=None, help="required unless on loopback (default: $YOLOPRUNE_AGENT_TOKEN)")
    s.add_argument("--max-upload-mb", type=float, default=256.0, help="largest upload (default 256; 413 above)")
    s.add_argument("--timeout-s", type=float, default=900.0,
                   help="per measurement; its process is killed past it (504) (default 900)")  # fmt: skip
    s.add_argument("--queue", type=int, default=4,
                   help="measurements that may wait behind the running one; 503 + Retry-After beyond (default 4)")  # fmt: skip
    s.add_argument("--max-connections", type=int, default=32, help="open connections at once (default 32)")
    s.add_argument("--read-timeout-s", type=float, default=60.0, help="drop a connection silent this long (default 60)")
    s.add_argument("--certfile", default=None, help="serve HTTPS with this certificate chain (PEM)")
    s.add_argument("--keyfile", default=None, help="the certificate's private key (PEM), if not in --certfile")
    s.set_defaults(func=_cmd_agent)

    s = sub.add_parser(
        "demo",
        help="the built-in demo: synthetic data, the shipped base, a search at -50%% FLOPs against uniform pruning",
    )
    s.add_argument("--output", default="outputs/demo", help="output folder (default outputs/demo)")
    s.add_argument("--quick", action="store_true", help="a tiny, fast version (used by the tests)")
    s.add_argument("--trials", type=int, help="override the number of trials")
    s.add_argument("--device", default=None)
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument(
        "--train-base", action="store_true", help="train the demo's base from scratch (~15 min) instead of searching"
    )
    s.set_defaults(func=_cmd_demo)
    return p


def _config_args(s: argparse.ArgumentParser, help: str = "experiment YAML") -> None:
    """The arguments of a command that reads an experiment config: the file, ``KEY=VALUE`` overrides, ``--storage``."""
    s.add_argument("config", help=help)
    s.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="set a config value, e.g. finetune.epochs=5 budget.trials=50 \"finetune.overrides={lr0: 0.01}\" "
                        "(a dotted path into the config; the value is YAML)")  # fmt: skip
    s.add_argument("--storage", metavar="URL",
                   help=f"storage URL, over ${STORAGE_ENV} and the config's storage (${STORAGE_ENV} keeps a password out "
                        "of `ps`)")  # fmt: skip


def _load_config(args: argparse.Namespace) -> ExperimentConfig:
    """The command's experiment config, with its command-line overrides (:func:`_assignments`)."""
    from yoloprune.config import load_config

    return load_config(args.config, assignments=_assignments(args))


def _assignments(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The config values the command line sets: ``KEY=VALUE`` overrides, ``--trials`` and ``--storage``.

    The storage URL: ``--storage`` or ``storage=URL``, else ``$YOLOPRUNE_STORAGE``, else the config's, else
    SQLite in the output folder. A key given twice is an error, not a silent choice.
    """
    from yoloprune.config import parse_assignments

    pairs = parse_assignments(getattr(args, "overrides", None) or [])
    if getattr(args, "trials", None) is not None:
        pairs.append(("budget.trials", args.trials))
    if getattr(args, "storage", None):
        pairs.append(("storage", args.storage))
    keys = [key for key, _ in pairs]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise ConfigError(
            f"{', '.join(twice)} given twice on the command line (a flag and a KEY=VALUE, or a KEY=VALUE repeated): "
            "give each once."
        )
    if "storage" not in keys and os.environ.get(STORAGE_ENV):
        pairs.append(("storage", os.environ[STORAGE_ENV]))
    return pairs


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    """The storage URL of a command without ``KEY=VALUE`` overrides (``--storage``, else ``$YOLOPRUNE_STORAGE``),
    as :func:`~yoloprune.config.load_config`'s ``overrides``; where a command has them, use :func:`_load_config`."""
    return dict(_assignments(args))


def parse_ratios(pairs: Sequence[str]) -> dict[str, float]:
    """``["backbone.p3=0.3", ...]`` -> ``{"backbone.p3": 0.3}``."""
    ratios: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            if not sep:
                raise ValueError
            ratios[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--ratio '{pair}' is not STAGE=RATIO (e.g. backbone.p3=0.3).") from None
    return ratios


def _cmd_stages(args: argparse.Namespace) -> int:
    from yoloprune.pruning.report import stage_table
    from yoloprune.ultra.models import load_detector

    print(format_table(stage_table(load_detector(args.model), args.imgsz)))
    return 0


def _cmd_latency(args: argparse.Namespace) -> int:
    import tempfile

    import pandas as pd
    from pydantic import ValidationError

    from yoloprune.config import latency_target
    from yoloprune.config.loading import _explain
    from yoloprune.evaluators.hardware import HardwareEvaluator
    from yoloprune.evaluators.latency.stats import summarize
    from yoloprune.pruning import measure_costs
    from yoloprune.ultra.models import load_detector

    if args.repeats < 1:
        raise ConfigError("--repeats must be at least 1.")
    try:
        fields = {"name": "cli", "backend": args.backend, "device": args.device, "precision": args.precision,
                  "batch": args.batch, "imgsz": args.imgsz}  # fmt: skip
        if args.backend == "remote":
            if not args.url:
                raise ConfigError(
                    "--backend remote measures on a device's `yoloprune agent`: give its agent's url (--url)."
                )
            fields |= {"url": args.url, "remote_backend": args.remote_backend, "cafile": args.cafile}
        elif args.url or args.cafile:
            raise ConfigError("--url and --cafile are for --backend remote (a device's `yoloprune agent`).")
        else:
            fields["threads"] = args.threads
        target = latency_target(**fields)
    except ValidationError as e:
        raise ConfigError("invalid latency options:\n" + _explain(e)) from None
    models = {path: load_detector(path).eval() for path in args.models}
    pooled: dict[str, list[float]] = {path: [] for path in models}
    with tempfile.TemporaryDirectory(prefix="yoloprune-latency-") as tmp:
        hardware = HardwareEvaluator([target], imgsz=args.imgsz, store=None, workdir=Path(tmp))
        for _ in range(args.repeats):  # interleaved, so drift hits every model alike
            for path, model in models.items():
                _, details = hardware.measure(model, use_cache=False, times=True)
                pooled[path].extend(details["cli"]["times_ms"])
    if not all(pooled.values()):
        raise EvaluatorError(
            f"the {args.backend} backend returned no run times (an agent older than this yoloprune?): upgrade "
            "yoloprune where it runs."
        )
    stats = {path: summarize(times) for path, times in pooled.items()}  # percentiles of one pool of runs
    reference = stats[args.models[0]]["median_ms"]
    rows = [
        {
            "model": path, "GFLOPs": measure_costs(models[path], args.imgsz).gflops, "median ms": s["median_ms"],
            "p90 ms": s["p90_ms"], "p99 ms": s["p99_ms"], "CV": s["cv"], "runs": int(s["runs"]),
            "ratio": s["median_ms"] / reference,
        }
        for path, s in stats.items()
    ]  # fmt: skip
    print(f"{args.backend} on {args.device}, {args.precision}, batch {args.batch}, {args.imgsz} px "
          f"({args.repeats} interleaved repeat(s), every run of a model pooled; ratio: to {args.models[0]})")  # fmt: skip
    print(format_table(pd.DataFrame(rows)))
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from yoloprune.pruning import find_stages, measure_costs, prune
    from yoloprune.ultra.checkpoint import save_checkpoint
    from yoloprune.ultra.models import load_detector

    model = load_detector(args.model)
    ratios = parse_ratios(args.ratio)
    if args.uniform is not None:
        if ratios:
            raise ConfigError("give either --uniform or --ratio, not both.")
        ratios = {s.name: args.uniform for s in find_stages(model) if s.prunable}
    if not ratios:
        raise ConfigError("no ratios: pass --uniform R or one or more --ratio STAGE=R.")
    before = measure_costs(model, args.imgsz)
    pruned = prune(model, ratios, importance=args.importance, round_to=args.round_to)
    after = measure_costs(pruned, args.imgsz)
    metadata = {
        "ratios": ratios,
        "importance": args.importance,
        "round_to": args.round_to,
        "source": str(args.model),
        "base": {"params": before.params, "gflops": before.gflops, "imgsz": args.imgsz},
    }
    path = save_checkpoint(pruned, args.output, metadata=metadata)
    print(f"params  {before.params:>12,d} -> {after.params:>12,d}  ({after.params / before.params:.1%})")
    print(
        f"GFLOPs  {before.gflops:>12.3f} -> {after.gflops:>12.3f}  ({after.gflops / before.gflops:.1%}) at {args.imgsz}"
    )
    print(f"saved   {path}  ({path.stat().st_size / 1e6:.2f} MB)")
    print("note: pruned weights need fine-tuning: yoloprune finetune", path, "--data YOUR.yaml -o tuned.pt")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from yoloprune.ultra.checkpoint import read_metadata, save_checkpoint
    from yoloprune.ultra.models import load_detector
    from yoloprune.ultra.train import finetune

    model = load_detector(args.model)
    result = finetune(
        model,
        args.data,
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        device=default_device(args.device),
        project=args.project,
        name=Path(args.output).stem,
        teacher=args.teacher,
        distill=args.distill if args.teacher else 0.0,
    )
    tuned = {"epochs": args.epochs, "history": result.epochs}
    if args.teacher:
        tuned.update(teacher=str(Path(args.teacher).resolve()), distill=args.distill)
    metadata = {**read_metadata(args.model), "finetune": tuned}
    path = save_checkpoint(
        result.model, args.output, train_args={"data": args.data, "imgsz": args.imgsz}, metadata=metadata
    )
    print(f"saved {path}")
    return 0


def _cmd_val(args: argparse.Namespace) -> int:
    import pandas as pd

    from yoloprune.ultra.models import load_detector
    from yoloprune.ultra.val import validate

    result = validate(
        load_detector(args.model),
        args.data,
        imgsz=args.imgsz,
        batch=args.batch,
        device=default_device(args.device),
    )
    print(f"mAP50 {result.map50:.4f}  mAP50-95 {result.map50_95:.4f}  P {result.precision:.4f}  R {result.recall:.4f}")
    print(format_table(pd.DataFrame([vars(c) for c in result.per_class.values()])))
    return 0


def _cmd_dataset(args: argparse.Namespace) -> int:
    from yoloprune.data import SyntheticSpec, generate_dataset

    path = generate_dataset(
        args.output, SyntheticSpec(n_train=args.train, n_val=args.val, imgsz=args.imgsz, seed=args.seed)
    )
    print(f"dataset written: {path}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from yoloprune.search.runner import run_search

    config = _load_config(args)
    try:
        run_search(
            config,
            progress=not args.no_progress,
            verbose=args.verbose,
            uniform=args.uniform,
            warm_start=args.warm_start,
        )
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are kept; run the same command again to resume.", file=sys.stderr)
        _print_results(config)
        return 130
    _print_results(config)
    return 0


def _cmd_fidelity(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from yoloprune.search.fidelity import describe, measure

    result = measure(_load_config(args), top=args.top, sample=args.random, epochs=args.epochs)
    for number, r in result.trials.items():
        print(f"trial {number:4d}  proxy mAP50-95 {r['proxy']:.4f}  after {result.epochs} epochs {r['long']:.4f}")
    print(describe(asdict(result)))
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from yoloprune.search.calibration import calibrate, describe
    from yoloprune.search.optuna_engine import open_study

    config = _load_config(args)
    run = calibrate(
        config, candidates=args.candidates, epochs=args.epochs, max_error=args.max_error,
        with_reference=not args.no_reference,
    )  # fmt: skip
    base = float(run.baseline["map50_95"])
    ref, proxy_ref = run.reference, run.proxy_reference
    print(
        f"baseline mAP50-95 {base:.4f}"
        + (f"; fine-tuned {args.epochs} more epochs: {ref['map50_95']:.4f}" if ref else "")
    )
    if proxy_ref:
        print(f"the base fine-tuned for the proxy's {config.finetune.epochs} epochs: {proxy_ref['map50_95']:.4f}")
    points = run.calibration.points if run.calibration else {}

    def drop(value: float, reference: float) -> str:
        return f"{100 * (1 - value / reference):.1f}%" if reference > 0 else "n/a"

    for number, r in run.results.items():
        line = (
            f"trial {number:4d}  proxy mAP50-95 {r['proxy']:.4f} (drop {drop(r['proxy'], base)})  "
            f"after {args.epochs} epochs {r['final']:.4f} (drop {drop(r['final'], base)}"
        )
        if ref:
            line += f"; {drop(r['final'], ref['map50_95'])} against the base fine-tuned as long"
        line += ")"
        if number in points:
            line += f"  leave-one-out prediction {100 * points[number]['loo_prediction']:.1f}%"
        print(line)
    if run.error:
        print(f"WARNING: no calibration: {run.error}; constraints stay judged on the raw proxy")
    for line in describe(run.calibration, open_study(config, create=False)):
        print(line)
    return 0


def _cmd_sensitivity(args: argparse.Namespace) -> int:
    from yoloprune.search.sensitivity import scan, table

    rows = scan(_load_config(args), ratio=args.ratio, epochs=args.epochs)
    print(f"each stage pruned alone ({args.epochs} fine-tune epochs), most sensitive first:")
    print(format_table(table(rows)))
    print("stored on the study: `yoloprune search CONFIG --warm-start N` starts from it")
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from yoloprune.search.runner import run_search

    config = _load_config(args)
    if config.storage_url.startswith("sqlite") and args.storage is None:
        LOGGER.warning("storage is SQLite (%s): workers can share it on this machine only", config.storage_url)
    try:
        run_search(config, progress=args.progress, verbose=args.verbose)
    except KeyboardInterrupt:
        print("\ninterrupted: this worker's running trial is queued again; the others carry on.", file=sys.stderr)
        return 130
    _print_results(config)
    return 0


def _cmd_db(args: argparse.Namespace) -> int:
    from yoloprune.config import load_config
    from yoloprune.storage.db import SCHEMA_VERSION, Store, engine_for, schema_version
    from yoloprune.storage.optuna_adapter import upgrade_optuna_schema

    if args.config:
        url = load_config(args.config, assignments=_assignments(args)).storage_url
    elif args.storage or os.environ.get(STORAGE_ENV):
        url = args.storage or os.environ[STORAGE_ENV]
    else:
        raise ConfigError(f"give the database: `yoloprune db upgrade CONFIG`, `--storage URL` or ${STORAGE_ENV}.")
    if args.action == "check":
        found = schema_version(engine_for(url))
        print(f"yoloprune schema: {'none yet' if found is None else found} (this yoloprune: {SCHEMA_VERSION})")
        return 0 if found in (None, SCHEMA_VERSION) else 1
    Store(url, upgrade=True)
    upgrade_optuna_schema(url)
    print(f"yoloprune schema version {SCHEMA_VERSION} and Optuna's tables are up to date")
    return 0


def _cmd_results(args: argparse.Namespace) -> int:
    _print_results(_load_config(args), show_all=args.all)
    return 0


def _print_results(config: ExperimentConfig, show_all: bool = False) -> None:
    from yoloprune.search.results import render_results

    print(render_results(config, show_all=show_all))


def _cmd_report(args: argparse.Namespace) -> int:
    from yoloprune.search.report import write_report

    report = write_report(
        _load_config(args),
        output=Path(args.output) if args.output else None,
        trial=args.trial,
    )
    print(f"wrote {report.path} ({len(report.figures)} plots; per-class AP of trial {report.trial})")
    print(f"wrote {report.csv}")
    if args.open:
        import webbrowser

        page = Path(report.path).resolve().as_uri()
        if not webbrowser.open(page):
            print(f"found no web browser to open it here: open {page} yourself")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from yoloprune.config import ExperimentConfig

    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **ExperimentConfig.model_json_schema()}
    print(json.dumps(schema, indent=1))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from yoloprune.deploy.export import export_trial
    from yoloprune.search.optuna_engine import open_study
    from yoloprune.search.selection import select_trial

    config = _load_config(args)
    study = open_study(config, create=False)
    trial = select_trial(study, config, args.trial, policy=args.policy, latency_budget_ms=args.latency_budget_ms)
    print(f"exporting trial {trial.number} of '{config.name}' ({args.epochs} fine-tune epochs)")
    output = Path(args.output) if args.output else config.output_dir / "export"
    result = export_trial(
        config, trial, epochs=args.epochs, output=output, dynamic=args.dynamic, engine=args.engine, int8=args.int8,
        fresh=args.fresh,
    )  # fmt: skip
    resumed = result.card["finetune"]["resumed_from_epoch"]
    if resumed is not None:
        print(f"resumed the interrupted fine-tune at epoch {resumed + 1}")
    after = result.card["after"]
    print(f"mAP50-95 {after['map50_95']:.4f} (drop {100 * after['map50_95_drop']:.1f}%), GFLOPs {after['gflops']:.3f}")
    if "int8" in result.card:
        q = result.card["int8"]
        print(f"INT8 ONNX mAP50-95 {q['int8_onnx']['map50_95']:.4f} (float ONNX {q['fp32_onnx']['map50_95']:.4f})")
    paths = (result.checkpoint, result.onnx, result.int8_onnx, result.engine, result.int8_engine, result.card_json,
             result.card_md)  # fmt: skip
    for path in paths:
        if path is not None:
            print(f"wrote {path}")
    return 0


def _cmd_nni(args: argparse.Namespace) -> int:
    from yoloprune.search import nni_engine

    config = _load_config(args)
    if args.stop:
        print(nni_engine.stop(config, exp_id=args.id))
        return 0
    if args.view:
        launched = nni_engine.view(config, port=args.port, exp_id=args.id)
    elif args.resume:
        launched = nni_engine.resume(config, port=args.port, exp_id=args.id)
    else:
        launched = nni_engine.start(config, port=args.port, verbose=args.verbose)
    print(f"NNI experiment {launched.id}: dashboard {launched.url}", flush=True)
    print(f"stop it with: yoloprune nni {args.config} --stop", flush=True)
    if args.wait and not args.view:
        state = nni_engine.wait(args.port)
        print(f"NNI experiment {launched.id}: {state}")
        _print_results(config)
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from yoloprune.search import dashboard

    config = _load_config(args)
    server, url = dashboard.bind(config, host=args.host, port=args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        LOGGER.warning("the dashboard listens on %s: anyone who reaches it can edit and delete studies", args.host)
    print(f"optuna-dashboard for '{config.name}': {url} (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("dashboard stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def _cmd_agent(args: argparse.Namespace) -> int:
    import os

    from yoloprune.evaluators.latency.agent import AgentLimits, AgentServer

    token = args.token or os.environ.get("YOLOPRUNE_AGENT_TOKEN")
    limits = AgentLimits(max_upload_mb=args.max_upload_mb, timeout_s=args.timeout_s, queue=args.queue,
                         max_connections=args.max_connections, read_timeout_s=args.read_timeout_s)  # fmt: skip
    server = AgentServer(args.host, args.port, token=token, limits=limits, certfile=args.certfile, keyfile=args.keyfile)
    print(
        f"yoloprune agent on {server.scheme}://{args.host}:{server.server_address[1]} (token "
        f"{'set' if token else 'off'}; queue {limits.queue}, {limits.max_connections} connections)",
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from yoloprune.demo import run_demo
    from yoloprune.experiment.builtin import train_demo_base

    if args.train_base:
        info = train_demo_base(device=args.device or "cpu")
        print(json.dumps(info, indent=1))
        print(f"trained {info['checkpoint']} (its record: {Path(info['checkpoint']).with_suffix('.json')})")
        print("use it as `model:` in an experiment config; to ship it, copy both files to yoloprune/assets/ as")
        print(
            "demo_base.pt and demo_base.json and set SHIPPED_BASE_SHA256 in yoloprune/experiment/builtin.py to its sha256."
        )
        return 0
    try:
        print(run_demo(Path(args.output), quick=args.quick, device=args.device, trials=args.trials,
                       progress=not args.no_progress))  # fmt: skip
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are kept; run `make demo` again to resume.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
