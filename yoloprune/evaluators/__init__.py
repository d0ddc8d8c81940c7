"""Evaluators: the proxy evaluator (prune, fine-tune, validate) and hardware latency (issues #3, #4).

The Ultralytics-facing pieces they stand on (fine-tune, validate, BN re-estimation) are in
:mod:`yoloprune.ultra`.
"""
