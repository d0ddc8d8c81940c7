"""The latency agent over 127.0.0.1: a token round trip, 401, 400, 413, and it keeps serving after each;
the remote backend in a search-like measurement; an unreachable agent is a clear error."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest

from yoloprune.convert.onnx import export_onnx
from yoloprune.errors import ConfigError, EvaluatorError
from yoloprune.evaluators.latency import LatencySpec, get_backend, measure_latency
from yoloprune.evaluators.latency.agent import AgentServer
from yoloprune.ultra.models import load_detector

TOKEN = "s3cret"
SPEC = LatencySpec(imgsz=64, warmup=1, min_runs=5, max_runs=10, cv_target=1.0, threads=1)


@pytest.fixture(scope="module")
def agent():
    server = AgentServer("127.0.0.1", 0, token=TOKEN, max_upload_mb=40.0, timeout_s=120)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    return export_onnx(load_detector("yolov8n.yaml", nc=6), tmp_path_factory.mktemp("onnx") / "m.onnx", imgsz=64)


def _post(url: str, body: bytes, token: str | None = TOKEN, query: str = "backend=onnxruntime&spec=%7B%7D"):
    request = urllib.request.Request(f"{url}/measure?{query}", data=body, method="POST")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _oversized(url: str, length: int):
    parsed = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    conn.putrequest("POST", "/measure?backend=onnxruntime")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Content-Length", str(length))
    conn.endheaders()
    response = conn.getresponse()
    status, body = response.status, json.loads(response.read())
    conn.close()
    return status, body


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
        return json.loads(r.read())["status"] == "ok"


def test_round_trip_with_token(agent, onnx_file):
    remote = get_backend("remote", url=agent, token=TOKEN)
    result = remote.measure_file(onnx_file, SPEC)
    assert result.backend == "onnxruntime" and 5 <= result.runs <= 10 and result.median_ms > 0
    assert result.env["agent"] == agent and result.env["imgsz"] == 64


def test_bad_token_garbage_and_oversized_uploads(agent, onnx_file):
    status, body = _post(agent, onnx_file.read_bytes(), token="wrong")
    assert status == 401 and "token" in body["error"]
    assert _healthy(agent)
    status, body = _post(agent, b"this is not an onnx model")
    assert status == 400 and "not a valid ONNX model" in body["error"]
    assert _healthy(agent)
    status, body = _oversized(agent, 50_000_000)  # headers only: the agent answers before any body is sent
    assert status == 413 and "exceeds the agent's limit" in body["error"]
    assert _healthy(agent)
    status, body = _post(agent, onnx_file.read_bytes(), query="backend=onnxruntime&spec=%7B%22bogus%22%3A1%7D")
    assert status == 400 and "spec must be" in body["error"]
    status, _ = _post(agent, onnx_file.read_bytes())
    assert status == 200  # still serving real requests


def test_int8_remote_measurement(agent, onnx_file, tmp_path):
    """The search side sends a Q/DQ ONNX; a float upload with an int8 spec is quantized by the agent."""
    import dataclasses

    from yoloprune.convert.quantize import is_quantized

    int8 = dataclasses.replace(SPEC, precision="int8")
    remote = get_backend("remote", url=agent, token=TOKEN)
    sent: list[bool] = []
    original = type(remote).measure_file
    remote.measure_file = lambda path, spec: sent.append(is_quantized(path)) or original(remote, path, spec)  # type: ignore[method-assign]
    result = remote.measure(load_detector("yolov8n.yaml", nc=6), int8, tmp_path)
    assert sent == [True] and result.env["int8_qdq"] and result.env["precision"] == "int8"
    float_upload = get_backend("remote", url=agent, token=TOKEN).measure_file(onnx_file, int8)
    assert float_upload.env["int8_qdq"] and float_upload.model_bytes < onnx_file.stat().st_size / 2.5


def test_remote_backend_in_a_cached_measurement(agent, tmp_path):
    from yoloprune.storage import Store

    model = load_detector("yolov8n.yaml", nc=6)
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    remote = get_backend("remote", url=agent, token=TOKEN)
    first, cached = measure_latency(model, remote, SPEC, store=store, workdir=tmp_path)
    again, cached_again = measure_latency(model, remote, SPEC, store=store, workdir=tmp_path)
    assert not cached and cached_again and again == first


def test_upload_over_the_limit_is_refused_before_sending(onnx_file):
    server = AgentServer("127.0.0.1", 0, token=None, max_upload_mb=1.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        remote = get_backend("remote", url=f"http://127.0.0.1:{server.server_address[1]}", token="")
        with pytest.raises(EvaluatorError, match="over the agent's upload limit"):
            remote.measure_file(onnx_file, SPEC)
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_agent_is_a_clear_error(onnx_file):
    remote = get_backend("remote", url="http://127.0.0.1:9", token=TOKEN, timeout_s=5)
    with pytest.raises(EvaluatorError, match="unreachable"):
        remote.measure_file(onnx_file, SPEC)


def test_token_required_off_loopback():
    with pytest.raises(ConfigError, match="give it a --token"):
        AgentServer("0.0.0.0", 0, token=None)
