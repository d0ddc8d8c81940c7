"""Shared fixtures. Everything runs offline on tiny models built from Ultralytics YAMLs and tiny
generated datasets; ``YOLOPRUNE_HOME`` points at a per-session folder so no test reads user caches."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="yoloprune-test-home-"))
os.environ["YOLOPRUNE_HOME"] = str(_HOME)
os.environ.pop("YOLO_CONFIG_DIR", None)
os.environ.pop("YOLOPRUNE_STORAGE", None)  # a developer's own storage must not reach the tests' studies

from yoloprune.data import SyntheticSpec, generate_dataset  # noqa: E402

TINY = SyntheticSpec(n_train=24, n_val=12, imgsz=128, seed=1)
MODELS = ["yolov5nu.yaml", "yolov8n.yaml", "yolo11n.yaml"]


@pytest.fixture(scope="session")
def home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """YAML of a 24/12-image synthetic dataset at 128 px."""
    return generate_dataset(tmp_path_factory.mktemp("data") / "tiny", TINY)


@pytest.fixture(scope="session")
def plain_env(home: Path) -> dict[str, str]:
    """Environment for a fresh process that uses plain Ultralytics, offline, with no yoloprune import."""
    from yoloprune.offline import ultralytics_config_dir

    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLOPRUNE", "PYTHONPATH"))}
    env.update({"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "YOLO_CONFIG_DIR": str(ultralytics_config_dir())})
    return env


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory):
    """A throwaway PostgreSQL cluster on 127.0.0.1 (skipped, with the reason, where none can be started)."""
    from tests.pg import Cluster, server_bin

    if server_bin() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed; .ci/run installs them")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install -e '.[dev]')")
    root = Path(tempfile.mkdtemp(prefix="yoloprune-pg-"))
    cluster = Cluster(root)
    try:
        yield cluster
    finally:
        cluster.stop()


#: Skip reasons that mean a server is missing, and the package that provides it.
_SERVERS = {"PostgreSQL server binaries": "postgresql", "Chromium is not installed": "chromium chromium-driver"}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line naming the tests skipped because a server is missing, and the command that installs it."""
    missing: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        for marker, package in _SERVERS.items():
            if marker in reason:
                missing[package] = missing.get(package, 0) + 1
    if missing:
        packages = " ".join(missing)
        terminalreporter.write_line(
            f"skipped {sum(missing.values())} test(s) for want of a server ({packages}): install with "
            f"`sudo apt-get install -y {packages}`, or run `make test` as root on Debian",
            yellow=True,
        )
