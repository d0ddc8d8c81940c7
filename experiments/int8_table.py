"""What does INT8 add to pruning? Two measurements, both on this machine's CPU with ONNX Runtime:

1. Latency: yolov8n (80 classes, from YAML) and a pruned copy (uniform 0.5, round_to 8) at fp32 and INT8
   (the ``onnxruntime`` Q/DQ recipe), each measured ``--repeats`` times interleaved; median of medians and
   the ratio to the fp32 base.
2. Accuracy: the demo's trained base (its dataset, 256 px) exported to ONNX, quantized with both recipes
   calibrated on 64 training images, and validated by Ultralytics: mAP50-95 of float vs INT8 files. The
   ``tensorrt`` recipe's file is run by ONNX Runtime here (no TensorRT in this workplace), which checks its
   accuracy, not its speed.
3. With ``--recipe-variants`` (only): why the ``onnxruntime`` recipe is what it is. yolov8n quantized with
   signed or unsigned activations, on every operator or on convolutions only, timed by ONNX Runtime on this
   CPU against fp32, with the seconds each quantization took.

    .venv/bin/python experiments/int8_table.py [--imgsz 640] [--repeats 3]
    .venv/bin/python experiments/int8_table.py --recipe-variants [--imgsz 320]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from yoloprune.tables import format_table


def latency_table(imgsz: int, repeats: int, workdir: Path) -> pd.DataFrame:
    from yoloprune.evaluators.latency import LatencySpec, measure_latency
    from yoloprune.pruning import find_stages, measure_costs, prune
    from yoloprune.ultra.models import load_detector

    base = load_detector("yolov8n.yaml").eval()
    pruned = prune(base, dict.fromkeys([s.name for s in find_stages(base) if s.prunable], 0.5), round_to=8)
    times: dict[tuple[str, str], list[float]] = {}
    sizes: dict[tuple[str, str], int] = {}
    for _ in range(repeats):
        for name, model in (("base", base), ("pruned 0.5", pruned)):
            for precision in ("fp32", "int8"):
                spec = LatencySpec(imgsz=imgsz, precision=precision)  # type: ignore[arg-type]
                result, _ = measure_latency(model, "onnxruntime", spec, workdir=workdir)
                times.setdefault((name, precision), []).append(result.median_ms)
                sizes[(name, precision)] = result.model_bytes or 0
    reference = float(np.median(times[("base", "fp32")]))
    rows = []
    for (name, precision), ms in times.items():
        model = base if name == "base" else pruned
        rows.append({
            "model": name, "precision": precision, "GFLOPs": measure_costs(model, imgsz).gflops,
            "ONNX MB": sizes[(name, precision)] / 1e6, "median ms": float(np.median(ms)),
            "vs fp32 base": float(np.median(ms)) / reference,
        })  # fmt: skip
    return pd.DataFrame(rows)


def accuracy_table(workdir: Path) -> pd.DataFrame:
    from yoloprune.convert.onnx import export_onnx
    from yoloprune.convert.quantize import calibration_batches, quantize_onnx
    from yoloprune.data.check import inspect_dataset
    from yoloprune.experiment.builtin import FULL, base_model_path, demo_dataset
    from yoloprune.offline import ultralytics_quiet
    from yoloprune.ultra.models import load_detector
    from yoloprune.ultra.val import train_images, validate

    info = inspect_dataset(demo_dataset(FULL))
    model = load_detector(base_model_path(FULL)).eval()
    src = export_onnx(model, workdir / "demo-base.onnx", imgsz=FULL.imgsz)
    calibration = calibration_batches(train_images(info), imgsz=FULL.imgsz, batch=1, limit=64)
    files = {"fp32": src}
    for recipe in ("onnxruntime", "tensorrt"):
        files[f"int8 ({recipe} recipe)"] = quantize_onnx(
            src, workdir / f"demo-base.{recipe}.onnx", recipe=recipe, calibration=calibration
        )
    rows = []
    with ultralytics_quiet():
        torch_val = validate(model, info, imgsz=FULL.imgsz, batch=1)
        rows.append({"file": "torch module", "mAP50": torch_val.map50, "mAP50-95": torch_val.map50_95})
        for name, path in files.items():
            val = validate(path, info, imgsz=FULL.imgsz, batch=1)
            rows.append({"file": name, "mAP50": val.map50, "mAP50-95": val.map50_95})
    frame = pd.DataFrame(rows)
    fp32 = float(frame.loc[frame["file"] == "fp32", "mAP50-95"].iloc[0])
    frame["drop vs fp32 ONNX"] = (fp32 - frame["mAP50-95"]) / fp32
    return frame


def recipe_table(imgsz: int, workdir: Path) -> pd.DataFrame:
    import time

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from yoloprune.convert.onnx import export_onnx
    from yoloprune.convert.quantize import head_decode_nodes, quantize_onnx
    from yoloprune.evaluators.latency import LatencySpec, get_backend
    from yoloprune.ultra.models import load_detector

    src = export_onnx(load_detector("yolov8n.yaml").eval(), workdir / "v8n.onnx", imgsz=imgsz)
    prepared = workdir / "v8n.prepared.onnx"
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
    exclude = head_decode_nodes(onnx.load(str(prepared)))
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"images": x}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    variants = {  # (activations, symmetric activations, operators); the shipped recipes are quantize_onnx's
        "S8S8 symmetric, all operators": (QuantType.QInt8, True, None),
        "U8S8, Conv only": (QuantType.QUInt8, False, ["Conv"]),
    }
    files: dict[str, Path] = {"fp32 (no quantization)": src}
    seconds: dict[str, float] = {}
    for name, (activations, symmetric, ops) in variants.items():
        start = time.perf_counter()
        quantize_static(
            str(prepared), str(workdir / f"{name}.onnx"), Reader(), quant_format=QuantFormat.QDQ,
            activation_type=activations, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=ops,
            nodes_to_exclude=exclude, extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
        )  # fmt: skip
        seconds[name], files[name] = time.perf_counter() - start, workdir / f"{name}.onnx"
    for recipe in ("onnxruntime", "tensorrt"):
        name = f"shipped {recipe} recipe"
        start = time.perf_counter()
        files[name] = quantize_onnx(src, workdir / f"{recipe}.onnx", recipe=recipe)
        seconds[name] = time.perf_counter() - start
    runner = get_backend("onnxruntime")
    spec = LatencySpec(imgsz=imgsz, precision="int8")
    reference = runner.measure_file(src, LatencySpec(imgsz=imgsz)).median_ms  # type: ignore[attr-defined]
    rows = []
    for name, path in files.items():
        ms = reference if path == src else runner.measure_file(path, spec).median_ms  # type: ignore[attr-defined]
        rows.append({"variant": name, "quantize s": seconds.get(name), "median ms": ms, "vs fp32": ms / reference})
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-accuracy", action="store_true", help="latency only (no demo base needed)")
    p.add_argument("--recipe-variants", action="store_true", help="only the recipe comparison (part 3)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="yoloprune-int8-") as tmp:
        if args.recipe_variants:
            print(format_table(recipe_table(args.imgsz, Path(tmp))))
            return
        print(format_table(latency_table(args.imgsz, args.repeats, Path(tmp))), flush=True)
        if not args.skip_accuracy:
            print(format_table(accuracy_table(Path(tmp))))


if __name__ == "__main__":
    main()
