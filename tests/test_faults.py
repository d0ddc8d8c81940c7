"""Runtime faults, each through the real CLI: a read-only output folder, a full disk under a checkpoint or the
database, SIGTERM mid-trial, and the database deleted or its folder removed mid-search.

Each case asserts the exit code, a message that names the file or folder and the fix, no traceback, nothing
half-written under a final name, and that the trials finished before the fault are still there after resuming.

Mid-trial timing is deterministic: the CLI runs under a small driver (:data:`DRIVER`) that calls
``yoloprune.cli.main`` with the same arguments after wrapping the proxy evaluator, so that the fault happens at
the start of the second trial (after the first one finished). Full and read-only file systems are tmpfs mounts,
which need root and a kernel that allows them; elsewhere those cases are skipped with the reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from yoloprune.config import load_config

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "yoloprune.cli"]

#: Runs the CLI with a fault injected when the second trial starts evaluating: YP_FAULT names it, YP_FAULT_ARG
#: is its path. The first trial runs untouched, so each case also shows a finished trial surviving the fault.
DRIVER = r"""
import os, shutil, sys, time
from pathlib import Path
from yoloprune.evaluators.proxy import ProxyEvaluator
from yoloprune.cli import main

fault, arg = os.environ["YP_FAULT"], Path(os.environ["YP_FAULT_ARG"])
real, calls = ProxyEvaluator.evaluate, [0]

def fill(folder):
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass

def evaluate(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == 2:
        if fault == "sigterm":
            arg.touch()
            time.sleep(600)  # SIGTERM arrives here
        elif fault == "delete-db":
            arg.unlink()
        elif fault == "remove-db-folder":
            shutil.rmtree(arg)
        elif fault == "fill-db-disk":
            fill(arg)
    return real(self, *args, **kwargs)

ProxyEvaluator.evaluate = evaluate
sys.exit(main(sys.argv[1:]))
"""


def _config(tmp_path: Path, data_yaml: Path, name: str, **changes) -> Path:
    """The smallest search: yolov8n at 64 px, BN re-estimation only (no fine-tune epochs), no latency, 2 trials."""
    raw = {
        "name": name,
        "model": {"yaml": "yolov8n.yaml"},
        "data": str(data_yaml),
        "imgsz": 64,
        "device": "cpu",
        "space": {"ratios": {"backbone.p4": {"low": 0.1, "high": 0.5, "step": 0.1}, "neck": {"low": 0.1, "high": 0.5}}},
        "finetune": {"epochs": 0, "batch": 8, "bn_batches": 1},
        "targets": [],
        "objectives": [{"metric": "map50_95", "direction": "maximize"}],
        "constraints": [],
        "engine": {"sampler": "random", "seed": 1, "workers": {"heartbeat_s": 1, "grace_s": 2}},
        "budget": {"trials": 2},
        "output": str(tmp_path / name),
        **changes,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(*args: str, cwd: Path, fault: str | None = None, arg: Path | None = None) -> subprocess.CompletedProcess:
    command = [*CLI, *args] if fault is None else [sys.executable, "-c", DRIVER, *args]
    env = {**os.environ, "YP_FAULT": fault or "", "YP_FAULT_ARG": str(arg or "")}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _study(cfg_path: Path) -> optuna.Study:
    cfg = load_config(cfg_path)
    return optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)


def _complete(cfg_path: Path) -> dict[int, list[float]]:
    return {t.number: t.values for t in _study(cfg_path).get_trials() if t.state == TrialState.COMPLETE}


def _assert_fails_cleanly(proc: subprocess.CompletedProcess, code: int, *phrases: str) -> None:
    assert proc.returncode == code, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    for phrase in phrases:
        assert phrase in proc.stderr, (phrase, proc.stderr[-3000:])


def _half_written(folder: Path) -> list[Path]:
    """Temporary files the atomic writers left behind (none may stay: they are removed on failure)."""
    return [p for p in folder.rglob(".*") if ".tmp" in p.name]


def _resume(cfg_path: Path, before: dict[int, list[float]], cwd: Path) -> None:
    """Run the same command again: it exits 0, the trials finished before the fault are unchanged, the budget is met."""
    resumed = _run("search", str(cfg_path), "--no-progress", cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    after = _complete(cfg_path)
    assert all(after.get(n) == v for n, v in before.items()), (before, after)
    assert len(after) == 2


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(path, size, readonly=False)``: a tmpfs mounted there for the test (skipped where none can be)."""
    mounted: list[Path] = []

    def mount(path: Path, size: str, readonly: bool = False) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root (a full or read-only file system cannot be made here)")
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if readonly else "")
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?): {proc.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("command", ["search", "export"])
def test_read_only_output_folder(tmp_path, tiny_data, tmpfs, command):
    readonly = tmp_path / "readonly"
    if command == "search":
        cfg_path = _config(tmp_path, tiny_data, "ro", output=str(readonly / "out"))
        tmpfs(readonly, "1m", readonly=True)
        proc = _run("search", str(cfg_path), "--no-progress", cwd=tmp_path)
        _assert_fails_cleanly(proc, 2, f"cannot write in {readonly / 'out'}", "read-only file system", "output=DIR")
        return
    cfg_path = _config(tmp_path, tiny_data, "ro-export", budget={"trials": 1})
    assert _run("search", str(cfg_path), "--no-progress", cwd=tmp_path).returncode == 0
    tmpfs(readonly, "1m", readonly=True)
    proc = _run("export", str(cfg_path), "--epochs", "0", "--output", str(readonly), cwd=tmp_path)
    _assert_fails_cleanly(proc, 2, f"cannot write in {readonly}", "read-only file system", "--output DIR")
    assert "exporting trial 0" in proc.stdout and "export fine-tune" not in proc.stderr  # refused before any work


def test_full_disk_under_a_checkpoint(tmp_path, tiny_data, tmpfs):
    """The trials' folder fills up: the finished trial is kept (without its checkpoint), the search stops."""
    cfg_path = _config(tmp_path, tiny_data, "fullckpt")
    trials = tmpfs(tmp_path / "fullckpt" / "trials", "256k")
    proc = _run("search", str(cfg_path), "--no-progress", cwd=tmp_path)
    _assert_fails_cleanly(
        proc,
        2,
        f"cannot write {trials / 'trial_0000.pt'}",
        "no space left",
        "output=DIR",
        "Run the same command again to resume",
    )
    assert list(trials.iterdir()) == []  # neither the checkpoint nor its temporary file
    before = _complete(cfg_path)
    assert list(before) == [0]  # finished before the checkpoint write failed: stored
    subprocess.run(["mount", "-o", "remount,size=64m", str(trials)], check=True)  # the user frees space
    _resume(cfg_path, before, tmp_path)
    assert (trials / "trial_0001.pt").is_file() and not _half_written(tmp_path / "fullckpt")


def test_full_disk_under_the_database(tmp_path, tiny_data, tmpfs):
    """The database's file system fills up mid-search: a clear error; the running trial is queued again on resume."""
    folder = tmpfs(tmp_path / "dbdisk", "4m")
    cfg_path = _config(tmp_path, tiny_data, "fulldb", storage=f"sqlite:///{folder / 'study.db'}")
    proc = _run("search", str(cfg_path), "--no-progress", cwd=tmp_path, fault="fill-db-disk", arg=folder)
    _assert_fails_cleanly(proc, 2, f"cannot write the database {folder / 'study.db'}", "is full", "Free space there")
    (folder / "filler").unlink()
    before = _complete(cfg_path)
    assert list(before) == [0]
    time.sleep(2.5)  # past grace_s: the running trial's worker is known to be gone
    _resume(cfg_path, before, tmp_path)


def test_sigterm_mid_trial_stops_like_ctrl_c(tmp_path, tiny_data):
    cfg_path = _config(tmp_path, tiny_data, "term")
    armed = tmp_path / "armed"
    env = {**os.environ, "YP_FAULT": "sigterm", "YP_FAULT_ARG": str(armed)}
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, "search", str(cfg_path), "--no-progress"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not armed.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert armed.exists(), "the second trial never started"
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    _assert_fails_cleanly(subprocess.CompletedProcess(proc.args, proc.returncode, _out, err), 143,
                          "finished trials are kept; run the same command again to resume")  # fmt: skip
    trials = _study(cfg_path).get_trials()
    assert trials[0].state == TrialState.COMPLETE
    assert trials[1].state == TrialState.FAIL and trials[1].user_attrs["interrupted"]
    _resume(cfg_path, {0: trials[0].values}, tmp_path)
    retry = [t for t in _study(cfg_path).get_trials() if t.user_attrs.get("retry_of") == 1]
    assert len(retry) == 1 and retry[0].params == trials[1].params and retry[0].state == TrialState.COMPLETE


@pytest.mark.parametrize(
    ("stop", "code", "said"),
    [
        ("sigterm", 143, "terminated (SIGTERM)"),  # 128 + SIGTERM, as `timeout` and batch schedulers expect
        ("sigterm-caught", 143, "stopped: finished trials are kept"),  # a command that says what is kept itself
        ("ctrl-c", 130, "interrupted"),
        ("ctrl-c-caught", 130, "stopped: finished trials are kept"),
    ],
)
def test_exit_codes_of_sigterm_and_ctrl_c(monkeypatch, capsys, stop, code, said):
    from yoloprune import cli

    def command(args):
        try:
            if stop.startswith("sigterm"):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)  # the handler raises here
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            if not stop.endswith("caught"):
                raise
            print("stopped: finished trials are kept", file=sys.stderr)
            return 130  # as `yoloprune search` does

    monkeypatch.setattr(cli, "_cmd_stages", command)
    assert cli.main(["stages", "yolov8n.yaml"]) == code
    assert said in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the command


@pytest.mark.parametrize("fault", ["delete-db", "remove-db-folder"])
def test_database_disappears_mid_search(tmp_path, tiny_data, fault):
    """The SQLite file is deleted (or its folder removed) while a trial runs: the search stops, saves the copy this
    process still holds open and says how to put it back; after that, resuming loses no finished trial."""
    db = tmp_path / "db" / "study.db"
    cfg_path = _config(tmp_path, tiny_data, fault, storage=f"sqlite:///{db}")
    proc = _run("search", str(cfg_path), "--no-progress", cwd=tmp_path, fault=fault,
                arg=db if fault == "delete-db" else db.parent)  # fmt: skip
    _assert_fails_cleanly(proc, 2, f"the database {db} was deleted or replaced", "To resume: ", "mv '")
    copy = (db.parent if fault == "delete-db" else tmp_path / fault) / "study.db.recovered"
    assert f"saved as {copy}" in proc.stderr and copy.is_file()
    assert (tmp_path / fault / "trials" / "trial_0000.pt").is_file()  # named as kept in the message
    db.parent.mkdir(exist_ok=True)
    copy.replace(db)  # what the message says to do
    before = _complete(cfg_path)
    assert 0 in before  # the trial finished before the fault is in the recovered copy
    time.sleep(2.5)  # past grace_s, for a trial the copy holds as running
    _resume(cfg_path, before, tmp_path)


def test_a_lost_postgresql_server_says_what_is_kept_and_how_to_resume(tmp_path, tiny_data):
    """What the search says when PostgreSQL stays away past the retries (the message only: stopping a server
    mid-search costs the ~30 s of retries; tests/test_storage.py restarts one within them)."""
    from sqlalchemy.exc import OperationalError

    from yoloprune.search.database_watch import DatabaseWatch
    from yoloprune.search.trial import StorageLost

    url = "postgresql://yp:secret@127.0.0.1:9/study"
    config = load_config(_config(tmp_path, tiny_data, "pg-lost", storage=url))
    lost = StorageLost(OperationalError("UPDATE trials", {}, ConnectionRefusedError("connection refused")))
    message = str(DatabaseWatch(config).lost(lost))
    assert "postgresql://yp:***@127.0.0.1:9/study" in message and "secret" not in message
    assert "finished trials are kept" in message and "run the same command to resume" in message
    assert "grace_s (2 s)" in message


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, tmpfs):
    """The helper every final artifact goes through: a full disk fails with the file and the fix, keeps the old
    content under the final name, and leaves no temporary file."""
    from yoloprune.atomic import OutputWriteError, atomic_path, write_bytes, write_text

    disk = tmpfs(tmp_path / "small", "64k")
    card = write_text(disk / "model.card.json", '{"old": true}')
    with pytest.raises(OutputWriteError, match=r"cannot write .*model\.card\.json: no space left .*Free space there"):
        write_bytes(card, b"x" * 200_000)
    with pytest.raises(RuntimeError, match="the writer broke"), atomic_path(card) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer broke")
    assert card.read_text() == '{"old": true}' and [p.name for p in disk.iterdir()] == ["model.card.json"]
