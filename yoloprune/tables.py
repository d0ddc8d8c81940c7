"""Plain-text rendering of pandas tables for the terminal."""

from __future__ import annotations

import pandas as pd


def format_table(df: pd.DataFrame) -> str:
    """``df`` as aligned text, wide enough for ratio columns, without the index."""
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 60):
        return df.to_string(index=False)
