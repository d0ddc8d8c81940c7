"""``yoloprune agent``: a small HTTP(S) service on the target device that times ONNX models it is sent.

* ``GET /health``: ``{"status": "ok", "backends": [...], "max_upload_bytes": N, "queue": N}``; with an
  ``Authorization`` header also ``"token_ok"`` (so a client learns of a wrong token before it uploads).
* ``POST /measure?spec=<JSON LatencySpec fields>&backend=onnxruntime`` with the ONNX file as the body and
  ``Authorization: Bearer <token>``: times the model on the device's runtime and answers the
  :class:`LatencyResult` as JSON.

Hardening, in the order a request meets it:

1. at most ``max_connections`` open connections (more get 503 at once), each dropped after
   ``read_timeout_s`` of silence; the TLS handshake, the request line and the headers must all arrive within
   ``read_timeout_s`` and fit in 16 KiB (431 above), so a slow or bloated client cannot hold a slot or memory;
2. path, ``Content-Length`` (411, 413), token (401) and query (400) are checked from the headers alone: a
   refused upload is never read (the connection is closed after at most 64 KiB or 2 s are drained, so the
   client can read the answer);
3. a bounded queue: one measurement runs, ``queue`` more may wait; beyond that 503 with ``Retry-After``.
   An admitted upload streams to a temporary file, never into memory, so the agent's memory does not grow
   with uploads or clients;
4. each measurement runs in a fresh child process (:mod:`.agent_worker`) that checks the file with the
   ONNX checker (nothing is unpickled) and times it; past ``timeout_s`` the child is killed and the client
   gets 504, so the device is free for the next request at once. A crash of the runtime is a 500 and the
   agent keeps serving; a client that hung up while queued is not measured.

TLS with ``certfile``/``keyfile``; every request and every refusal is logged with the client's address.
The server process imports neither torch nor ONNX Runtime, not even for ``/health`` (the backends are
probed once, in a child); the child imports only what its backend needs (``onnxruntime``: onnx, ONNX
Runtime, NumPy; ``tensorrt`` also torch, for CUDA buffers).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import math
import select
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from yoloprune.errors import ConfigError
from yoloprune.evaluators.latency.agent_worker import FILE_BACKENDS, probe_backends, run_measurement
from yoloprune.evaluators.latency.base import LatencySpec
from yoloprune.log import get_logger

LOGGER = get_logger(__name__)

#: What a refused request may still have sent of its body: drained (for at most 2 s), not read, so the
#: client sees the answer.
_DRAIN_BYTES = 64 * 1024
_DRAIN_S = 2.0
#: The request line and headers together (a measurement's are well under 1 KiB).
MAX_HEADER_BYTES = 16 * 1024
_CHUNK = 1 << 20


@dataclass(frozen=True)
class AgentLimits:
    """The agent's bounds.

    Attributes:
        max_upload_mb: largest accepted upload (413 above).
        timeout_s: longest one measurement may run before its process is killed (504).
        queue: measurements that may wait behind the running one (503 beyond).
        max_connections: open connections at once (503 beyond).
        read_timeout_s: a connection silent this long is dropped.
    """

    max_upload_mb: float = 256.0
    timeout_s: float = 900.0
    queue: int = 4
    max_connections: int = 32
    read_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_upload_mb", "timeout_s", "read_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"agent --{name.replace('_', '-')} must be positive, not {getattr(self, name)}.")
        if self.queue < 0 or self.max_connections < 1:
            raise ConfigError("agent --queue must be >= 0 and --max-connections >= 1.")


class AgentServer(ThreadingHTTPServer):
    """The agent's HTTP server; ``serve_forever()`` to run, ``shutdown()`` then ``server_close()`` to stop.

    Args:
        host, port: where to listen (port 0: any free port).
        token: the bearer token; required unless ``host`` is loopback.
        limits: see :class:`AgentLimits` (``max_upload_mb`` and ``timeout_s`` may be given directly).
        certfile, keyfile: serve HTTPS with this certificate chain and key (PEM).
    """

    daemon_threads = True

    def __init__(
        self,
        host: str,
        port: int,
        *,
        token: str | None,
        limits: AgentLimits | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        **limit_fields: Any,
    ) -> None:
        if not token and not _is_loopback(host):
            raise ConfigError(
                f"the agent listens on {host}, not loopback only: give it a --token (or YOLOPRUNE_AGENT_TOKEN)."
            )
        self.limits = limits or AgentLimits(**limit_fields)
        self.tls = _tls_context(certfile, keyfile)
        if self.tls is None and not _is_loopback(host):
            LOGGER.warning("agent: plain HTTP on %s: the token and the models travel in clear text; serve HTTPS "
                           "with --certfile/--keyfile (README: Remote devices)", host)  # fmt: skip
        super().__init__((host, port), _Handler)
        self.token = token
        self.max_upload = int(self.limits.max_upload_mb * 1e6)
        self.admitted = threading.BoundedSemaphore(self.limits.queue + 1)  # running + waiting
        self.device = threading.Lock()  # one measurement at a time
        self.connections = threading.BoundedSemaphore(self.limits.max_connections)
        self.mean_measure_s = 10.0  # for Retry-After; updated after each measurement
        self._backends: list[str] | None = None
        self._probe = threading.Lock()

    def backends(self) -> list[str]:
        """The file backends this device can run, probed once in a child process (no runtime loads here)."""
        with self._probe:
            if self._backends is None:
                self._backends = probe_backends()
            return self._backends

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.connections.acquire(blocking=False):
            LOGGER.warning("agent: %s refused: %d connections open", client_address[0], self.limits.max_connections)
            if self.tls is None:  # (a TLS client could not read a plain answer: it is only disconnected)
                _answer_busy(request, self.retry_after())
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # ThreadingMixIn's own version, with the slot freed before the socket closes: a client that
        # sees its connection end may connect again at once and find the slot free.
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.connections.release()
            self.shutdown_request(request)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(self.limits.read_timeout_s)
        if self.tls is None:
            self.RequestHandlerClass(request, client_address, self)  # type: ignore[arg-type]
            return
        deadline = _Deadline(request, self.limits.read_timeout_s)
        try:  # the handshake runs here, in the connection's thread, not in the accepting one
            wrapped = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            LOGGER.warning("agent: %s TLS handshake failed: %s", client_address[0], e)
            return
        finally:
            deadline.cancel()
        try:
            self.RequestHandlerClass(wrapped, client_address, self)  # type: ignore[arg-type]
        finally:
            wrapped.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection's failure: one log line with the client's address (a traceback only for a bug)."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # reset, broken pipe, timeout: the client's doing
            LOGGER.warning("agent: %s connection failed: %s: %s", client_address[0], type(error).__name__, error)
        else:
            LOGGER.exception("agent: %s request failed", client_address[0])

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one measurement."""
        return max(1, math.ceil(self.mean_measure_s))

    def measure(
        self, path: Path, backend: str, spec: LatencySpec, client: str, gone: Callable[[], bool]
    ) -> tuple[str, Any]:
        """Run one measurement in a child process, waiting for the device; ``(outcome, payload)``. A client
        that hung up while it waited (``gone``) is not measured."""
        with self.device:
            if gone():
                LOGGER.info("agent: %s hung up while queued; not measured", client)
                return "gone", None
            start = time.monotonic()
            outcome, payload, pid = run_measurement(path, backend, spec, self.limits.timeout_s)
            elapsed = time.monotonic() - start
        if outcome == "ok":
            self.mean_measure_s = 0.7 * self.mean_measure_s + 0.3 * elapsed
        LOGGER.info("agent: %s measurement in process %s: %s after %.1f s", client, pid, outcome, elapsed)
        return outcome, payload


class _Handler(BaseHTTPRequestHandler):
    server: AgentServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        LOGGER.info("agent: %s %s", self.client_address[0], format % args)

    def log_error(self, format: str, *args: Any) -> None:
        LOGGER.warning("agent: %s %s", self.client_address[0], format % args)

    def setup(self) -> None:
        super().setup()
        self.rfile = _CappedReader(self.rfile, MAX_HEADER_BYTES)  # type: ignore[assignment]

    def handle_one_request(self) -> None:
        """One request; its line and headers must arrive within ``read_timeout_s`` (not merely each byte)."""
        self.rfile.start_headers()  # type: ignore[attr-defined]
        self._deadline = _Deadline(self.connection, self.server.limits.read_timeout_s)
        try:
            super().handle_one_request()
        finally:
            self._deadline.cancel()

    def parse_request(self) -> bool:
        """The request line and headers (read here), then the header checks the stdlib does not make."""
        ok = super().parse_request()
        self._deadline.cancel()
        self.rfile.end_headers()  # type: ignore[attr-defined]
        if self._deadline.expired:
            self.close_connection = True
            self.log_error(
                "request headers not complete within %.0f s; disconnected", self.server.limits.read_timeout_s
            )
            return False
        if self.rfile.over:  # type: ignore[attr-defined]
            self.close_connection = True
            self.send_error(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"request headers over {MAX_HEADER_BYTES} bytes"
            )
            return False
        return ok

    def handle_expect_100(self) -> bool:
        """``Expect: 100-continue`` is answered once the request is admitted (:meth:`do_POST`), not at once:
        a client that waits for it sends no byte of a refused upload."""
        return True

    def do_GET(self) -> None:
        if urlparse(self.path).path != "/health":
            return self._reply(HTTPStatus.NOT_FOUND, {"error": "unknown path; use GET /health or POST /measure"})
        payload: dict[str, Any] = {"status": "ok", "backends": self.server.backends(),
                                   "max_upload_bytes": self.server.max_upload, "queue": self.server.limits.queue}  # fmt: skip
        if "Authorization" in self.headers:
            payload["token_ok"] = self._authorized()
        return self._reply(HTTPStatus.OK, payload)

    def do_POST(self) -> None:
        refusal = self._refusal()
        if refusal is not None:
            return self._refuse(*refusal)
        backend, spec = _parse_query(urlparse(self.path).query)
        if not self.server.admitted.acquire(blocking=False):
            return self._refuse(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"the agent's queue is full ({self.server.limits.queue} waiting); retry later",
                {"Retry-After": str(self.server.retry_after())},
            )
        try:
            with tempfile.TemporaryDirectory(prefix="yoloprune-agent-") as tmp:
                path = Path(tmp) / "model.onnx"
                if self.headers.get("Expect", "").lower() == "100-continue":
                    self.send_response_only(HTTPStatus.CONTINUE)
                    self.end_headers()
                if not self._receive(path, int(self.headers["Content-Length"])):
                    return None
                outcome, payload = self.server.measure(path, backend, spec, self.client_address[0], self._gone)
        except OSError as e:  # the device's own disk (full, read-only temp folder): say so, keep serving
            if isinstance(e, ConnectionError | TimeoutError):
                raise
            self.close_connection = True
            return self._reply(HTTPStatus.INSUFFICIENT_STORAGE, {"error": f"the agent cannot store the upload: {e}"})
        finally:
            self.server.admitted.release()
        if outcome == "gone":
            self.close_connection = True
            return None
        status = {"ok": HTTPStatus.OK, "bad": HTTPStatus.BAD_REQUEST, "timeout": HTTPStatus.GATEWAY_TIMEOUT}
        if outcome == "timeout":
            payload = f"measurement took over {self.server.limits.timeout_s} s; its process was killed"
        if outcome == "ok" and parse_qs(urlparse(self.path).query).get("times", ["0"])[0] != "1":
            payload = {k: v for k, v in payload.items() if k != "times_ms"}  # only for clients that ask
        if outcome != "ok":
            self.log_error("measurement refused or failed (%s): %s", outcome, payload)
            payload = {"error": payload}
        return self._reply(status.get(outcome, HTTPStatus.INTERNAL_SERVER_ERROR), payload)

    def _refusal(self) -> tuple[HTTPStatus, str] | None:
        """Why the request is refused, from its headers alone (None: go on)."""
        if urlparse(self.path).path != "/measure":
            return HTTPStatus.NOT_FOUND, "unknown path; use POST /measure"
        length = self.headers.get("Content-Length")
        if length is None or not (length.isascii() and length.isdigit()):
            return HTTPStatus.LENGTH_REQUIRED, "Content-Length is required"
        if int(length) > self.server.max_upload:
            return (HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"upload of {int(length)} bytes exceeds the agent's limit of {self.server.max_upload} bytes")  # fmt: skip
        if not self._authorized():
            return HTTPStatus.UNAUTHORIZED, "missing or wrong token (Authorization: Bearer ...)"
        try:
            _parse_query(urlparse(self.path).query)
        except (ValueError, TypeError) as e:
            return HTTPStatus.BAD_REQUEST, str(e)
        return None

    def _receive(self, path: Path, length: int) -> bool:
        """Stream the body to ``path``; False (answered 400) when the client sends less than announced."""
        received = 0
        with open(path, "wb") as f:
            while received < length:
                try:
                    chunk = self.rfile.read1(min(_CHUNK, length - received))
                except (TimeoutError, OSError):
                    chunk = b""
                if not chunk:
                    self.close_connection = True
                    self.log_error("upload ended after %d of %d bytes", received, length)
                    self._reply(HTTPStatus.BAD_REQUEST, {"error": f"upload ended after {received} of {length} bytes"})
                    return False
                f.write(chunk)
                received += len(chunk)
        return True

    def _authorized(self) -> bool:
        if not self.server.token:
            return True
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.server.token.encode())

    def _refuse(self, status: HTTPStatus, error: str, headers: dict[str, str] | None = None) -> None:
        """Answer without reading the body, then close: drain at most 64 KiB so the client sees the answer."""
        self.log_error("refused %s %s: %d %s", self.command, urlparse(self.path).path, status, error)
        self.close_connection = True
        self._reply(status, {"error": error}, headers)
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline, drained = time.monotonic() + _DRAIN_S, 0
            while drained < _DRAIN_BYTES and (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                chunk = self.connection.recv(min(16384, _DRAIN_BYTES - drained))
                if not chunk:
                    break
                drained += len(chunk)
        except (OSError, ValueError):
            pass

    def _gone(self) -> bool:
        """True when the client has closed its connection (checked before its measurement starts)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # a TLS socket cannot peek: taken as still there
            return False

    def _reply(self, status: HTTPStatus, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


def _answer_busy(request: socket.socket, retry_after: int) -> None:
    """A bare 503 written by the accepting thread when every connection slot is taken; what the client has
    already sent is drained without waiting, so the close does not reset the answer away."""
    body = b'{"error": "the agent has too many open connections; retry later"}'
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Retry-After: {retry_after}\r\nConnection: close\r\n\r\n")  # fmt: skip
    try:
        request.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            request.recv(_DRAIN_BYTES)
        request.settimeout(1.0)
        request.sendall(head.encode() + body)
    except OSError:
        pass


class _Deadline:
    """Shuts ``sock`` down unless cancelled within ``seconds``: a total deadline, where a socket timeout only
    bounds the silence between two bytes."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire, args=(sock,))
        self._timer.daemon = True
        self._timer.start()

    def _expire(self, sock: socket.socket) -> None:
        self.expired = True
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


class _CappedReader:
    """The connection's reader, allowing at most ``limit`` bytes for a request's line and headers."""

    def __init__(self, raw: Any, limit: int) -> None:
        self._raw, self._limit, self._used, self._capped, self.over = raw, limit, 0, False, False

    def start_headers(self) -> None:
        self._used, self._capped, self.over = 0, True, False

    def end_headers(self) -> None:
        self._capped = False

    def readline(self, size: int = -1) -> bytes:
        if not self._capped:
            return bytes(self._raw.readline(size))
        left = self._limit - self._used
        if left <= 0:
            self.over = True
            return b""
        line = bytes(self._raw.readline(left if size < 0 else min(size, left)))
        self._used += len(line)
        if self._used >= self._limit and not line.endswith(b"\n"):
            self.over = True
        return line

    def __getattr__(self, name: str) -> Any:  # read, read1, close, ...: the body is read as it is
        return getattr(self._raw, name)


def _parse_query(query: str) -> tuple[str, LatencySpec]:
    params = parse_qs(query)
    backend = params.get("backend", ["onnxruntime"])[0]
    if backend not in FILE_BACKENDS:
        raise ValueError(f"backend '{backend}' cannot run an ONNX file here; use one of {', '.join(FILE_BACKENDS)}")
    try:
        raw = json.loads(params.get("spec", ["{}"])[0])
    except json.JSONDecodeError as e:
        raise ValueError(f"spec is not JSON: {e}") from e
    known = {f.name for f in fields(LatencySpec)}
    if not isinstance(raw, dict) or set(raw) - known:
        raise ValueError(f"spec must be a JSON object with keys among {sorted(known)}")
    return backend, LatencySpec(**raw)


def _tls_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    if not certfile:
        if keyfile:
            raise ConfigError("agent --keyfile needs --certfile too (the certificate chain, PEM).")
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"cannot load the agent's TLS certificate '{certfile}'"
            f"{f' and key {keyfile!r}' if keyfile else ''}: {e}. Give PEM files (--certfile, --keyfile)."
        ) from e
    return context


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
