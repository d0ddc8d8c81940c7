"""The latency agent over 127.0.0.1: a token round trip; refusals (401, 400, 404, 411, 413) answered from the
headers with the body unread; a bounded queue (503 + Retry-After) that the remote client waits out; a
timeout that kills the measuring process so the next request is served; bounded connections; TLS; logs
with the client's address; and an agent process that imports no torch, Ultralytics, Torch-Pruning, pandas
or SQLAlchemy."""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from yoloprune.convert.onnx import export_onnx
from yoloprune.errors import ConfigError, EvaluatorError
from yoloprune.evaluators.latency import LatencySpec, get_backend, measure_latency
from yoloprune.evaluators.latency.agent import AgentServer
from yoloprune.ultra.models import load_detector

TOKEN = "s3cret"
SPEC = LatencySpec(imgsz=64, warmup=1, min_runs=5, max_runs=10, cv_target=1.0, threads=1)
#: A measurement that never ends on its own: only the agent's timeout stops it.
ENDLESS = dataclasses.replace(SPEC, warmup=10**9)


@contextmanager
def serving(**options) -> Iterator[tuple[AgentServer, str]]:
    options = {"token": TOKEN, "max_upload_mb": 40.0, "timeout_s": 120, **options}
    server = AgentServer("127.0.0.1", 0, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"{server.scheme}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def agent():
    with serving() as (_, url):
        yield url


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    return export_onnx(load_detector("yolov8n.yaml", nc=6), tmp_path_factory.mktemp("onnx") / "m.onnx", imgsz=64)


@pytest.fixture
def agent_log():
    """The agent's log lines (the package logger does not propagate to pytest's)."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage() + (" Traceback" if r.exc_info else ""))  # type: ignore[method-assign]
    logger = logging.getLogger("yoloprune")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _post(url: str, body: bytes, token: str | None = TOKEN, spec: LatencySpec = SPEC):
    query = urllib.parse.urlencode({"backend": "onnxruntime", "spec": json.dumps(dataclasses.asdict(spec))})
    request = urllib.request.Request(f"{url}/measure?{query}", data=body, method="POST")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _announce(url: str, length: int, *, token: str | None = TOKEN, query: str = "backend=onnxruntime", sent=b""):
    """Send the headers of a ``length``-byte upload and ``sent`` of its body, then read the answer:
    ``(status, body, headers, seconds, closed)``."""
    parsed = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
    start = time.monotonic()
    conn.putrequest("POST", f"/measure?{query}")
    if token:
        conn.putheader("Authorization", f"Bearer {token}")
    conn.putheader("Content-Length", str(length))
    conn.endheaders(sent)
    response = conn.getresponse()
    status, body, headers = response.status, json.loads(response.read()), dict(response.getheaders())
    seconds = time.monotonic() - start
    closed = conn.sock is None or conn.sock.recv(1) == b""  # the agent closed the connection
    conn.close()
    return status, body, headers, seconds, closed


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
        return json.loads(r.read())["status"] == "ok"


def test_round_trip_with_token(agent, onnx_file):
    remote = get_backend("remote", url=agent, token=TOKEN)
    result = remote.measure_file(onnx_file, SPEC)
    assert result.backend == "onnxruntime" and 5 <= result.runs <= 10 and result.median_ms > 0
    assert result.env["agent"] == agent and result.env["imgsz"] == 64
    assert len(result.times_ms) == result.runs  # every run comes back, for pooling


@pytest.mark.parametrize(
    ("case", "token", "query", "length", "status", "message"),
    [
        ("no token", None, "backend=onnxruntime", 30_000_000, 401, "token"),
        ("wrong token", "wrong", "backend=onnxruntime", 30_000_000, 401, "token"),
        ("unknown backend", TOKEN, "backend=tflite", 30_000_000, 400, "cannot run an ONNX file"),
        ("bad spec", TOKEN, "spec=%7B%22bogus%22%3A1%7D", 30_000_000, 400, "spec must be"),
        ("oversized", TOKEN, "backend=onnxruntime", 50_000_000, 413, "exceeds the agent's limit"),
    ],
)
def test_refusals_come_from_the_headers_with_the_body_unread(agent, case, token, query, length, status, message):
    """A client announcing tens of MB and sending 10 bytes is answered at once, and disconnected."""
    got, body, _, seconds, closed = _announce(agent, length, token=token, query=query, sent=b"0123456789")
    assert (got, closed) == (status, True) and message in body["error"]
    assert seconds < 3  # not waiting for the body (the agent would wait read_timeout_s for it)
    assert _healthy(agent)


def test_bad_uploads_are_400_and_it_keeps_serving(agent, onnx_file):
    status, body = _post(agent, b"this is not an onnx model")
    assert status == 400 and "not a valid ONNX model" in body["error"]
    parsed = urllib.parse.urlparse(agent)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
    conn.putrequest("POST", "/measure", skip_accept_encoding=True)
    conn.putheader("Content-Length", "\u00b2".encode())  # a digit to str.isdigit, not to int()
    conn.endheaders()
    assert conn.getresponse().status == 411
    conn.close()
    status, body = _post(agent, onnx_file.read_bytes())
    assert status == 200 and "times_ms" not in body  # the runs only for a client that asks (times=1)
    status, _ = _post(agent, onnx_file.read_bytes())
    assert status == 200  # still serving real requests


def test_remote_client_names_a_refused_token_before_uploading(agent, onnx_file):
    for token in ("wrong", ""):
        with pytest.raises(EvaluatorError, match="refuses"):
            get_backend("remote", url=agent, token=token).measure_file(onnx_file, SPEC)


def test_timeout_kills_the_measurement_queue_answers_503_and_the_client_waits(onnx_file, agent_log):
    with serving(timeout_s=5, queue=0) as (server, url):
        endless = threading.Thread(target=lambda: results.append(_post(url, onnx_file.read_bytes(), spec=ENDLESS)))
        results: list[tuple[int, dict]] = []
        endless.start()
        _wait_for(lambda: server.device.locked())  # the endless measurement holds the device
        status, body, headers, seconds, closed = _announce(url, 30_000_000, sent=b"0123456789")
        assert (status, closed) == (503, True) and "queue is full" in body["error"]
        assert int(headers["Retry-After"]) >= 1 and seconds < 3
        # The remote client is told 503 + Retry-After and asks again until the agent is free.
        start = time.monotonic()
        result = get_backend("remote", url=url, token=TOKEN, timeout_s=120).measure_file(onnx_file, SPEC)
        waited = time.monotonic() - start
        endless.join(30)
        assert results[0][0] == 504 and "killed" in results[0][1]["error"]
        assert result.runs >= 5 and waited < 60
    killed = next(line for line in agent_log if "timeout" in line)
    pid = int(killed.split("in process ")[1].split(":")[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the endless measurement's process is gone: the device is free
    assert any("127.0.0.1" in line and "503" in line for line in agent_log)  # refusals logged with the address


def test_next_request_is_served_at_once_after_a_504(onnx_file):
    with serving(timeout_s=4) as (server, url):
        status, _ = _post(url, onnx_file.read_bytes(), spec=ENDLESS)
        assert status == 504 and not server.device.locked()
        start = time.monotonic()
        status, _ = _post(url, onnx_file.read_bytes(), spec=ENDLESS)  # would wait for the first if it still ran
        assert status == 504 and time.monotonic() - start < 4 + 3


def test_connections_are_bounded_and_silent_ones_dropped(agent_log):
    with serving(max_connections=2, read_timeout_s=2) as (_, url):
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        time.sleep(0.3)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/health", timeout=5)
        assert refused.value.code == 503 and refused.value.headers["Retry-After"]
        assert any("127.0.0.1 refused: 2 connections open" in line for line in agent_log)
        for sock in idle:  # silent for read_timeout_s: dropped by the agent
            sock.settimeout(10)
            assert sock.recv(1) == b""
            sock.close()
        assert _healthy(url)
        # An upload that stalls: answered 400 once the connection has been silent for read_timeout_s.
        status, body, _, seconds, closed = _announce(url, 100, sent=b"only ten b")
        assert (status, closed) == (400, True) and "upload ended after 10 of 100 bytes" in body["error"]
        assert 1.5 < seconds < 10


def test_a_reset_connection_is_one_log_line(agent, agent_log):
    import struct

    port = int(agent.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /measure HTTP/1.1\r\nContent-Length: 100000\r\nAuthorization: Bearer s3cret\r\n\r\nabc")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset, mid-upload
    _wait_for(lambda: any("connection failed" in line or "upload ended" in line for line in agent_log))
    assert not any("Traceback" in line for line in agent_log) and _healthy(agent)


def test_headers_are_bounded_in_size_and_time(agent_log):
    with serving(read_timeout_s=2) as (_, url):
        port = int(url.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET /health HTTP/1.1\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 200) for i in range(90)))
        assert b" 431 " in sock.recv(4096).split(b"\r\n")[0]  # over 16 KiB of headers, before their end
        sock.close()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        start = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        closed_after = None
        for _ in range(20):  # a header byte every 0.5 s: never silent for 2 s, yet cut off at 2 s
            time.sleep(0.5)
            try:
                sock.sendall(b"X")
                if sock.recv(1, socket.MSG_DONTWAIT) == b"":
                    closed_after = time.monotonic() - start
                    break
            except BlockingIOError:
                continue  # still open, nothing to read
            except OSError:
                closed_after = time.monotonic() - start
                break
        assert closed_after is not None and 1.5 < closed_after < 6
        sock.close()
        assert _healthy(url)
    assert any("not complete within 2 s" in line for line in agent_log)


def test_a_client_that_hangs_up_while_queued_is_not_measured(onnx_file, agent_log):
    with serving(timeout_s=4, queue=1) as (server, url):
        endless = threading.Thread(target=_post, args=(url, onnx_file.read_bytes()), kwargs={"spec": ENDLESS})
        endless.start()
        _wait_for(lambda: server.device.locked())
        body = onnx_file.read_bytes()
        port = int(url.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(f"POST /measure?backend=onnxruntime HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
        time.sleep(0.5)
        sock.close()  # gave up while the endless measurement holds the device
        endless.join(30)
        _wait_for(lambda: any("hung up while queued" in line for line in agent_log))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl (to make a self-signed certificate) is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)  # fmt: skip
    return cert, key


def test_tls(certificate, onnx_file, agent_log):
    cert, key = certificate
    with serving(certfile=str(cert), keyfile=str(key)) as (_, url):
        assert url.startswith("https://")
        result = get_backend("remote", url=url, token=TOKEN, cafile=str(cert)).measure_file(onnx_file, SPEC)
        assert result.runs >= 5
        with pytest.raises(EvaluatorError, match="cafile"):  # a client that does not trust the certificate
            get_backend("remote", url=url, token=TOKEN).health()
        with pytest.raises(EvaluatorError, match="unreachable"):  # plain HTTP to the TLS port
            get_backend("remote", url=url.replace("https", "http"), token=TOKEN, timeout_s=5).health()
        assert get_backend("remote", url=url, token=TOKEN, cafile=str(cert)).health()["status"] == "ok"
    assert any("TLS handshake failed" in line for line in agent_log)
    with pytest.raises(ConfigError, match="--certfile"):
        AgentServer("127.0.0.1", 0, token=None, keyfile=str(key))
    with pytest.raises(ConfigError, match="cannot load the agent's TLS certificate"):
        AgentServer("127.0.0.1", 0, token=None, certfile=str(key.parent / "missing.pem"))


BLOCKER = """
import importlib.abc, sys
HEAVY = {"torch", "ultralytics", "torch_pruning", "pandas", "sqlalchemy", "optuna", "pydantic", "cv2", "scipy"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"blocked: the agent must not import {name}")
sys.meta_path.insert(0, Block())
"""


def test_agent_process_imports_no_torch_and_stays_small(onnx_file, tmp_path):
    """`yoloprune agent` as an install with only the `agent` extra would run it: torch, Ultralytics,
    Torch-Pruning, pandas, SQLAlchemy, Optuna, pydantic, OpenCV and SciPy cannot be imported, in the
    agent and in its measuring processes."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    (tmp_path / "tensorrt.py").write_text("")  # as on a Jetson: TensorRT there, whose check imports torch
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "yoloprune.cli", "agent", "--port", "0", "--token", TOKEN],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        banner = proc.stdout.readline()
        assert "yoloprune agent on http://127.0.0.1:" in banner, proc.stderr.read() if proc.poll() else banner
        url = banner.split(" on ")[1].split(" ")[0]
        remote = get_backend("remote", url=url, token=TOKEN)
        assert remote.health()["backends"] == ["onnxruntime"]  # TensorRT's check failed (no torch) in a child
        result = remote.measure_file(onnx_file, SPEC)
        assert result.runs >= 5
        rss_mb = _rss_mb(proc.pid)
        assert rss_mb < 150, f"the idle agent holds {rss_mb:.0f} MB"
    finally:
        proc.terminate()
        proc.wait(10)
    assert "blocked" not in proc.stderr.read()


def test_remote_backend_in_a_cached_measurement(agent, tmp_path):
    from yoloprune.storage import Store

    model = load_detector("yolov8n.yaml", nc=6)
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    remote = get_backend("remote", url=agent, token=TOKEN)
    first, cached = measure_latency(model, remote, SPEC, store=store, workdir=tmp_path)
    again, cached_again = measure_latency(model, remote, SPEC, store=store, workdir=tmp_path)
    assert not cached and cached_again and again == first


def test_int8_remote_measurement(agent, onnx_file, tmp_path):
    """The search side sends a Q/DQ ONNX; a float upload with an int8 spec is quantized by the agent."""
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


def test_upload_over_the_limit_is_refused_before_sending(onnx_file):
    with serving(token=None, max_upload_mb=1.0) as (_, url):
        remote = get_backend("remote", url=url, token="")
        with pytest.raises(EvaluatorError, match="over the agent's upload limit"):
            remote.measure_file(onnx_file, SPEC)


def test_unreachable_agent_is_a_clear_error(onnx_file):
    remote = get_backend("remote", url="http://127.0.0.1:9", token=TOKEN, timeout_s=5)
    with pytest.raises(EvaluatorError, match="unreachable"):
        remote.measure_file(onnx_file, SPEC)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="give it a --token"):
        AgentServer("0.0.0.0", 0, token=None)
    with pytest.raises(ConfigError, match="--queue"):
        AgentServer("127.0.0.1", 0, token=None, queue=-1)
    with pytest.raises(ConfigError, match="--timeout-s must be positive"):
        AgentServer("127.0.0.1", 0, token=None, timeout_s=0)


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
