"""Plain-text rendering of pandas tables for the terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def format_table(df: pd.DataFrame) -> str:
    """``df`` as aligned text, wide enough for ratio columns, without the index."""
    import pandas as pd  # here, not at import: the CLI's light commands (`yoloprune agent`) need no pandas

    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 60):
        return df.to_string(index=False)
