"""The ``remote`` backend: export ONNX here, send it to ``yoloprune agent`` on the target, get the timing."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from torch import nn

from yoloprune.errors import EvaluatorError
from yoloprune.evaluators.latency.base import LatencyBackend, LatencyResult, LatencySpec


class RemoteBackend(LatencyBackend):
    """Times models on a device running ``yoloprune agent``.

    Args:
        url: the agent, e.g. ``http://jetson.local:8765``.
        token: its token (default: ``$YOLOPRUNE_AGENT_TOKEN``).
        remote_backend: the runtime on the device: ``onnxruntime`` or ``tensorrt``.
        timeout_s: how long to wait for one measurement (upload, engine build, timing).
    """

    name = "remote"
    requires = "a running `yoloprune agent` on the target"

    def __init__(
        self, url: str = "", token: str | None = None, remote_backend: str = "onnxruntime", timeout_s: float = 900.0
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get("YOLOPRUNE_AGENT_TOKEN")
        self.remote_backend = remote_backend
        self.timeout_s = timeout_s

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
        """The agent's ``/health`` answer (raises :class:`EvaluatorError` when it cannot be reached)."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=min(self.timeout_s, 30)) as response:
                return dict(json.loads(response.read()))
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
            raise EvaluatorError(f"agent at {self.url} is unreachable or timed out ({e}).") from e

    def measure_file(self, path: Path, spec: LatencySpec) -> LatencyResult:
        size, limit = Path(path).stat().st_size, self.health().get("max_upload_bytes")
        if isinstance(limit, int) and size > limit:
            raise EvaluatorError(
                f"the ONNX file is {size} bytes, over the agent's upload limit of {limit}; start the agent with a "
                "larger --max-upload-mb."
            )
        query = urllib.parse.urlencode({"backend": self.remote_backend, "spec": json.dumps(vars(spec))})
        request = urllib.request.Request(f"{self.url}/measure?{query}", data=Path(path).read_bytes(), method="POST")
        request.add_header("Content-Type", "application/octet-stream")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise EvaluatorError(f"agent at {self.url} answered {e.code}: {detail}") from e
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise EvaluatorError(f"agent at {self.url} is unreachable or timed out ({e}).") from e
        payload["env"] = {**payload.get("env", {}), "agent": self.url}
        return LatencyResult.from_dict(payload)
