"""Search spaces: per-stage pruning-ratio ranges and categorical knobs, loaded from YAML (issue #3)."""
