"""yoloprune's own tables in SQLite: experiments, baselines, artifacts; clear errors for bad URLs."""

from __future__ import annotations

import hashlib
import os
import socket

import pytest

from yoloprune.errors import BackendUnavailableError, StorageError, YoloPruneError
from yoloprune.storage import Store


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """The same storage tests on SQLite and on a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sub' / 'db.sqlite'}"
    return request.getfixturevalue("postgres").create_database(f"t_{tmp_path.name[-20:].lower().replace('-', '_')}")


def test_experiments_baselines_artifacts(tmp_path, url):
    store = Store(url)
    a = store.experiment_id("exp", {"v": 1})
    assert store.experiment_id("exp", {"v": 2}) == a and store.find_experiment("exp") == a
    assert store.find_experiment("other") is None
    assert store.baseline(a, "k") is None
    store.save_baseline(a, "k", {"map50_95": 0.5, "per_class": {"cat": 0.4}})
    assert store.baseline(a, "k") == {"map50_95": 0.5, "per_class": {"cat": 0.4}}
    assert store.latest_baseline(a)["map50_95"] == 0.5
    f = tmp_path / "w.pt"
    f.write_bytes(b"weights")
    store.add_artifact(a, "proxy_checkpoint", f, trial_number=3)
    [art] = store.artifacts(a)
    assert art["sha256"] == hashlib.sha256(b"weights").hexdigest() and art["bytes"] == 7 and art["trial"] == 3
    # A second Store on the same file sees the same rows (a resumed run).
    assert Store(store.url).baseline(a, "k") is not None


def test_duplicate_baseline_is_a_storage_error(url):
    store = Store(url)
    a = store.experiment_id("exp", {})
    store.save_baseline(a, "k", {})
    with pytest.raises(StorageError, match="IntegrityError"):
        store.save_baseline(a, "k", {})


def test_workers_starting_together_share_one_experiment_row(url):
    """Workers launched at once race to create the tables, the experiment and the same latency: none fails."""
    import threading

    def start(barrier, name, ids, errors):
        try:
            barrier.wait()
            store = Store(url)
            ids.append(store.experiment_id(name, {"name": name}))
            store.save_latency(name, {"median_ms": 1.0})
        except Exception as e:  # collected: an assert in a thread would not fail the test
            errors.append(e)

    workers = 6
    for round_ in range(5):
        barrier, name, ids, errors = threading.Barrier(workers), f"exp{round_}", [], []
        threads = [threading.Thread(target=start, args=(barrier, name, ids, errors)) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(ids) == workers and len(set(ids)) == 1, (errors, ids)
        assert Store(url).latency(name) == {"median_ms": 1.0}


def test_bad_urls():
    with pytest.raises(StorageError, match="not a database URL"):
        Store("not a url")
    with pytest.raises(BackendUnavailableError, match="no database driver"):
        Store("nosuchdb://host/db")
    with pytest.raises(YoloPruneError, match="postgres"):
        Store("postgresql://user:pw@127.0.0.1:9/db")  # no driver, or nothing listening on port 9


def test_an_older_schema_is_refused_with_the_command_and_upgraded_in_place(url):
    """A database made by schema version 1 (no yp_meta, no yp_workers) keeps its rows through `db upgrade`."""
    from sqlalchemy import insert

    from yoloprune.cli import main
    from yoloprune.storage.db import SCHEMA_VERSION, Base, ExperimentRow, engine_for, schema_version

    engine = engine_for(url)
    v1 = [Base.metadata.tables[t] for t in ("yp_experiments", "yp_baselines", "yp_artifacts", "yp_latency")]
    Base.metadata.create_all(engine, tables=v1)
    with engine.begin() as conn:
        conn.execute(insert(ExperimentRow).values(name="old", config={}, schema_version=1))
    assert schema_version(engine) == 1
    with pytest.raises(StorageError, match=r"schema version 1; .*yoloprune db upgrade --storage"):
        Store(url)
    assert main(["db", "check", "--storage", url]) == 1
    assert main(["db", "upgrade", "--storage", url]) == 0
    assert schema_version(engine) == SCHEMA_VERSION and main(["db", "check", "--storage", url]) == 0
    store = Store(url)
    exp = store.find_experiment("old")
    assert exp is not None  # nothing lost
    worker = store.register_worker(exp)
    store.update_worker(worker, trials=3, state="done")
    assert store.workers(exp)[0] | {"started_at": None, "last_seen": None} == {
        "id": worker, "host": socket.gethostname(), "pid": os.getpid(), "state": "done", "trials": 3,
        "started_at": None, "last_seen": None,
    }  # fmt: skip


def test_a_newer_schema_is_refused(url):
    from sqlalchemy import text

    store = Store(url)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE yp_meta SET value = '99' WHERE key = 'schema_version'"))
    with pytest.raises(StorageError, match="newer than this yoloprune"):
        Store(url)


def test_lock_is_exclusive_across_processes(url, tmp_path):
    """Two processes take the same named lock; their critical sections never overlap."""
    import subprocess
    import sys
    import textwrap

    log = tmp_path / "log.txt"
    script = textwrap.dedent(f"""
        import time, sys
        from yoloprune.storage import Store
        store = Store({url!r})
        with store.lock("baseline:1:k"):
            with open({str(log)!r}, "a") as f:
                f.write("in " + sys.argv[1] + "\\n")
            time.sleep(1.0)
            with open({str(log)!r}, "a") as f:
                f.write("out " + sys.argv[1] + "\\n")
    """)
    Store(url)  # create the tables first
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)]) for i in range(2)]
    assert all(p.wait(120) == 0 for p in procs)
    lines = log.read_text().split()
    pairs = list(zip(lines[0::2], lines[1::2]))
    assert len(pairs) == 4 and pairs[0][1] == pairs[1][1] and pairs[2][1] == pairs[3][1]
    assert [p[0] for p in pairs] == ["in", "out", "in", "out"]


def test_wrong_password_and_unreachable_server_say_how_to_fix(postgres):
    bad = postgres.url().replace(postgres.password, "wrong")
    with pytest.raises(StorageError, match=r"password authentication failed.*psql -h 127\.0\.0\.1"):
        Store(bad)
    with pytest.raises(YoloPruneError, match=r"pg_isready -h 127\.0\.0\.1 -p 9"):
        Store("postgresql://postgres:x@127.0.0.1:9/db")


def test_storage_survives_a_database_restart(postgres):
    """A PostgreSQL restart while a worker runs: its next calls wait and succeed (retried with backoff)."""
    import threading
    import time

    from yoloprune.storage.optuna_adapter import rdb_storage

    url = postgres.create_database("restart")
    store = Store(url)
    exp = store.experiment_id("exp", {})
    storage = rdb_storage(url)
    storage.get_all_studies()
    postgres.stop()
    restart = threading.Timer(2.0, postgres.start)
    restart.start()
    try:
        t0 = time.monotonic()
        assert store.find_experiment("exp") == exp
        assert storage.get_all_studies() == []
        assert time.monotonic() - t0 >= 1.5  # it really waited for the server
    finally:
        restart.join()


_HOLD = """
import os, sys, time
from pathlib import Path
from yoloprune.storage import Store
url, ready, release, orphan = sys.argv[1:5]
with Store(url).lock("held"):
    if orphan == "1" and os.fork() != 0:
        os._exit(0)  # the recorded holder exits; its child keeps the lock (file or database session) held
    Path(ready).touch()
    deadline = time.monotonic() + 120
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if orphan == "1":
        os._exit(0)
"""


def _holder(url, tmp_path, *, orphan: bool = False):
    """A process holding lock 'held' until ``release`` exists (the lock is taken when ``ready`` does). ``orphan``:
    the process that took the lock (and named itself its holder) exits, a child it forked keeps holding it."""
    import subprocess
    import sys
    import time

    ready, release = tmp_path / "ready", tmp_path / "release"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, url, str(ready), str(release), "1" if orphan else "0"])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() in (None, 0) if orphan else proc.poll() is None, "the holder did not take the lock"
        assert time.monotonic() < deadline, "the holder did not take the lock"
        time.sleep(0.05)
    if orphan:
        assert proc.wait(60) == 0
    return proc, release


def test_a_lock_wait_times_out_naming_a_holder_that_is_gone(url, tmp_path):
    """A holder that cannot be shown alive (its recorded pid runs no more): the waiter gives up after the timeout,
    and its error names that process (host, pid, since when) and what to do."""
    import time

    Store(url)  # create the tables first
    proc, release = _holder(url, tmp_path, orphan=True)
    try:
        store = Store(url, lock_timeout_s=0.5)
        t0 = time.monotonic()
        with pytest.raises(StorageError) as error, store.lock("held"):
            pytest.fail("the lock is held by another process")
        assert 0.4 < time.monotonic() - t0 < 15
        message = str(error.value)
        holder = f"pid {proc.pid} on host {socket.gethostname()} (no such process runs now) since "
        assert f"lock 'held' after 0.5 s: it is held by {holder}" in message, message
        assert "cannot be shown to run any more" in message and "YOLOPRUNE_LOCK_TIMEOUT_S" in message
        if url.startswith("sqlite"):
            assert f"delete {url.removeprefix('sqlite:///')}." in message and ".lock" in message
        else:
            assert "pg_terminate_backend(" in message and "***" in message and "yp-test-secret" not in message
        with store.lock("other", timeout_s=0.5):  # another name is free
            pass
    finally:
        release.touch()
    with store.lock("held", timeout_s=10):  # released: taken as soon as the child exits
        pass


def test_a_lock_wait_outlasts_its_timeout_while_the_holder_runs(url, tmp_path, caplog, monkeypatch):
    """A holder that provably runs (a long baseline evaluation) is waited for past the timeout, with a notice now
    and then; only the hard cap ends such a wait, naming the holder."""
    import threading
    import time

    from yoloprune.storage import locks

    Store(url)
    proc, release = _holder(url, tmp_path)
    try:
        capped = Store(url, lock_timeout_s=0.2, lock_max_wait_s=1.5)
        t0 = time.monotonic()
        with pytest.raises(StorageError) as error, capped.lock("held"):
            pytest.fail("the lock is held by another process")
        assert 1.4 < time.monotonic() - t0 < 15
        message = str(error.value)
        assert f"after 1.5 s: it is held by pid {proc.pid} on host {socket.gethostname()} since " in message
        assert "still runs" in message and "YOLOPRUNE_LOCK_MAX_WAIT_S" in message
        timer = threading.Timer(3.0, release.touch)
        timer.start()
        caplog.set_level("INFO", logger="yoloprune")
        monkeypatch.setattr(locks, "NOTICE_S", 1.0)
        try:
            t0 = time.monotonic()
            with Store(url, lock_timeout_s=0.3).lock("held"):  # the holder runs: no timeout, taken once released
                waited = time.monotonic() - t0
        finally:
            timer.join()
        assert waited > 2.5
        assert "still waiting for lock 'held'" in caplog.text and f"held by pid {proc.pid} " in caplog.text
    finally:
        release.touch()
        assert proc.wait(60) == 0


def test_a_killed_holder_frees_the_lock(url, tmp_path):
    """The OS (SQLite's lock file) or the server (PostgreSQL's session) frees a lock whose holder was killed."""
    proc, _ = _holder(url, tmp_path)
    proc.kill()
    proc.wait(60)
    with Store(url, lock_timeout_s=10).lock("held"):
        pass


def test_the_lock_timeout_comes_from_the_environment(url, monkeypatch):
    from yoloprune.errors import ConfigError
    from yoloprune.storage.locks import LOCK_TIMEOUT_S

    assert Store(url).lock_timeout_s == LOCK_TIMEOUT_S
    monkeypatch.setenv("YOLOPRUNE_LOCK_TIMEOUT_S", "5")
    assert Store(url).lock_timeout_s == 5.0 and Store(url, lock_timeout_s=2).lock_timeout_s == 2.0
    monkeypatch.setenv("YOLOPRUNE_LOCK_MAX_WAIT_S", "7200")
    assert Store(url).lock_max_wait_s == 7200.0 and Store(url, lock_max_wait_s=9).lock_max_wait_s == 9.0
    monkeypatch.setenv("YOLOPRUNE_LOCK_TIMEOUT_S", "soon")
    with pytest.raises(ConfigError, match=r"YOLOPRUNE_LOCK_TIMEOUT_S='soon' is not a number of seconds"):
        Store(url)


def test_a_lock_lost_with_its_database_session_is_left_without_an_error(postgres):
    """A restart while a lock is held ends its session, and the server releases the lock: leaving the block
    must not fail the work done inside it."""
    url = postgres.create_database("lost_lock")
    store = Store(url, lock_timeout_s=5)
    with store.lock("held"):
        postgres.stop()
        postgres.start()
    with store.lock("held"):  # free again
        pass


def test_an_interrupt_while_a_lock_is_taken_or_released_leaves_no_lock_held(postgres, monkeypatch):
    """Ctrl-C just after ``pg_try_advisory_lock`` succeeded, or during the release: the connection (whose session
    would hold the lock) is discarded, not returned to the pool, so no session holds the lock afterwards."""
    import time

    from sqlalchemy import create_engine, text

    from yoloprune.storage import locks

    url = postgres.create_database("interrupted_lock")
    store = Store(url, lock_timeout_s=5)
    observer = create_engine(url)

    def held() -> int:
        with observer.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")).scalar()

    def no_lock_soon() -> bool:  # a discarded session ends a moment after its socket closes
        deadline = time.monotonic() + 10
        while held() and time.monotonic() < deadline:
            time.sleep(0.05)
        return held() == 0

    real_me = locks.Holder.me

    def interrupted_me():
        raise KeyboardInterrupt  # lands between the lock's grant and the block that releases it

    monkeypatch.setattr(locks.Holder, "me", staticmethod(interrupted_me))
    with pytest.raises(KeyboardInterrupt), store.lock("held"):
        pytest.fail("not reached")
    monkeypatch.setattr(locks.Holder, "me", staticmethod(real_me))
    assert no_lock_soon()

    real_execute = locks.Connection.execute

    def interrupted_unlock(self, statement, *args, **kwargs):
        if "pg_advisory_unlock" in str(statement):
            raise KeyboardInterrupt
        return real_execute(self, statement, *args, **kwargs)

    with pytest.raises(KeyboardInterrupt), store.lock("held"):
        assert held() == 1
        monkeypatch.setattr(locks.Connection, "execute", interrupted_unlock)
    monkeypatch.setattr(locks.Connection, "execute", real_execute)
    assert no_lock_soon()
    with store.lock("held", timeout_s=0):  # and this process takes it at once
        pass
    observer.dispose()
