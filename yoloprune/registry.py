"""One registry pattern for everything a config names: ``register``, ``names()``, ``get()`` with did-you-mean.

Each registry below lists its built-in entries by import path (``"module:attribute"``), so the config checks
a name (:meth:`Registry.check`) without importing torch, Torch-Pruning or an optional runtime; the entry is
imported on first :meth:`Registry.get`. A new entry is one line here, or a decorator on the object::

    from yoloprune.registry import LATENCY_BACKENDS

    @LATENCY_BACKENDS.register("mine")
    class MyBackend(LatencyBackend): ...

The contract tests parametrize over each registry's :meth:`~Registry.names`, so a new entry is tested
without anyone adding it to a test (``tests/test_registries.py``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

from yoloprune.errors import ConfigError, did_you_mean

T = TypeVar("T")


class UnknownNameError(ConfigError, ValueError):
    """A name no registry entry has (a ValueError too, so config validation reports it at its key)."""


class Registry(Generic[T]):
    """Named entries of one kind, built-ins listed lazily by import path.

    Args:
        kind: what an entry is, for messages (``"latency backend"``).
        builtins: ``{name: "module:attribute"}``, imported on first use.
    """

    def __init__(self, kind: str, builtins: dict[str, str] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = dict(builtins or {})

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj: Any = None) -> Any:
        """Add (or replace) ``name``: ``register(name, obj)``, or ``@register(name)`` as a decorator."""
        if obj is not None:
            self._entries[name] = obj
            return obj

        def decorate(target: T) -> T:
            self._entries[name] = target
            return target

        return decorate

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def check(self, name: str) -> str:
        """``name`` if registered, else an :class:`UnknownNameError` naming the closest and every valid one."""
        if name not in self._entries:
            known = self.names()
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'.{did_you_mean(name, known)} Known: {', '.join(known)}."
            )
        return name

    def get(self, name: str) -> T:
        """The entry registered as ``name`` (imported now if it was listed by path)."""
        entry = self._entries[self.check(name)]
        if isinstance(entry, str):
            module, _, attribute = entry.partition(":")
            entry = getattr(importlib.import_module(module), attribute)
            self._entries[name] = entry
        return entry


#: Latency backends (``targets[].backend``): classes of :class:`yoloprune.evaluators.latency.base.LatencyBackend`.
LATENCY_BACKENDS: Registry[Any] = Registry(
    "latency backend",
    {
        "onnxruntime": "yoloprune.evaluators.latency.onnxruntime_backend:OnnxRuntimeBackend",
        "remote": "yoloprune.evaluators.latency.remote:RemoteBackend",
        "tensorrt": "yoloprune.evaluators.latency.tensorrt_backend:TensorRTBackend",
        "torch": "yoloprune.evaluators.latency.torch_backend:TorchBackend",
    },
)

#: Channel-importance criteria (``space.importance``): factories of Torch-Pruning importances.
IMPORTANCES: Registry[Any] = Registry(
    "importance",
    {
        "l1": "yoloprune.pruning.prune:l1_importance",
        "l2": "yoloprune.pruning.prune:l2_importance",
        "bn_scale": "yoloprune.pruning.prune:bn_scale_importance",
        "random": "yoloprune.pruning.prune:random_importance",
    },
)

#: Search methods (``engine.sampler``): :class:`yoloprune.search.methods.Method` objects. A method whose
#: ``samples`` is true has an Optuna sampler of the same name in :data:`SAMPLERS`.
SEARCH_METHODS: Registry[Any] = Registry(
    "search method",
    {
        "tpe": "yoloprune.search.methods:TPE",
        "cmaes": "yoloprune.search.methods:CMAES",
        "nsga2": "yoloprune.search.methods:NSGA2",
        "random": "yoloprune.search.methods:RANDOM",
        "grid": "yoloprune.search.methods:GRID",
        "uniform": "yoloprune.search.methods:UNIFORM",
        "tp_global": "yoloprune.search.methods:TP_GLOBAL",
        "sensitivity": "yoloprune.search.methods:SENSITIVITY",
    },
)

#: Optuna samplers of the sampling search methods: factories ``(engine, space, seed, target_values) ->
#: optuna.samplers.BaseSampler`` (:func:`yoloprune.search.optuna_engine.make_sampler`).
SAMPLERS: Registry[Any] = Registry(
    "sampler",
    {
        "tpe": "yoloprune.search.optuna_engine:tpe_sampler",
        "cmaes": "yoloprune.search.optuna_engine:cmaes_sampler",
        "nsga2": "yoloprune.search.optuna_engine:nsga2_sampler",
        "random": "yoloprune.search.optuna_engine:random_sampler",
        "grid": "yoloprune.search.optuna_engine:grid_sampler",
    },
)

#: Trial pruners on the per-epoch mAP (``engine.pruner``): factories ``(engine, epochs) ->
#: optuna.pruners.BasePruner | None`` (:func:`yoloprune.search.optuna_engine.make_pruner`).
PRUNERS: Registry[Any] = Registry(
    "pruner",
    {
        "none": "yoloprune.search.optuna_engine:no_pruner",
        "median": "yoloprune.search.optuna_engine:median_pruner",
        "successive_halving": "yoloprune.search.optuna_engine:successive_halving_pruner",
        "hyperband": "yoloprune.search.optuna_engine:hyperband_pruner",
    },
)

#: Tuners ``yoloprune nni`` gives NNI (``engine.nni.tuner``): :class:`yoloprune.search.nni_engine.NniTuner`.
NNI_TUNERS: Registry[Any] = Registry(
    "NNI tuner",
    {
        "tpe": "yoloprune.search.nni_engine:TPE_TUNER",
        "evolution": "yoloprune.search.nni_engine:EVOLUTION_TUNER",
        "random": "yoloprune.search.nni_engine:RANDOM_TUNER",
        "optuna": "yoloprune.search.nni_engine:OPTUNA_TUNER",
    },
)

#: INT8 quantization recipes, one per runtime (``quantize_onnx(recipe=...)``):
#: :class:`yoloprune.convert.quantize.Int8Recipe`.
INT8_RECIPES: Registry[Any] = Registry(
    "INT8 recipe",
    {
        "onnxruntime": "yoloprune.convert.quantize:ONNXRUNTIME_RECIPE",
        "tensorrt": "yoloprune.convert.quantize:TENSORRT_RECIPE",
    },
)
