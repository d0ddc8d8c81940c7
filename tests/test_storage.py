"""yoloprune's own tables in SQLite: experiments, baselines, artifacts; clear errors for bad URLs."""

from __future__ import annotations

import hashlib

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


def test_bad_urls():
    with pytest.raises(StorageError, match="not a database URL"):
        Store("not a url")
    with pytest.raises(BackendUnavailableError, match="no database driver"):
        Store("nosuchdb://host/db")
    with pytest.raises(YoloPruneError, match="postgres"):
        Store("postgresql://user:pw@127.0.0.1:9/db")  # no driver, or nothing listening on port 9
