"""The NNI engine: run the experiment's search as an NNI experiment, to follow it in NNI's web dashboard.

The same experiment config drives it. NNI's tuner proposes the parameters; every NNI trial is a process
(``python -m yoloprune.search.nni_engine CONFIG.json``) that runs the Optuna engine's trial code on a
trial of the project's study, so ``results``, ``report`` and ``export`` read NNI trials like any other.
Each trial reports mAP50-95 per fine-tune epoch (NNI's intermediate results) and a final metric dict
whose ``default`` is the scalar reward.

NNI 3.0 is the final release (its repository is archived); it is an optional extra: ``pip install -e .[nni]``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from yoloprune.config import ExperimentConfig, config_from_dict
from yoloprune.config.objectives import violations
from yoloprune.device import default_device
from yoloprune.errors import BackendUnavailableError, ConfigError, YoloPruneError
from yoloprune.log import get_logger
from yoloprune.offline import ultralytics_quiet
from yoloprune.registry import NNI_TUNERS
from yoloprune.search.optuna_engine import EpochReporter, make_sampler, open_study
from yoloprune.spaces import SearchSpace
from yoloprune.storage.db import hide_password
from yoloprune.storage.optuna_adapter import (
    fail_trial,
    load_study,
    new_trial,
    record_baseline_latency,
    record_error,
    write_record,
)
from yoloprune.storage.record import TrialRecord

if TYPE_CHECKING:
    from nni.experiment import Experiment

    from yoloprune.search.trial import TrialEvaluation

LOGGER = get_logger(__name__)

#: Experiment config as the trials and the Optuna tuner read it (paths already absolute).
CONFIG_FILE = "experiment.json"


@dataclass(frozen=True)
class NniTuner:
    """A tuner ``yoloprune nni`` can give NNI (an entry of :data:`yoloprune.registry.NNI_TUNERS`).

    Attributes:
        algorithm: NNI's built-in tuner name (``TPE``), or the import path of a custom tuner class.
        custom: ``algorithm`` is a custom tuner class of this package, given the experiment's config file.
        seeded: the tuner takes ``engine.seed``.
        population: the tuner takes a population size (half the trial budget, within 4 to 32).
    """

    algorithm: str
    custom: bool = False
    seeded: bool = False
    population: bool = False


TPE_TUNER = NniTuner("TPE", seeded=True)
EVOLUTION_TUNER = NniTuner("Evolution", population=True)
RANDOM_TUNER = NniTuner("Random", seeded=True)
#: this engine's sampler on the objectives and constraints (:class:`OptunaTuner`)
OPTUNA_TUNER = NniTuner("yoloprune.search.nni_engine.OptunaTuner", custom=True)


def require_nni() -> None:
    """Raise a clear error when the optional ``nni`` extra is missing."""
    try:
        import nni
        import nni.experiment  # noqa: F401
    except ImportError as e:
        raise BackendUnavailableError(
            f"the NNI engine needs the 'nni' extra: pip install -e '.[nni]' (NNI 3.0 with setuptools<82). ({e})"
        ) from None


def workdir(config: ExperimentConfig) -> Path:
    """NNI's experiment working directory, inside the experiment's output folder."""
    return config.output_dir / "nni"


def experiment_id(config: ExperimentConfig) -> str:
    """A stable NNI experiment id for the config's experiment name (NNI allows 32 characters)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", config.name).strip("-")[:22] or "exp"
    return f"yp-{slug}"[:25] + "-" + _short_hash(f"{config.name}|{config.storage_url}")


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:6]


def nni_search_space(space: SearchSpace) -> dict[str, dict[str, Any]]:
    """The search space in NNI's format; parameter names are the Optuna engine's."""
    out: dict[str, dict[str, Any]] = {}
    for name, r in space.searched().items():
        out[f"ratio.{name}"] = (
            {"_type": "quniform", "_value": [r.low, r.high, r.step]}
            if r.step
            else {"_type": "uniform", "_value": [r.low, r.high]}
        )
    for key, choices in (("importance", space.importance), ("round_to", space.round_to)):
        if isinstance(choices, list):
            out[key] = {"_type": "choice", "_value": list(choices)}
    if not out:
        raise ConfigError("the search space has nothing to search (every ratio and knob is fixed).")
    return out


def final_metrics(trial: optuna.trial.FrozenTrial) -> dict[str, float]:
    """The metric dict an NNI trial reports: ``default`` (the reward), every finite metric, feasibility."""
    record = TrialRecord.from_frozen(trial)
    out = {"default": float(record.reward if record.reward is not None else float("nan"))}
    out.update({k: float(v) for k, v in (record.metrics or {}).items() if isinstance(v, int | float)})
    out["feasible"] = 1.0 if record.feasible else 0.0
    out["optuna_trial"] = float(trial.number)
    return {k: v for k, v in out.items() if math.isfinite(v)}


# --- the launcher side --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launched:
    id: str
    url: str


def start(config: ExperimentConfig, *, port: int = 8080, verbose: bool = False) -> Launched:
    """Check everything, evaluate the baseline once, then start the NNI experiment (detached)."""
    require_nni()
    from nni.experiment import Experiment, RunMode

    space = nni_search_space(config.space)
    exp_id = experiment_id(config)
    existing = _manifest().get(exp_id)
    if existing is not None:
        raise ConfigError(
            f"NNI experiment {exp_id} for '{config.name}' already exists (status {existing.get('status', '?')}). "
            "`yoloprune nni CONFIG --resume` continues it, `yoloprune nni CONFIG --view` shows it; or give the "
            "experiment a new name."
        )
    _check_port(port)
    _prepare_baseline(config, verbose)
    work = workdir(config)
    work.mkdir(parents=True, exist_ok=True)
    config_file = work / CONFIG_FILE
    config_file.write_text(json.dumps(config.model_dump(mode="json"), indent=1))

    exp = Experiment("local", id=exp_id)
    c = exp.config
    c.experiment_name = config.name
    c.experiment_working_directory = str(work)
    c.search_space = space
    c.trial_command = f"{shlex.quote(sys.executable)} -m yoloprune.search.nni_engine {shlex.quote(str(config_file))}"
    c.trial_code_directory = str(work)
    c.trial_concurrency = config.engine.nni.trial_concurrency
    if config.budget.trials is not None:
        c.max_trial_number = config.budget.trials
    if config.budget.timeout_s is not None:
        c.max_experiment_duration = f"{math.ceil(config.budget.timeout_s)}s"
    if default_device(config.device) == "cpu":
        c.trial_gpu_number = 0
    else:  # one GPU per trial; NNI picks a free one (not verified here: no GPU in this project's CI)
        c.trial_gpu_number = 1
        c.training_service.use_active_gpu = True
    _set_tuner(exp, config, config_file)
    exp.start(port=port, debug=verbose, run_mode=RunMode.Detach)
    return Launched(exp_id, f"http://127.0.0.1:{port}")


def _set_tuner(exp: Experiment, config: ExperimentConfig, config_file: Path) -> None:
    from nni.experiment.config import AlgorithmConfig, CustomAlgorithmConfig

    engine = config.engine
    tuner: NniTuner = NNI_TUNERS.get(engine.nni.tuner)
    if tuner.custom:
        exp.config.tuner = CustomAlgorithmConfig(
            class_name=tuner.algorithm,
            code_directory=str(Path(__file__).resolve().parents[2]),
            class_args={"config_file": str(config_file)},
        )
        return
    args: dict[str, Any] = {"optimize_mode": "maximize"}
    if tuner.seeded and engine.seed is not None:
        args["seed"] = engine.seed
    if tuner.population:
        args["population_size"] = max(4, min(32, (config.budget.trials or 32) // 2))
    exp.config.tuner = AlgorithmConfig(name=tuner.algorithm, class_args=args)


def _prepare_baseline(config: ExperimentConfig, verbose: bool) -> None:
    """Create the study and store the baseline once, so trial processes only read it."""
    from yoloprune.experiment import prepare, start_session

    exp = prepare(config)  # first: it checks the inputs and creates the output folder the study lives in
    open_study(config)
    with ultralytics_quiet(not verbose):
        start_session(exp, measure_latency=False)


def resume(config: ExperimentConfig, *, port: int = 8080, exp_id: str | None = None) -> Launched:
    """Continue a stopped NNI experiment (trials it had not run yet, up to its budget)."""
    require_nni()
    from nni.experiment import RunMode

    exp = _existing(config, exp_id)
    _check_port(port)
    failed = fail_orphans(config, exp.id)
    if failed:
        LOGGER.info("marked trial(s) %s failed: their NNI trial processes were stopped", failed)
    exp.load_checkpoint()
    exp._action = "resume"  # what Experiment.resume does, but detached from this process
    exp.start(port=port, run_mode=RunMode.Detach)
    return Launched(exp.id, f"http://127.0.0.1:{port}")


def fail_orphans(config: ExperimentConfig, exp_id: str) -> list[int]:
    """Mark failed the study's trials of NNI experiment ``exp_id`` still RUNNING (their process was killed)."""
    study = open_study(config, create=False)
    orphans = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if (TrialRecord.from_frozen(t).nni or {}).get("experiment") == exp_id
    ]
    # A False: its own process finished it meanwhile.
    return [t.number for t in orphans if fail_trial(study, t, "interrupted (the NNI experiment was stopped)")]


def view(config: ExperimentConfig, *, port: int = 8080, exp_id: str | None = None) -> Launched:
    """Serve a stopped experiment's dashboard (read-only) until ``yoloprune nni stop``."""
    require_nni()
    exp = _existing(config, exp_id)
    _check_port(port)
    exp.view(port=port, non_blocking=True)
    return Launched(exp.id, f"http://127.0.0.1:{port}")


def stop(config: ExperimentConfig, *, exp_id: str | None = None) -> str:
    """Stop the experiment's NNI manager (its dashboard too); finished trials stay in storage."""
    require_nni()
    from nni.experiment import Experiment

    exp = _existing(config, exp_id)
    info = _manifest()[exp.id]
    port = info.get("port")
    if info.get("status") == "STOPPED" or port is None or not _listening(int(port)):
        return f"NNI experiment {exp.id} is not running"
    Experiment.connect(int(port)).stop()
    failed = fail_orphans(config, exp.id)
    return f"stopped NNI experiment {exp.id}" + (f"; trial(s) {failed} it was running marked failed" if failed else "")


def status(port: int) -> dict[str, Any]:
    """The manager's ``check-status`` answer (``RUNNING``, ``NO_MORE_TRIAL``, ``DONE``, ...)."""
    from nni.experiment import rest

    return dict(rest.get(port, "/check-status"))


def wait(port: int, *, poll_s: float = 2.0, on_poll: Callable[[list[dict[str, Any]]], None] | None = None) -> str:
    """Block until the experiment on ``port`` is DONE, STOPPED or in ERROR; returns that status."""
    from nni.experiment import rest

    while True:
        state = status(port)["status"]
        if on_poll is not None:
            on_poll(list(rest.get(port, "/trial-jobs")))
        if state in ("DONE", "STOPPED", "ERROR"):
            return str(state)
        time.sleep(poll_s)


def _existing(config: ExperimentConfig, exp_id: str | None) -> Experiment:
    from nni.experiment import Experiment

    exp_id = exp_id or experiment_id(config)
    known = _manifest()
    if exp_id not in known:
        mine = sorted(k for k, v in known.items() if v.get("experimentName") == config.name)
        hint = f" NNI experiments of '{config.name}': {', '.join(mine)}." if mine else ""
        raise ConfigError(f"no NNI experiment with id '{exp_id}'.{hint} Start one with `yoloprune nni CONFIG`.")
    return Experiment(None, id=exp_id)


def _manifest() -> dict[str, dict[str, Any]]:
    from nni.tools.nnictl.config_utils import Experiments

    return dict(Experiments().get_all_experiments())


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _check_port(port: int) -> None:
    # NNI's manager uses the port and the next one (its tuner channel).
    for p in (port, port + 1):
        if _listening(p):
            raise ConfigError(f"port {p} is in use; pick another with --port (NNI needs PORT and PORT+1 free).")


# --- the tuner side (runs in NNI's dispatcher process) ------------------------------------------------


def _tuner_base() -> type:
    try:
        from nni.tuner import Tuner

        return Tuner
    except ImportError:  # the module stays importable without NNI (the class is unusable then)
        return object


class OptunaTuner(_tuner_base()):  # type: ignore[misc]
    """An NNI tuner that asks this project's Optuna sampler (``engine.sampler``) for candidates.

    Unlike NNI's own tuners, which maximise the scalar reward, it optimises the config's objectives and
    constraints (multi-objective TPE or NSGA-II), from the whole metric dict each trial reports.
    """

    def __init__(self, config_file: str) -> None:
        self.cfg = config_from_dict(json.loads(Path(config_file).read_text()), source=config_file)
        sampler = make_sampler(self.cfg.engine, self.cfg.space)
        self.study = optuna.create_study(directions=[o.direction for o in self.cfg.objectives], sampler=sampler)
        self.pending: dict[int, optuna.Trial] = {}

    def update_search_space(self, search_space: dict[str, Any]) -> None:
        pass  # the space comes from the experiment config

    def generate_parameters(self, parameter_id: int, **kwargs: Any) -> dict[str, Any]:
        trial = self.study.ask()
        self.cfg.space.suggest(trial)
        self.pending[parameter_id] = trial
        return dict(trial.params)

    def receive_trial_result(self, parameter_id: int, parameters: Any, value: Any, **kwargs: Any) -> None:
        trial = self.pending.pop(parameter_id, None)
        if trial is None:
            return
        metrics = value if isinstance(value, dict) else {"default": value}
        values = [metrics.get(o.metric) for o in self.cfg.objectives]
        try:
            if any(v is None for v in values):
                raise KeyError("an objective")
            if self.cfg.constraints:
                write_record(trial, TrialRecord(), violations(metrics, self.cfg.constraints))
        except KeyError as e:  # a metric the trial could not report (NaN): the sampler learns nothing from it
            LOGGER.warning("NNI parameter %d: no %s in its result; told as failed", parameter_id, e)
            self.study.tell(trial, state=TrialState.FAIL)
            return
        self.study.tell(trial, [float(v) for v in values])  # type: ignore[arg-type]

    def trial_end(self, parameter_id: int, success: bool, **kwargs: Any) -> None:
        trial = self.pending.pop(parameter_id, None)
        if trial is not None:  # failed or killed before reporting
            self.study.tell(trial, state=TrialState.FAIL)

    def import_data(self, data: Any) -> None:
        pass


# --- the trial side (one process per NNI trial) -------------------------------------------------------


def run_trial(config: ExperimentConfig) -> int:
    """Evaluate the parameters NNI gives this process as a trial of the project's study; returns the exit code."""
    import nni

    from yoloprune.search.methods import get_method
    from yoloprune.search.trial import StorageLost, TrialTakenOver

    params = config.space.snap(dict(nni.get_next_parameter() or {}))
    sampler = optuna.samplers.PartialFixedSampler(params, optuna.samplers.RandomSampler())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = load_study(config, sampler=sampler, heartbeats=False)
    trial = new_trial(study)  # never one of the study's queued trials
    record = TrialRecord(
        engine="nni", nni={"experiment": os.environ.get("NNI_EXP_ID"), "trial_job": os.environ.get("NNI_TRIAL_JOB_ID")}
    )
    if config.cost_target is not None and not get_method(config.engine.sampler).samples:
        record.method = "random"  # NNI proposed it: push it onto the target in proportion
    write_record(trial, record)
    signal.signal(signal.SIGTERM, _interrupt)  # NNI stops trials with SIGTERM
    evaluation: TrialEvaluation | None = None
    try:
        with ultralytics_quiet(True):
            evaluation = _evaluation(config, study)
            values = evaluation(trial)
    except KeyboardInterrupt:
        write_record(trial, TrialRecord(interrupted=True, error="interrupted (NNI stopped the trial)"))
        study.tell(trial, state=TrialState.FAIL)
        return 130
    except StorageLost as e:  # nothing more can be stored: the trial stays RUNNING there, NNI sees it fail
        print(f"trial failed: lost the database {hide_password(config.storage_url)}: {e}. Its finished trials "
              "are kept in it; this trial's result is not.", file=sys.stderr)  # fmt: skip
        return 2
    except TrialTakenOver:  # another process finished it in the database: nothing of this trial can be stored
        print(f"trial failed: trial {trial.number} was finished by another process while this one ran it; "
              "its result is dropped.", file=sys.stderr)  # fmt: skip
        return 1
    except Exception as e:
        record_error(study, trial, f"{type(e).__name__}: {e}")
        study.tell(trial, state=TrialState.FAIL)
        stop = evaluation.stop_error if evaluation is not None else None
        print(f"trial failed: {type(e).__name__}: {e}" + (f"; {stop}" if stop else ""), file=sys.stderr)
        return 2 if isinstance(e, YoloPruneError) else 1
    study.tell(trial, values)
    nni.report_final_result(final_metrics(study.trials[trial.number]))
    if evaluation.stop_error is not None:  # its result is stored and told: only what came after it failed
        print(f"trial {trial.number} finished and is stored, but {evaluation.stop_error} The next trials would "
              "fail the same way: stop the NNI experiment and fix it.", file=sys.stderr)  # fmt: skip
        return 2
    return 0


def _evaluation(config: ExperimentConfig, study: optuna.Study) -> TrialEvaluation:
    """The trial's evaluation, as the Optuna engine runs it, reporting each epoch to NNI's assessors."""
    import nni

    from yoloprune.experiment import open_session
    from yoloprune.search.targeting import session_targeting
    from yoloprune.search.trial import NoDisplay, TrialEvaluation

    session = open_session(config)
    record_baseline_latency(study, session.baseline_latency)
    return TrialEvaluation(
        session,
        EpochReporter(study, None),  # NNI's assessors, not Optuna's pruners, act on NNI trials
        targeting=session_targeting(session) if config.cost_target is not None else None,
        display=NoDisplay,
        epoch_hook=lambda epoch, m: nni.report_intermediate_result(float(m["map50_95"])),
    )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m yoloprune.search.nni_engine EXPERIMENT.json (started by NNI)", file=sys.stderr)
        return 2
    path = Path(args[0])
    return run_trial(config_from_dict(json.loads(path.read_text()), source=str(path)))


if __name__ == "__main__":
    sys.exit(main())
