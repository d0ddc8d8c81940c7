"""Search engines that sample candidates (Optuna, the embedded default; NNI in issue #5), the objectives,
constraints and reward they optimise, and the results they leave in storage."""
