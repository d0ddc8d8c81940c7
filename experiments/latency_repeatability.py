"""How repeatable are latency measurements? For yolov8n (80 classes, from YAML) and a pruned copy (uniform
0.5, round_to 8): the coefficient of variation of repeated measurements within one process, and the
spread of the pruned/base latency ratio across separate processes ("sessions"). Target: within +-3%.

    .venv/bin/python experiments/latency_repeatability.py [--backend onnxruntime] [--device cpu]
        [--imgsz 640] [--batch 1] [--sessions 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np


def one_session(backend: str, device: str, imgsz: int, batch: int, repeats: int, precision: str) -> dict:
    import tempfile
    from pathlib import Path

    from yoloprune.evaluators.latency import LatencySpec, measure_latency
    from yoloprune.pruning import find_stages, prune
    from yoloprune.ultra.models import load_detector

    base = load_detector("yolov8n.yaml").eval()
    pruned = prune(base, dict.fromkeys([s.name for s in find_stages(base) if s.prunable], 0.5), round_to=8)
    spec = LatencySpec(imgsz=imgsz, batch=batch, device=device, precision=precision)  # type: ignore[arg-type]
    out: dict[str, list[float]] = {"base": [], "pruned": [], "cv_base": [], "cv_pruned": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):  # interleaved, so drift hits both alike
            for name, model in (("base", base), ("pruned", pruned)):
                result, _ = measure_latency(model, backend, spec, workdir=Path(tmp))
                out[name].append(result.median_ms)
                out[f"cv_{name}"].append(result.cv)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--session", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.session:
        print(json.dumps(one_session(args.backend, args.device, args.imgsz, args.batch, args.repeats, args.precision)))
        return
    ratios = []
    for i in range(args.sessions):
        cmd = [sys.executable, __file__, "--session", *sys.argv[1:]]
        out = json.loads(
            subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        )
        base, pruned = np.array(out["base"]), np.array(out["pruned"])
        ratio = float(np.median(pruned) / np.median(base))
        ratios.append(ratio)
        print(
            f"session {i + 1}: base {np.median(base):.2f} ms (repeat CV {base.std(ddof=1) / base.mean():.1%}, in-run CV "
            f"{np.median(out['cv_base']):.1%}), pruned {np.median(pruned):.2f} ms (repeat CV "
            f"{pruned.std(ddof=1) / pruned.mean():.1%}), ratio {ratio:.3f}",
            flush=True,
        )
    r = np.array(ratios)
    spread = (r.max() - r.min()) / 2 / r.mean()
    print(f"pruned/base ratio across {len(r)} sessions: mean {r.mean():.3f}, +-{spread:.1%} (target +-3%): "
          f"{'OK' if spread <= 0.03 else 'OVER'}")  # fmt: skip


if __name__ == "__main__":
    main()
