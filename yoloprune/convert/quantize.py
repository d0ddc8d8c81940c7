"""INT8 post-training quantization of exported ONNX detectors into Q/DQ ONNX, with ONNX Runtime's static
quantizer (``onnxruntime.quantization.quantize_static``).

One Q/DQ file serves every INT8 runtime this project measures, each with its own recipe (an :class:`Int8Recipe`
in :data:`yoloprune.registry.INT8_RECIPES`):

* ``onnxruntime`` (the CPU execution provider): unsigned 8-bit activations with zero points, signed
  symmetric per-channel weights ("U8S8", what ONNX Runtime's x86 kernels are fastest with), every operator
  ONNX Runtime can quantize.
* ``tensorrt``: signed symmetric 8-bit activations and weights with zero points at 0 (TensorRT supports
  symmetric quantization only) on convolutions, pooling and resizing: TensorRT 10 and 11 both read such
  explicit Q/DQ networks, so neither the implicit-quantization calibrator API (deprecated since TensorRT
  10.1, gone in 11) nor TensorRT-specific tooling is needed.

Both leave the Detect head's box decoding (DFL, anchors, strides, concatenation of boxes and scores) in
floating point: boxes are pixel coordinates, which 8 bits cannot hold to a pixel.

Calibration: for a deployable model, letterboxed images from the dataset (:func:`calibration_batches`);
for latency alone, random images, because the scales change no kernel's speed.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from yoloprune.errors import EvaluatorError
from yoloprune.registry import INT8_RECIPES


@dataclass(frozen=True)
class Int8Recipe:
    """How one runtime wants its Q/DQ ONNX (an entry of :data:`yoloprune.registry.INT8_RECIPES`, under its
    ``name``); weights are always signed, symmetric and per channel.

    Attributes:
        name: the runtime.
        signed_activations: signed 8-bit activations (``QInt8``), else unsigned (``QUInt8``).
        symmetric_activations: activation zero points at 0.
        op_types: the operators Q/DQ pairs go around (None: every operator ONNX Runtime can quantize).
        no_output_quantization: operator types whose outputs get no Q/DQ (inputs only).
    """

    name: str
    signed_activations: bool
    symmetric_activations: bool
    op_types: tuple[str, ...] | None = None
    no_output_quantization: tuple[str, ...] = ()


#: ONNX Runtime's CPU execution provider: U8S8, every operator it can quantize.
ONNXRUNTIME_RECIPE = Int8Recipe("onnxruntime", signed_activations=False, symmetric_activations=False)
#: TensorRT: symmetric S8S8 on the inputs of the operators it fuses into INT8 kernels (its placement guide).
TENSORRT_RECIPE = Int8Recipe(
    "tensorrt",
    signed_activations=True,
    symmetric_activations=True,
    op_types=("Conv", "MaxPool", "Resize"),
    no_output_quantization=("Conv",),
)


def quantize_onnx(
    src: str | Path,
    dst: str | Path,
    *,
    recipe: str = "onnxruntime",
    calibration: Iterable[np.ndarray] | None = None,
    seed: int = 0,
) -> Path:
    """Write an INT8 Q/DQ copy of the float ONNX ``src`` to ``dst``.

    Args:
        src: a float ONNX detector (as :func:`yoloprune.convert.onnx.export_onnx` writes it).
        dst: where the quantized file goes.
        recipe: a name in :data:`yoloprune.registry.INT8_RECIPES`: ``onnxruntime`` or ``tensorrt`` (the
            module docstring says how they differ).
        calibration: input batches of the ONNX's input shape (NCHW float32 in [0, 1]); None: 4 random
            batches, enough for latency, not for accuracy.
        seed: the random calibration's seed.

    Raises:
        UnknownNameError: no such recipe.
        EvaluatorError: the file is not a float ONNX detector, already quantized, or calibration fails.
    """
    spec: Int8Recipe = INT8_RECIPES.get(recipe)
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    try:
        model = onnx.load(str(src))
    except Exception as e:
        raise EvaluatorError(f"'{src}' is not an ONNX file that can be read ({e}).") from e
    if is_quantized(model):
        raise EvaluatorError(f"'{src}' already holds Q/DQ nodes; give the float model to quantize.")
    input_name, shape = _static_input(model, src)
    batches = list(calibration) if calibration is not None else list(_random_batches(shape, seed))
    if not batches:
        raise EvaluatorError("no calibration batches: give at least one image.")
    for b in batches:
        if tuple(b.shape) != shape:
            raise EvaluatorError(f"a calibration batch has shape {tuple(b.shape)}; '{src}' takes {shape}.")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter({input_name: b.astype(np.float32, copy=False)} for b in batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="yoloprune-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared),
                str(dst),
                Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8 if spec.signed_activations else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=None if spec.op_types is None else list(spec.op_types),
                nodes_to_exclude=head_decode_nodes(onnx.load(str(prepared))),
                extra_options={
                    "ActivationSymmetric": spec.symmetric_activations,
                    "WeightSymmetric": True,
                    **(
                        {"OpTypesToExcludeOutputQuantization": list(spec.no_output_quantization)}
                        if spec.no_output_quantization
                        else {}
                    ),
                },
            )
        except Exception as e:
            raise EvaluatorError(f"INT8 quantization of '{src}' failed ({type(e).__name__}: {e}).") from e
    _copy_metadata(model, dst)
    return dst


def head_decode_nodes(model: object) -> list[str]:
    """Names of the Detect head's nodes that decode boxes (everything of the last ``/model.N/`` module but
    its convolution branches ``cv2``/``cv3``/``cv4``/``one2one_cv*``)."""
    nodes = model.graph.node  # type: ignore[attr-defined]
    indices = [int(m.group(1)) for n in nodes if (m := re.match(r"^/model\.(\d+)/", n.name))]
    if not indices:
        return []
    head = f"/model.{max(indices)}/"
    branch = re.compile(rf"^{re.escape(head)}(one2one_)?cv\d")
    return [n.name for n in nodes if n.name.startswith(head) and not branch.match(n.name)]


def is_quantized(model: str | Path | object) -> bool:
    """True when the ONNX model (or file) holds QuantizeLinear/DequantizeLinear nodes."""
    import onnx

    graph = (onnx.load(str(model)) if isinstance(model, (str, Path)) else model).graph  # type: ignore[attr-defined]
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)


def calibration_batches(files: Sequence[Path], *, imgsz: int, batch: int, limit: int = 64) -> list[np.ndarray]:
    """Up to ``limit`` images, preprocessed as Ultralytics' predictor does, in full batches of ``batch``."""
    from yoloprune.ultra.val import image_batches

    files = list(files)[: max(batch, limit - limit % batch)]
    if len(files) < batch:
        raise EvaluatorError(f"INT8 calibration needs at least {batch} image(s) (one batch); found {len(files)}.")
    return [b for b in image_batches(files, imgsz=imgsz, batch=batch) if len(b) == batch]


def _static_input(model: object, path: Path) -> tuple[str, tuple[int, ...]]:
    inputs = model.graph.input  # type: ignore[attr-defined]
    if len(inputs) != 1:
        raise EvaluatorError(f"'{path}' has {len(inputs)} inputs; a detector has one image input.")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in dims)
    if len(shape) != 4 or 0 in shape:
        raise EvaluatorError(f"'{path}' input {inputs[0].name} has shape {shape}; INT8 needs a static NCHW input.")
    return str(inputs[0].name), shape


def _random_batches(shape: tuple[int, ...], seed: int, count: int = 4) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield rng.random(shape, dtype=np.float32)


def _copy_metadata(source: object, dst: Path) -> None:
    """Keep Ultralytics' metadata (names, stride, imgsz...) so ``YOLO('model.int8.onnx')`` still works."""
    import onnx

    quantized = onnx.load(str(dst))
    have = {p.key for p in quantized.metadata_props}
    for prop in source.metadata_props:  # type: ignore[attr-defined]
        if prop.key not in have:
            quantized.metadata_props.add(key=prop.key, value=prop.value)
    onnx.save(quantized, str(dst))


def ensure_int8(path: str | Path, *, recipe: str) -> Path:
    """``path`` itself when it is already a Q/DQ ONNX, else an INT8 copy beside it (random calibration: for
    latency measurement, where the scales do not matter)."""
    path = Path(path)
    if is_quantized(path):
        return path
    return quantize_onnx(path, path.with_name(f"{path.stem}.int8-{recipe}.onnx"), recipe=recipe)
