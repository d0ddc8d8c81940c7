"""The agent's measuring side: each job runs in a fresh spawned process, which a timeout kills.

The server (:mod:`.agent`) imports no runtime at all; what a job needs (onnx, ONNX Runtime, TensorRT and
torch for its CUDA buffers) is imported in the child, so a crash, a leak or a hang of a runtime costs one
process, never the agent.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import asdict
from pathlib import Path
from typing import Any

from yoloprune.errors import YoloPruneError
from yoloprune.evaluators.latency.base import LatencySpec

#: Backends the agent can run a file with (they implement ``measure_file``).
FILE_BACKENDS = ("onnxruntime", "tensorrt")


def run_measurement(path: Path, backend: str, spec: LatencySpec, timeout_s: float) -> tuple[str, Any, int | None]:
    """``(outcome, payload, pid)`` of one measurement of the ONNX file at ``path``, in a spawned process.

    Outcomes: ``ok`` (the result's dict, with every run), ``bad`` (the input's fault: 400), ``error`` (the
    runtime's: 500), ``crash`` (the process died: 500), ``timeout`` (killed past ``timeout_s``: 504).
    """
    return _in_child("measure", (str(path), backend, asdict(spec)), timeout_s)


def probe_backends(timeout_s: float = 120.0) -> list[str]:
    """The file backends this device can run (checked in a child: TensorRT's check imports torch)."""
    outcome, payload, _ = _in_child("probe", (), timeout_s)
    return list(payload) if outcome == "ok" else []


def _in_child(job: str, args: tuple[Any, ...], timeout_s: float) -> tuple[str, Any, int | None]:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(sender, job, args), daemon=True)
    process.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            return "timeout", None, process.pid
        try:
            outcome, payload = receiver.recv()
        except EOFError:
            process.join(5)
            return "crash", f"the measuring process died (exit code {process.exitcode})", process.pid
        return outcome, payload, process.pid
    finally:
        if process.is_alive():
            process.kill()
        process.join(5)
        receiver.close()


def _child_main(sender: Any, job: str, args: tuple[Any, ...]) -> None:
    """The child: run ``job``, send ``(outcome, payload)`` back."""
    try:
        message: tuple[str, Any] = ("ok", _measure(*args) if job == "measure" else _probe())
    except (ValueError, YoloPruneError) as e:
        message = ("bad", str(e))
    except Exception as e:  # the runtime's failure: reported, the agent keeps serving
        message = ("error", f"{type(e).__name__}: {e}")
    sender.send(message)
    sender.close()


def _measure(path: str, backend: str, spec: dict[str, Any]) -> dict[str, Any]:
    from yoloprune.evaluators.latency.base import get_backend

    check_onnx_file(Path(path))
    result = get_backend(backend).measure_file(Path(path), LatencySpec(**spec))  # type: ignore[attr-defined]
    return dict(result.as_dict(times=True))


def _probe() -> list[str]:
    from yoloprune.registry import LATENCY_BACKENDS

    available = []
    for name in FILE_BACKENDS:
        try:
            if LATENCY_BACKENDS.get(name).available():
                available.append(name)
        except Exception:  # a broken runtime install: not available
            pass
    return available


def check_onnx_file(path: Path) -> None:
    """Raise ValueError unless ``path`` holds a model the ONNX checker accepts (nothing is unpickled)."""
    import onnx

    try:
        onnx.checker.check_model(onnx.load_model(str(path)))
    except Exception as e:
        raise ValueError(f"the upload is not a valid ONNX model ({type(e).__name__}: {str(e)[:300]})") from e
