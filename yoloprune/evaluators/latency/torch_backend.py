"""PyTorch: eager on the CPU; on CUDA in fp32 or fp16, optionally replaying a captured CUDA graph (at batch 1
a big GPU is launch-bound, and graph replay is what a serving stack would do)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from yoloprune.evaluators.latency.base import LatencyBackend, LatencyResult, LatencySpec
from yoloprune.evaluators.latency.stats import time_until_stable


class TorchBackend(LatencyBackend):
    name = "torch"
    requires = "torch"

    def measure(self, model: nn.Module, spec: LatencySpec, workdir: Path) -> LatencyResult:
        net = copy.deepcopy(model).float().eval()
        fuse = getattr(net, "fuse", None)
        if callable(fuse):
            net = fuse(verbose=False)  # Conv+BN folded, as every deployment does
        on_cuda = spec.device.startswith("cuda")
        device = torch.device(spec.device if on_cuda else "cpu")
        dtype = torch.float16 if spec.precision == "fp16" and on_cuda else torch.float32
        net = net.to(device=device, dtype=dtype)
        x = torch.zeros(spec.batch, 3, spec.imgsz, spec.imgsz, device=device, dtype=dtype)
        threads = torch.get_num_threads()
        if spec.threads and not on_cuda:
            torch.set_num_threads(spec.threads)
        try:
            with torch.inference_mode():
                run_once = self._cuda_runner(net, x, spec) if on_cuda else self._cpu_runner(net, x)
                if on_cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                times = time_until_stable(run_once, spec)
        finally:
            torch.set_num_threads(threads)
        peak = torch.cuda.max_memory_allocated(device) / 1e6 if on_cuda else None
        env = {**self.environment(spec), "torch": torch.__version__,
               "device_name": torch.cuda.get_device_name(device) if on_cuda else None}  # fmt: skip
        size = sum(p.numel() * p.element_size() for p in net.parameters())
        return LatencyResult.from_times(self.name, times, peak_memory_mb=peak, model_bytes=size, env=env)

    @staticmethod
    def _cpu_runner(net: nn.Module, x: torch.Tensor) -> Callable[[], float]:
        def run_once() -> float:
            start = time.perf_counter()
            net(x)
            return (time.perf_counter() - start) * 1000

        return run_once

    @staticmethod
    def _cuda_runner(net: nn.Module, x: torch.Tensor, spec: LatencySpec) -> Callable[[], float]:
        stream = torch.cuda.Stream()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        step: Callable[[], object] = lambda: net(x)  # noqa: E731
        if spec.cuda_graph:
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm-up on a side stream before capture, as torch requires
                    net(x)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                net(x)
            step = graph.replay

        def run_once() -> float:
            with torch.cuda.stream(stream):
                start.record(stream)
                step()
                end.record(stream)
            end.synchronize()
            return float(start.elapsed_time(end))

        return run_once
