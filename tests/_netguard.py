"""Imported first by test subprocesses: every network touch is recorded, refused, and written to
``$NETGUARD_LOG`` at exit, so a test can fail on any attempt even when the caller swallowed the error."""

import atexit
import json
import os
import socket
import subprocess

ATTEMPTS: list[str] = []
_NET_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def _refuse(what: str) -> OSError:
    ATTEMPTS.append(what)
    return OSError(f"network disabled by test: {what}")


def _resolver(name):
    def deny(*args, **kwargs):
        raise _refuse(f"{name}{args[:2]}")

    return deny


for _name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "create_connection"):
    setattr(socket, _name, _resolver(_name))

_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def _guarded(orig):
    def connect(self, address):
        if self.family in _NET_FAMILIES:
            raise _refuse(f"connect{address}")
        return orig(self, address)

    return connect


socket.socket.connect = _guarded(_connect)
socket.socket.connect_ex = _guarded(_connect_ex)

_popen_init = subprocess.Popen.__init__


def _popen(self, args, *a, **k):
    text = " ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args)
    if any(word in text for word in ("pip", "curl", "wget", "git ")):
        ATTEMPTS.append(f"subprocess {text}")
    return _popen_init(self, args, *a, **k)


subprocess.Popen.__init__ = _popen


@atexit.register
def _write() -> None:
    log = os.environ.get("NETGUARD_LOG")
    if log:
        with open(log, "w") as f:
            json.dump(ATTEMPTS, f)
