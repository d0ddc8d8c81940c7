"""The ``remote`` backend: export ONNX here, send it to ``yoloprune agent`` on the target, get the timing."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yoloprune.errors import EvaluatorError
from yoloprune.evaluators.latency.base import LatencyBackend, LatencyResult, LatencySpec

if TYPE_CHECKING:
    from torch import nn


class RemoteBackend(LatencyBackend):
    """Times models on a device running ``yoloprune agent``.

    Args:
        url: the agent, e.g. ``http://jetson.local:8765``.
        token: its token (default: ``$YOLOPRUNE_AGENT_TOKEN``).
        remote_backend: the runtime on the device: ``onnxruntime`` or ``tensorrt``.
        timeout_s: how long to wait for one measurement (upload, engine build, timing), queueing included:
            an agent whose queue is full (503) is asked again after its ``Retry-After`` until then.
        cafile: the CA certificate (PEM) that signed an ``https://`` agent's certificate (a self-signed
            certificate is its own CA); default: the system's CAs (and ``$SSL_CERT_FILE``).
    """

    name = "remote"
    requires = "a running `yoloprune agent` on the target"

    def __init__(
        self,
        url: str = "",
        token: str | None = None,
        remote_backend: str = "onnxruntime",
        timeout_s: float = 900.0,
        cafile: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get("YOLOPRUNE_AGENT_TOKEN")
        self.remote_backend = remote_backend
        self.timeout_s = timeout_s
        self.context = ssl.create_default_context(cafile=cafile) if self.url.startswith("https") else None

    def identity(self, spec: LatencySpec) -> str:
        return f"{self.url}|{self.remote_backend}"

    def measure(self, model: nn.Module, spec: LatencySpec, workdir: Path) -> LatencyResult:
        from yoloprune.convert.onnx import export_onnx

        if not self.url:
            raise EvaluatorError("the remote latency backend needs the agent's url.")
        path = export_onnx(model, Path(workdir) / "remote.onnx", imgsz=spec.imgsz, batch=spec.batch)
        if spec.precision == "int8":  # quantized here, with the device runtime's recipe: the agent only times
            from yoloprune.convert.quantize import ensure_int8

            path = ensure_int8(path, recipe="tensorrt" if self.remote_backend == "tensorrt" else "onnxruntime")
        return self.measure_file(path, spec)

    def health(self) -> dict[str, object]:
        """The agent's ``/health`` answer (raises :class:`EvaluatorError` when it cannot be reached); an agent
        with every connection taken (503) is asked again after its ``Retry-After``, for up to ``timeout_s``."""
        request = urllib.request.Request(f"{self.url}/health", headers={"Authorization": f"Bearer {self.token or ''}"})
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                with urllib.request.urlopen(request, timeout=min(self.timeout_s, 30), context=self.context) as r:
                    return dict(json.loads(r.read()))
            except urllib.error.HTTPError as e:
                wait = _retry_after(e.headers.get("Retry-After"))
                if e.code != 503 or time.monotonic() + wait > deadline:
                    raise EvaluatorError(f"agent at {self.url} answered {e.code} to /health: {e.reason}.") from e
                time.sleep(wait)
            except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
                raise EvaluatorError(f"agent at {self.url} is unreachable or timed out ({_reason(e)}).") from e

    def measure_file(self, path: Path, spec: LatencySpec) -> LatencyResult:
        health = self.health()
        size, limit = Path(path).stat().st_size, health.get("max_upload_bytes")
        if isinstance(limit, int) and size > limit:
            raise EvaluatorError(
                f"the ONNX file is {size} bytes, over the agent's upload limit of {limit}; start the agent with a "
                "larger --max-upload-mb."
            )
        if health.get("token_ok") is False:  # refused before the upload: a refused upload is never read
            raise EvaluatorError(
                f"agent at {self.url} refuses {'this' if self.token else 'a missing'} token: set the one it was "
                "started with in $YOLOPRUNE_AGENT_TOKEN (or the variable the target's token_env names)."
            )
        query = urllib.parse.urlencode({"backend": self.remote_backend, "spec": json.dumps(vars(spec)), "times": 1})
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                payload = self._post(f"{self.url}/measure?{query}", Path(path).read_bytes(), deadline)
                break
            except _Busy as busy:
                if time.monotonic() + busy.retry_after > deadline:
                    raise EvaluatorError(
                        f"agent at {self.url} stayed busy (queue full) for {self.timeout_s:.0f} s: {busy}"
                    ) from None
                time.sleep(busy.retry_after)
        payload["env"] = {**payload.get("env", {}), "agent": self.url}
        return LatencyResult.from_dict(payload)

    def _post(self, url: str, body: bytes, deadline: float) -> dict[str, Any]:
        """POST ``body`` with ``Expect: 100-continue``: the agent answers from the headers first, so a refusal
        (a full queue: 503, a wrong token: 401) arrives before any of the upload is sent."""
        try:
            status, headers, data = self._exchange(url, body, deadline)
        except (TimeoutError, OSError, http.client.HTTPException) as e:
            raise EvaluatorError(f"agent at {self.url} is unreachable or timed out ({_reason(e)}).") from e
        if status == 200:
            return dict(json.loads(data))
        detail = data.decode(errors="replace")[:500]
        if status == 503:
            raise _Busy(detail, _retry_after(headers.get("Retry-After")))
        raise EvaluatorError(f"agent at {self.url} answered {status}: {detail}")

    def _exchange(self, url: str, body: bytes, deadline: float) -> tuple[int, http.client.HTTPMessage, bytes]:
        parsed = urllib.parse.urlsplit(url)
        timeout = max(1.0, deadline - time.monotonic())
        conn: http.client.HTTPConnection = (
            http.client.HTTPSConnection(parsed.hostname or "", parsed.port, timeout=timeout, context=self.context)
            if parsed.scheme == "https"
            else http.client.HTTPConnection(parsed.hostname or "", parsed.port, timeout=timeout)
        )
        try:
            conn.putrequest("POST", f"{parsed.path}?{parsed.query}")
            for key, value in {"Content-Type": "application/octet-stream", "Content-Length": str(len(body)),
                               "Expect": "100-continue", **self._auth()}.items():  # fmt: skip
                conn.putheader(key, value)
            conn.endheaders()
            assert conn.sock is not None
            early = _interim_answer(conn.sock)
            if early is not None:  # refused from the headers: nothing was uploaded
                return early
            conn.sock.settimeout(max(1.0, deadline - time.monotonic()))
            conn.send(body)
            response = http.client.HTTPResponse(conn.sock, method="POST")
            response.begin()
            return response.status, response.headers, response.read()
        finally:
            conn.close()

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def _interim_answer(sock: Any) -> tuple[int, http.client.HTTPMessage, bytes] | None:
    """None after ``100 Continue`` (or no answer within 5 s, as from an agent that predates it: send the body
    anyway); else the agent's final answer, given before the body."""
    sock.settimeout(5.0)
    stream = sock.makefile("rb")
    try:
        line = stream.readline(65537)
    except TimeoutError:
        return None
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise http.client.BadStatusLine(line.decode(errors="replace"))
    headers = http.client.parse_headers(stream)
    if int(parts[1]) == 100:
        return None
    return int(parts[1]), headers, stream.read(int(headers.get("Content-Length") or 0))


class _Busy(Exception):
    """The agent answered 503 (queue or connections full)."""

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value or 5), 1.0), 300.0)
    except ValueError:
        return 5.0


def _reason(error: BaseException) -> str:
    """What went wrong, with a hint for a certificate the client cannot verify."""
    reason = getattr(error, "reason", error)
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"{reason}; give the agent's CA certificate as the target's cafile (a self-signed one is its own CA)"
    return str(error)
