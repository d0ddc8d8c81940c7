"""Evaluators: the proxy evaluator (prune, BN re-estimation, short fine-tune, validation) and, with
issue #4, hardware latency. The Ultralytics-facing pieces they stand on live in :mod:`yoloprune.ultra`."""

from yoloprune.evaluators.proxy import PHASES, ProxyEvaluator, ProxyResult

__all__ = ["PHASES", "ProxyEvaluator", "ProxyResult"]
