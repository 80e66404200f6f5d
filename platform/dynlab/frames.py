"""Small DataFrame helpers shared by tracking and steps (kept apart so neither imports the other)."""

from __future__ import annotations

import pandas as pd


def scalar_columns(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` without its list-valued columns (thresholds, exit fractions), for CSV."""
    listy = [c for c in df.columns if len(df) and df[c].map(lambda v: hasattr(v, "__len__") and not isinstance(v, str)).any()]
    return df.drop(columns=listy)
