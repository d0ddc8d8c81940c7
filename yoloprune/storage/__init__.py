"""Storage: trials live in Optuna's RDB storage; baselines, experiments and artifacts in yoloprune's own
SQLAlchemy tables in the same database (SQLite by default; PostgreSQL when workers share a search)."""

from yoloprune.storage.db import Store, engine_for, file_sha256, normalize_url

__all__ = ["Store", "engine_for", "file_sha256", "normalize_url"]
