"""The latency-backend extension point: a small ABC (registered in :data:`yoloprune.registry.LATENCY_BACKENDS`),
and the measurement records."""

from __future__ import annotations

import abc
import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from yoloprune.errors import BackendUnavailableError
from yoloprune.registry import LATENCY_BACKENDS

if TYPE_CHECKING:
    from torch import nn

Precision = Literal["fp32", "fp16", "int8"]


@dataclass(frozen=True)
class LatencySpec:
    """How to measure.

    Attributes:
        imgsz: square input side.
        batch: batch size.
        device: ``cpu`` or ``cuda`` (``cuda:N``).
        precision: ``fp32``, ``fp16`` or ``int8`` (what the backend supports).
        warmup: untimed runs first.
        min_runs: timed runs at least.
        max_runs: timed runs at most.
        cv_target: stop once the coefficient of variation of the timed runs is below this.
        threads: intra-op threads on the CPU (None: the runtime's default).
        cuda_graph: replay a captured CUDA graph (torch backend on CUDA).
    """

    imgsz: int = 640
    batch: int = 1
    device: str = "cpu"
    precision: Precision = "fp32"
    warmup: int = 10
    min_runs: int = 20
    max_runs: int = 300
    cv_target: float = 0.05
    threads: int | None = None
    cuda_graph: bool = True

    def key(self) -> str:
        """Everything about the measurement that changes its result."""
        d = asdict(self)
        for k in ("warmup", "min_runs", "max_runs", "cv_target"):
            d.pop(k)
        return json.dumps(d, sort_keys=True)


@dataclass(frozen=True)
class LatencyResult:
    """Statistics of one measurement, in milliseconds per batch; ``times_ms`` holds every timed run (for
    pooling several measurements: percentiles of a pool are not the median of percentiles)."""

    backend: str
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    cv: float
    runs: int
    peak_memory_mb: float | None
    model_bytes: int | None
    env: dict[str, Any] = field(default_factory=dict)
    times_ms: list[float] = field(default_factory=list, compare=False, repr=False)

    def as_dict(self, times: bool = True) -> dict[str, Any]:
        """The record as JSON-able values; ``times=False`` leaves out the runs (what caches and trials store)."""
        d = asdict(self)
        if not times:
            d.pop("times_ms")
        return d

    @classmethod
    def from_times(
        cls,
        backend: str,
        times: list[float],
        *,
        peak_memory_mb: float | None,
        model_bytes: int | None,
        env: dict[str, Any],
    ) -> LatencyResult:
        """Statistics of the timed runs (milliseconds each)."""
        from yoloprune.evaluators.latency.stats import summarize

        s = summarize(times)
        return cls(backend, s["median_ms"], s["p90_ms"], s["p99_ms"], s["mean_ms"], s["cv"], int(s["runs"]),
                   peak_memory_mb, model_bytes, env, [float(t) for t in times])  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyResult:
        """The record from :meth:`as_dict`; keys a newer yoloprune (an agent, a cache) added are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class LatencyBackend(abc.ABC):
    """Measures the latency of a model on one runtime. Subclasses are registered in
    :data:`yoloprune.registry.LATENCY_BACKENDS` (``@LATENCY_BACKENDS.register("name")``) under their ``name``."""

    #: registry name, e.g. ``onnxruntime``
    name: ClassVar[str]
    #: the pip extra (or package) that provides the runtime, named in errors
    requires: ClassVar[str] = ""

    @classmethod
    def available(cls) -> bool:
        """True when the runtime can be imported here."""
        return True

    @abc.abstractmethod
    def measure(self, model: nn.Module, spec: LatencySpec, workdir: Path) -> LatencyResult:
        """Time ``model`` (a DetectionModel) as this runtime runs it; ``workdir`` may hold exported files."""

    def identity(self, spec: LatencySpec) -> str:
        """The machine and device a measurement is valid for (part of the cache key)."""
        device = spec.device
        if device.startswith("cuda"):
            import torch

            device = torch.cuda.get_device_name(torch.device(device))
        return f"{platform.node()}|{device}"

    def environment(self, spec: LatencySpec) -> dict[str, Any]:
        """What the measurement ran on (device, versions, precision, batch, image size)."""
        return {"backend": self.name, "machine": platform.machine(), "processor": platform.processor() or None,
                **json.loads(spec.key())}  # fmt: skip


def importable(*modules: str) -> bool:
    """True when every named module imports (for backends' ``available``)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def get_backend(name: str, **options: Any) -> LatencyBackend:
    """An instance of the backend registered as ``name`` in :data:`yoloprune.registry.LATENCY_BACKENDS`
    (``options`` go to its constructor); clear errors for unknown or unavailable ones."""
    cls: type[LatencyBackend] = LATENCY_BACKENDS.get(name)
    if not cls.available():
        raise BackendUnavailableError(f"latency backend '{name}' needs {cls.requires}, which is not installed here.")
    return cls(**options)


def architecture_signature(model: nn.Module) -> str:
    """A hash of every parameter's and buffer's name and shape: equal for the same pruned architecture."""
    parts = [(n, list(t.shape)) for n, t in model.state_dict().items()]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]
