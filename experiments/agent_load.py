"""Load test of `yoloprune agent` on 127.0.0.1: concurrent clients, a mix of valid ONNX uploads, garbage, a
wrong token and oversized uploads, for a fixed number of rounds. Records the agent's peak RSS (the server
process alone, and with its measuring process), every status code returned, the latency of the valid
requests, that every valid measurement completed, and that the agent still serves at the end.

Hostile clients behave like a careless or malicious client: they send the whole body at once, without
``Expect: 100-continue``, so a refusal often reaches them as a reset connection (counted as ``reset``);
or 200 KB of headers; or headers at one byte a second (the agent runs with ``--read-timeout-s 10``).
Valid clients use yoloprune's remote backend, which waits out 503 answers (``Retry-After``).

    .venv/bin/python experiments/agent_load.py [--clients 50] [--valid 10] [--rounds 3] [--imgsz 64]
        [--upload-mb 20] [--agent-python .venv/bin/python] [--json outputs/agent_load.json]

Run it twice with a different number of hostile clients (--clients 20, then 50, same --valid) to see
whether the agent's memory depends on them.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

TOKEN = "load-test-token"


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                    found.append(int(entry))
            except (OSError, IndexError):
                pass
    return found


class Sampler(threading.Thread):
    """Peak RSS of the agent process, and of the agent with its children, every 20 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.stop, self.parent, self.tree = pid, threading.Event(), 0.0, 0.0

    def run(self) -> None:
        while not self.stop.is_set():
            parent = rss_mb(self.pid)
            self.parent = max(self.parent, parent)
            self.tree = max(self.tree, parent + sum(rss_mb(c) for c in children(self.pid)))
            time.sleep(0.02)


def hostile(port: int, kind: str, body: bytes, limit_bytes: int) -> str:
    """One hostile request; its status code, or what the connection did."""
    if kind in ("header flood", "slow headers"):
        return raw_headers(port, kind)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {'wrong' if kind == 'wrong token' else TOKEN}"}
    try:
        if kind == "oversized":  # announces more than the limit, then starts sending
            conn.putrequest("POST", "/measure?backend=onnxruntime")
            for key, value in {**headers, "Content-Length": str(limit_bytes + 1)}.items():
                conn.putheader(key, value)
            conn.endheaders(body[:65536])
        else:
            conn.request("POST", "/measure?backend=onnxruntime", body=body, headers=headers)
        return str(conn.getresponse().status)
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except (TimeoutError, OSError) as e:
        return type(e).__name__
    finally:
        conn.close()


def raw_headers(port: int, kind: str) -> str:
    """Headers the agent must bound: 200 KB of them, or one byte a second (never silent long enough for a
    per-read timeout)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    try:
        sock.sendall(b"POST /measure HTTP/1.1\r\n")
        if kind == "header flood":
            sock.sendall(b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(200)))
            return sock.recv(64).split(b" ")[1].decode()
        start = time.monotonic()
        while time.monotonic() - start < 120:
            sock.sendall(b"X")
            time.sleep(1.0)
        return "never cut off"
    except (ConnectionResetError, BrokenPipeError, IndexError):
        return "cut off" if kind == "slow headers" else "reset"
    finally:
        sock.close()


def valid(url: str, onnx: Path, imgsz: int) -> tuple[str, float]:
    from yoloprune.errors import EvaluatorError
    from yoloprune.evaluators.latency import LatencySpec, get_backend

    spec = LatencySpec(imgsz=imgsz, warmup=2, min_runs=10, max_runs=20, cv_target=1.0, threads=1)
    start = time.monotonic()
    try:
        get_backend("remote", url=url, token=TOKEN, timeout_s=900).measure_file(onnx, spec)
        return "200", time.monotonic() - start
    except EvaluatorError as e:
        return f"error: {e}", time.monotonic() - start


def answer(line: str) -> str:
    """``"POST 401"`` from one of the agent's request log lines."""
    request, status = line.split(' "', 1)[1].rsplit('" ', 1)
    return f"{request.split()[0]} {status.split()[0]}"


def start_agent(python: str, upload_mb: float, log: Path) -> tuple[subprocess.Popen, str]:
    command = [python, "-m", "yoloprune.cli", "agent", "--port", "0", "--token", TOKEN, "--queue", "4",
               "--max-connections", "32", "--max-upload-mb", str(upload_mb), "--timeout-s", "300",
               "--read-timeout-s", "10"]  # fmt: skip
    agent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    banner = agent.stdout.readline()  # type: ignore[union-attr]
    if " on http://" not in banner:
        raise SystemExit(f"the agent did not start: {log.read_text()[-2000:]}")
    return agent, banner.split(" on ")[1].split(" ")[0]


def run(args: argparse.Namespace) -> dict:
    from yoloprune.convert.onnx import export_onnx
    from yoloprune.ultra.models import load_detector

    work = Path(tempfile.mkdtemp(prefix="agent-load-"))
    onnx = export_onnx(load_detector("yolov8n.yaml", nc=80), work / "m.onnx", imgsz=args.imgsz)
    garbage = os.urandom(int(args.upload_mb * 1e6 * 0.9))
    log = work / "agent.log"
    agent, url = start_agent(args.agent_python, args.upload_mb, log)
    port = int(url.rsplit(":", 1)[1])
    time.sleep(1.0)
    idle = rss_mb(agent.pid)
    sampler = Sampler(agent.pid)
    sampler.start()
    outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    latencies: list[float] = []
    lock = threading.Lock()
    kinds = ["garbage", "wrong token", "oversized", "header flood", "slow headers"]

    def client(index: int) -> None:
        for round_ in range(args.rounds):
            if index < args.valid:
                status, seconds = valid(url, onnx, args.imgsz)
                kind = "valid"
            else:
                kind = kinds[(index + round_) % len(kinds)]
                status = hostile(port, kind, garbage, int(args.upload_mb * 1e6))
            with lock:
                outcomes[kind][status] += 1
                if kind == "valid" and status == "200":
                    latencies.append(seconds)

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    sampler.stop.set()
    sampler.join()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/health")
    still_serving = conn.getresponse().status == 200
    conn.close()
    alive = agent.poll() is None
    agent.terminate()
    agent.wait(30)
    lines = log.read_text().splitlines()
    served = collections.Counter(answer(line) for line in lines if 'HTTP/1.1" ' in line)
    served["503 at the connection limit"] = sum("connections open" in line for line in lines)
    served["connection failed (client reset)"] = sum("connection failed" in line for line in lines)
    served["cut off: headers not complete in time"] = sum("not complete within" in line for line in lines)
    return {
        "clients": args.clients, "valid_clients": args.valid, "rounds": args.rounds, "imgsz": args.imgsz,
        "upload_mb": args.upload_mb, "seconds": round(elapsed, 1), "idle_rss_mb": round(idle, 1),
        "peak_rss_agent_mb": round(sampler.parent, 1), "peak_rss_with_child_mb": round(sampler.tree, 1),
        "client_outcomes": {k: dict(v) for k, v in outcomes.items()}, "agent_status_codes": dict(served),
        "valid_latency_s": {"n": len(latencies), "p50": round(float(np.median(latencies)), 2) if latencies else None,
                            "max": round(max(latencies), 2) if latencies else None},
        "still_serving": still_serving, "agent_alive": alive,
        "tracebacks_in_log": log.read_text().count("Traceback"),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients in all (default 50)")
    parser.add_argument("--valid", type=int, default=10, help="of which send valid ONNX (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="requests per client (default 3)")
    parser.add_argument("--imgsz", type=int, default=64, help="the valid model's input size (default 64)")
    parser.add_argument("--upload-mb", type=float, default=20.0, help="the agent's --max-upload-mb (default 20)")
    parser.add_argument("--agent-python", default=sys.executable, help="the Python that runs the agent")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    figures = run(args)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
