"""Search spaces: per-stage pruning-ratio ranges and categorical knobs, loaded from YAML."""

from yoloprune.spaces.space import Candidate, RatioRange, SearchSpace

__all__ = ["Candidate", "RatioRange", "SearchSpace"]
