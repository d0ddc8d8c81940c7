"""Search engines that sample candidates: Optuna (embedded default) and NNI (issues #3, #5)."""
