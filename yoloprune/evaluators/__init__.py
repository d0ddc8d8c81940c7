"""Evaluators: the proxy evaluator (prune, BN re-estimation, short fine-tune, validation) and hardware
latency (:mod:`.latency`). The Ultralytics-facing pieces they stand on live in :mod:`yoloprune.ultra`.

The proxy's names load on first use, so that the latency agent (:mod:`.latency.agent`) imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from yoloprune.evaluators.proxy import PHASES, ProxyEvaluator, ProxyResult

__all__ = ["PHASES", "ProxyEvaluator", "ProxyResult"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from yoloprune.evaluators import proxy

    return getattr(proxy, name)
