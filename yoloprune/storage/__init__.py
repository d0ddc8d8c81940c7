"""Storage: trials, baselines and artifacts in SQL through SQLAlchemy (issue #3)."""
