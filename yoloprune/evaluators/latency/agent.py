"""``yoloprune agent``: a small HTTP service on the target device that times ONNX models it is sent.

* ``GET /health``: ``{"status": "ok", "backends": [...], "max_upload_bytes": N}``.
* ``POST /measure?spec=<JSON LatencySpec fields>&backend=onnxruntime`` with the ONNX file as the body and
  ``Authorization: Bearer <token>``: builds or loads the model on the device's runtime, times it, and
  answers the :class:`LatencyResult` as JSON.

It never unpickles anything (ONNX only, checked with the ONNX checker); uploads are size-limited (413);
a token is required unless it listens on loopback only (401 on a wrong one); one measurement runs at a
time, others queue, and each has a timeout (504). Bad input gets 400 with a message; it keeps serving.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import fields
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from yoloprune.errors import ConfigError, YoloPruneError
from yoloprune.evaluators.latency.base import LatencySpec, get_backend
from yoloprune.log import get_logger

LOGGER = get_logger(__name__)

#: Backends the agent can run a file with (they implement ``measure_file``).
FILE_BACKENDS = ("onnxruntime", "tensorrt")


class AgentServer(ThreadingHTTPServer):
    """The agent's HTTP server; ``serve_forever()`` to run, ``shutdown()`` to stop."""

    daemon_threads = True

    def __init__(
        self, host: str, port: int, *, token: str | None, max_upload_mb: float = 256.0, timeout_s: float = 600.0
    ) -> None:
        if not token and not _is_loopback(host):
            raise ConfigError(
                f"the agent listens on {host}, not loopback only: give it a --token (or YOLOPRUNE_AGENT_TOKEN)."
            )
        super().__init__((host, port), _Handler)
        self.token = token
        self.max_upload = int(max_upload_mb * 1e6)
        self.timeout_s = timeout_s
        self.worker = ThreadPoolExecutor(max_workers=1)  # one measurement at a time; the rest queue
        self.lock = threading.Lock()

    def server_close(self) -> None:
        super().server_close()
        self.worker.shutdown(wait=False, cancel_futures=True)


class _Handler(BaseHTTPRequestHandler):
    server: AgentServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        LOGGER.info("agent: %s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        if urlparse(self.path).path != "/health":
            return self._reply(HTTPStatus.NOT_FOUND, {"error": "unknown path; use GET /health or POST /measure"})
        available = []
        for name in FILE_BACKENDS:
            try:
                get_backend(name)
                available.append(name)
            except YoloPruneError:
                pass
        return self._reply(
            HTTPStatus.OK, {"status": "ok", "backends": available, "max_upload_bytes": self.server.max_upload}
        )

    def do_POST(self) -> None:
        url = urlparse(self.path)
        if url.path != "/measure":
            return self._reply(HTTPStatus.NOT_FOUND, {"error": "unknown path; use POST /measure"})
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length is required"})
        if int(length) > self.server.max_upload:
            self.close_connection = True  # the body is not read
            return self._reply(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {"error": f"upload of {int(length)} bytes exceeds the agent's limit of {self.server.max_upload} bytes"},
            )
        body = self.rfile.read(int(length))  # read even when refusing, so the client can read the answer
        if not self._authorized():
            return self._reply(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong token (Authorization: Bearer ...)"})
        try:
            backend, spec = _parse_query(url.query)
            _check_onnx_bytes(body)
        except (ValueError, TypeError) as e:
            return self._reply(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        future = self.server.worker.submit(_measure, body, backend, spec)
        try:
            result = future.result(timeout=self.server.timeout_s)
        except FutureTimeout:
            future.cancel()
            return self._reply(
                HTTPStatus.GATEWAY_TIMEOUT, {"error": f"measurement took over {self.server.timeout_s} s"}
            )
        except YoloPruneError as e:
            return self._reply(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except Exception as e:  # a runtime failure must not take the agent down
            LOGGER.exception("agent: measurement failed")
            return self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})
        return self._reply(HTTPStatus.OK, result)

    def _authorized(self) -> bool:
        if not self.server.token:
            return True
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.server.token.encode())

    def _reply(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


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


def _check_onnx_bytes(body: bytes) -> None:
    import onnx

    try:
        model = onnx.load_model_from_string(body)
        onnx.checker.check_model(model)
    except Exception as e:
        raise ValueError(f"the upload is not a valid ONNX model ({type(e).__name__}: {str(e)[:300]})") from e


def _measure(body: bytes, backend: str, spec: LatencySpec) -> dict[str, Any]:
    runner = get_backend(backend)
    with tempfile.TemporaryDirectory(prefix="yoloprune-agent-") as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(body)
        result = runner.measure_file(path, spec)  # type: ignore[attr-defined]
    return result.as_dict()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
