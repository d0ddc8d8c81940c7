"""A throwaway PostgreSQL cluster on 127.0.0.1 for tests, started from the server binaries on this machine
(``.ci/run`` installs Debian's ``postgresql`` when they are missing) and stopped by its process id."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def server_bin() -> Path | None:
    """Folder holding initdb and pg_ctl, or None."""
    found = shutil.which("initdb")
    candidates = ([str(Path(found).resolve().parent)] if found else []) + sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    for folder in candidates:
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """initdb + pg_ctl start in ``root``; ``url(db)`` gives a SQLAlchemy URL; ``stop()`` kills it by pid."""

    def __init__(self, root: Path) -> None:
        bin_dir = server_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL server binaries not found")
        self.root, self.port, self.password = root, _free_port(), "yp-test-secret"
        self.data = root / "data"
        root.mkdir(parents=True, exist_ok=True)
        self._as_user = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            user = pwd.getpwnam("postgres")
            os.chown(root, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        pwfile = root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as_user:
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        # Passwords over TCP (so a wrong one is refused, as on a real server); trust on the local socket only.
        self._run([
            str(bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "--no-sync",
            "--auth-host=scram-sha-256", "--auth-local=trust", f"--pwfile={pwfile}",
        ])  # fmt: skip
        self._bin = bin_dir
        self.start()

    def start(self) -> None:
        self._run([
            str(self._bin / "pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.root / "server.log"),
            "-o", f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off",
            "start",
        ])  # fmt: skip
        self.pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])

    def _run(self, cmd: list[str]) -> None:
        subprocess.run([*self._as_user, *cmd], check=True, capture_output=True, timeout=120)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        from sqlalchemy import create_engine, text

        engine = create_engine(
            self.url().replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT"
        )
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGINT)  # "fast" shutdown: disconnects open sessions
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        os.kill(self.pid, signal.SIGKILL)
