"""What the page's live line plots are sent. Gradio's LinePlot builds its Vega chart once, from the first
value it gets (the axis types and the colour domain of the series), and afterwards only swaps the data.
So a plot first drawn from an empty frame kept reading numbers as categories, and a series missing from
that first value (the first validation loss, a trend line) got no colour: its line was not drawn.

Hence two rules for every live plot: typed columns, also when empty; and every series it can ever show
present from the first value on, as a placeholder row with no numbers (Vega skips such rows when it
draws and scales). Plots whose series are not known in advance (one per sweep candidate) colour by a
number instead, which needs no list of names."""

from __future__ import annotations

import pandas as pd


def typed_frame(rows, columns: dict) -> pd.DataFrame:
    """A plot's frame with typed columns, also when empty (an empty object column reads as categories)."""
    return pd.DataFrame(list(rows), columns=list(columns)).astype(columns)


def with_series(rows: list, columns: dict, series: list[str]) -> pd.DataFrame:
    """rows (tuples whose last item is the series name) with one empty placeholder row per name in
    `series` put first, so the chart knows every series, and its colour, from its first value on.
    The numeric columns must be float: the placeholders hold NaN."""
    blanks = [tuple([float("nan")] * (len(columns) - 1) + [name]) for name in series]
    return typed_frame(blanks + list(rows), columns)
