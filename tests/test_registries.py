"""The one registry pattern (``register``, ``names()``, ``get()`` with did-you-mean), and a contract test per
registry over its ``names()``: a new entry is tested here without anyone adding it to a test."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from yoloprune.config import EngineConfig, config_from_dict
from yoloprune.errors import ConfigError
from yoloprune.registry import (
    IMPORTANCES,
    INT8_RECIPES,
    LATENCY_BACKENDS,
    NNI_TUNERS,
    PRUNERS,
    SAMPLERS,
    SEARCH_METHODS,
    Registry,
    UnknownNameError,
)

MINIMAL: dict[str, Any] = {
    "name": "t",
    "model": "yolov8n.yaml",
    "data": "data.yaml",
    "space": {"ratios": {"neck": {"low": 0.1, "high": 0.4}, "backbone.p5": {"low": 0.2, "high": 0.5, "step": 0.1}}},
    "cost_target": {"metric": "flops_reduction", "value": [0.3, 0.5]},
    "objectives": [{"metric": "map50_95", "direction": "maximize"}],  # single-objective: every method takes it
}

# --- the generic registry ------------------------------------------------------------------------------


def test_register_as_a_call_and_as_a_decorator_in_registration_order():
    things: Registry[object] = Registry("thing")
    first = object()
    assert things.register("b", first) is first

    @things.register("a")
    def second() -> None: ...

    assert things.names() == ("b", "a")
    assert things.get("b") is first and things.get("a") is second
    assert "a" in things and "c" not in things
    replacement = object()
    things.register("b", replacement)  # replaces, keeps its place
    assert things.names() == ("b", "a") and things.get("b") is replacement


def test_check_names_the_closest_and_every_known_entry():
    things: Registry[int] = Registry("thing")
    things.register("alpha", 1)
    things.register("beta", 2)
    assert things.check("beta") == "beta"
    with pytest.raises(UnknownNameError, match=r"unknown thing 'alpah'\. Did you mean 'alpha'\? Known: alpha, beta\."):
        things.check("alpah")
    with pytest.raises(UnknownNameError) as info:
        things.get("zzz")
    assert "Did you mean" not in str(info.value) and "Known: alpha, beta" in str(info.value)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


def test_builtins_are_imported_on_first_get_only(tmp_path, monkeypatch):
    module = "yoloprune_registry_probe"
    (tmp_path / f"{module}.py").write_text("VALUE = object()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    things: Registry[object] = Registry("thing", {"probe": f"{module}:VALUE"})
    assert things.names() == ("probe",) and "probe" in things and things.check("probe") == "probe"
    assert module not in sys.modules  # naming and checking import nothing
    value = things.get("probe")
    assert module in sys.modules and value is sys.modules[module].VALUE
    assert things.get("probe") is value  # imported once, then kept


def test_names_and_checks_need_no_ml_stack():
    """Config validation reads every registry's names without importing torch or Torch-Pruning."""
    code = """
import sys
from yoloprune import registry
from yoloprune.config import config_from_dict
from yoloprune.errors import ConfigError
raw = {"name": "t", "model": "yolov8n.yaml", "data": "data.yaml",
       "space": {"ratios": {"neck": 0.3}, "importance": ["l1", "bn_scale"]},
       "engine": {"sampler": "nsga2", "pruner": "median", "nni": {"tuner": "optuna"}},
       "targets": [{"name": "cpu", "backend": "torch"}, {"name": "dev", "backend": "remote", "url": "http://x"}]}
config_from_dict(raw)
try:
    config_from_dict({**raw, "engine": {"sampler": "tpee"}})
except ConfigError:
    pass
for r in vars(registry).values():
    if isinstance(r, registry.Registry):
        [r.check(n) for n in r.names()]
print(",".join(m for m in ("torch", "torch_pruning") if m in sys.modules))
"""
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"checking names loads {loaded}"


# --- config keys name the closest entry -----------------------------------------------------------------


def _with(key: str, value: str) -> dict[str, Any]:
    if key == "space.importance":
        return {**MINIMAL, "space": {**MINIMAL["space"], "importance": value}}
    if key == "targets[].backend":
        return {
            **MINIMAL,
            "targets": [{"name": "a", "backend": value, **({"url": "http://x"} if value == "remote" else {})}],
        }
    *sections, field = key.split(".")
    nested: dict[str, Any] = {field: value}
    for section in reversed(sections[1:]):
        nested = {section: nested}
    return {**MINIMAL, sections[0]: nested}


KEYS = {  # config key -> its registry, and a typo with the entry it should suggest
    "engine.sampler": (SEARCH_METHODS, "tpee", "tpe"),
    "engine.pruner": (PRUNERS, "mediam", "median"),
    "engine.nni.tuner": (NNI_TUNERS, "evolutoin", "evolution"),
    "space.importance": (IMPORTANCES, "bn_scal", "bn_scale"),
    "targets[].backend": (LATENCY_BACKENDS, "onnxruntim", "onnxruntime"),
}


@pytest.mark.parametrize("key", KEYS)
def test_config_keys_name_the_closest_registry_entry(key):
    registry, typo, closest = KEYS[key]
    shown = key.replace("[]", ".0")
    with pytest.raises(ConfigError, match=rf"{shown}: unknown {registry.kind} '{typo}'\. Did you mean '{closest}'\?"):
        config_from_dict(_with(key, typo))


@pytest.mark.parametrize(("key", "name"), [(k, n) for k, (r, _, _) in KEYS.items() for n in r.names()])
def test_config_keys_accept_every_registered_name(key, name):
    config_from_dict(_with(key, name))


# --- one contract per registry, over its names() --------------------------------------------------------


@pytest.mark.parametrize("name", LATENCY_BACKENDS.names())
def test_latency_backend_contract(name):
    from yoloprune.evaluators.latency.base import LatencyBackend

    cls = LATENCY_BACKENDS.get(name)
    assert isinstance(cls, type) and issubclass(cls, LatencyBackend)
    assert cls.name == name
    assert isinstance(cls.available(), bool)
    assert isinstance(cls.requires, str) and cls.requires


@pytest.mark.parametrize("name", IMPORTANCES.names())
def test_importance_contract(name):
    import torch_pruning as tp

    assert isinstance(IMPORTANCES.get(name)(), tp.importance.Importance)


@pytest.mark.parametrize("name", SEARCH_METHODS.names())
def test_search_method_contract(name):
    from yoloprune.search.methods import Method, get_method

    method = SEARCH_METHODS.get(name)
    assert isinstance(method, Method) and get_method(name) is method
    assert method.name == name and method.summary and callable(method.family)
    assert isinstance(method.samples, bool) and isinstance(method.global_ranking, bool)
    assert method.samples == (name in SAMPLERS)  # a sampling method has its Optuna sampler, and only those


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_sampler_contract(name):
    import optuna

    from yoloprune.search.methods import TARGET_PARAM
    from yoloprune.search.optuna_engine import make_sampler

    config = config_from_dict({**MINIMAL, "engine": {"sampler": name}})
    sampler = SAMPLERS.get(name)(config.engine, config.space, 3, config.cost_target.values)
    assert isinstance(sampler, optuna.samplers.BaseSampler)
    assert type(make_sampler(config.engine, config.space, 0, config.cost_target.values)) is type(sampler)
    if isinstance(sampler, optuna.samplers.GridSampler):  # the grid spans every target value too
        assert TARGET_PARAM in sampler._search_space


@pytest.mark.parametrize("name", [n for n in SEARCH_METHODS.names() if n not in SAMPLERS])
def test_methods_without_a_sampler_get_the_random_one(name):
    import optuna

    from yoloprune.search.optuna_engine import make_sampler

    config = config_from_dict({**MINIMAL, "engine": {"sampler": name}})
    assert type(make_sampler(config.engine, config.space)) is optuna.samplers.RandomSampler


@pytest.mark.parametrize("name", PRUNERS.names())
def test_pruner_contract(name):
    import optuna

    from yoloprune.search.optuna_engine import make_pruner

    engine = EngineConfig(pruner=name)
    pruner = PRUNERS.get(name)(engine, 9)
    assert pruner is None or isinstance(pruner, optuna.pruners.BasePruner)
    assert type(make_pruner(engine, 9)) is type(pruner)
    assert make_pruner(engine, 1) is None  # one epoch: nothing to compare
    assert (pruner is None) == (name == "none")


@pytest.mark.parametrize("name", NNI_TUNERS.names())
def test_nni_tuner_contract(name):
    from yoloprune.search.nni_engine import NniTuner

    tuner = NNI_TUNERS.get(name)
    assert isinstance(tuner, NniTuner) and tuner.algorithm
    if tuner.custom:  # the class NNI imports from this checkout
        module, _, attribute = tuner.algorithm.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), attribute), type)
        assert not (tuner.seeded or tuner.population)
    else:
        assert "." not in tuner.algorithm  # one of NNI's built-in tuner names


def _tiny_onnx(path: Path) -> Path:
    """Conv -> Relu -> MaxPool on a static 1x3x16x16 input: quantizable by every recipe."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["images", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["out"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="names", value="{0: 'a'}")
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("name", INT8_RECIPES.names())
def test_int8_recipe_contract(name, tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from yoloprune.convert.quantize import Int8Recipe, is_quantized, quantize_onnx

    recipe = INT8_RECIPES.get(name)
    assert isinstance(recipe, Int8Recipe) and recipe.name == name
    assert recipe.op_types is None or (recipe.op_types and all(isinstance(o, str) for o in recipe.op_types))
    assert recipe.op_types is None or set(recipe.no_output_quantization) <= set(recipe.op_types)

    path = quantize_onnx(_tiny_onnx(tmp_path / "tiny.onnx"), tmp_path / f"{name}.onnx", recipe=name)
    model = onnx.load(str(path))
    assert is_quantized(model) and {p.key for p in model.metadata_props} >= {"names"}
    initializers = {i.name: i for i in model.graph.initializer}
    activation_zero_points = [
        numpy_helper.to_array(initializers[n.input[2]])
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[0] not in initializers
    ]
    assert activation_zero_points
    for z in activation_zero_points:
        assert z.dtype == (np.int8 if recipe.signed_activations else np.uint8)
        assert not recipe.symmetric_activations or not z.any()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((1, 3, 16, 16), dtype=np.float32)
    assert session.run(None, {"images": x})[0].shape == (1, 4, 8, 8)
