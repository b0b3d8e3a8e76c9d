"""What every figure shares: colours, markers and axis labels, the panel grid with one legend, the
marking of cells measured on too few prompts, and saving.

Figures are built on matplotlib's Agg canvas without pyplot: no global figure state, nothing to
close, safe in a notebook. No torch here.
"""

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from sd2 import methods
from sd2.checkpoint import atomic_path
from sd2.report.comparisons import MIN_PROMPTS_FOR_SIGNIFICANCE

MAL_LABEL = "MAL τ (tokens per verification step)"
IMPROVEMENT_LABEL = "improvement factor (×, from MACs)"
MACS_LABEL = "draft MACs per token (linear layers)"
SPARSITY_LABEL = "sparsity of decoder linears (%)"
PANEL_SIZE = (4.0, 3.0)  # inches per panel

# One colour per method in every figure (the registry's); a loss variant is a shade of its method's colour.
MARKERS = "os^Dv<>p*h"
LINESTYLES = ("-", "--", ":", "-.")

# A bootstrap over a handful of prompts undercovers badly: such a cell's interval is drawn, but marked
# (hollow marker or bar, dotted error bar) so that it does not read as a 95% CI.
# Two lines: a legend as wide as one line of this would squeeze the panels.
FEW_PROMPTS_LABEL = f"hollow, dotted CI:\n< {MIN_PROMPTS_FOR_SIGNIFICANCE} prompts (unreliable)"
FEW_PROMPTS_BAR_LABEL = f"unfilled, dotted CI:\n< {MIN_PROMPTS_FOR_SIGNIFICANCE} prompts (unreliable)"


def color(method: str, loss=None) -> str:
    """The method's colour; a loss other than the method's own shades it (toward white or black)."""
    # Read at call time: a method an extension registers after this module loads keeps its colour.
    base = methods.BY_NAME[method].color if method in methods.BY_NAME else methods.UNKNOWN_COLOR
    own = not isinstance(loss, str) or loss == methods.default_loss(method) or loss not in methods.LOSSES
    shade = 0.0 if own else methods.LOSSES[loss].shade
    rgb = np.array([int(base[i : i + 2], 16) for i in (1, 3, 5)], dtype=float)
    rgb = rgb + (255 - rgb) * shade if shade > 0 else rgb * (1 + shade)
    return "#" + "".join(f"{int(round(v)):02x}" for v in rgb)


def ci_yerr(rows: pd.DataFrame, value: str) -> np.ndarray | None:
    """Error-bar lengths below and above `value` from its 95% CI columns; None where the table has none (speed-up).

    A missing interval gives NaN lengths, which matplotlib leaves undrawn.
    """
    low, high = f"{value}_ci_low", f"{value}_ci_high"
    if low not in rows:
        return None
    # A percentile interval may miss its point estimate on a degenerate sample; errorbar rejects negative lengths.
    return np.vstack([(rows[value] - rows[low]).clip(lower=0), (rows[high] - rows[value]).clip(lower=0)])


def few_prompts(rows: pd.DataFrame) -> pd.Series:
    """Rows measured on fewer prompts than a comparison needs to be called significant."""
    return rows["n_prompts"] < MIN_PROMPTS_FOR_SIGNIFICANCE


def dot_error_bars(container) -> None:
    """Dotted error bars: the interval of a cell with too few prompts."""
    for bars in container.lines[2]:
        bars.set_linestyle(":")


def points_with_ci(ax, x: pd.Series, rows: pd.DataFrame, value: str, fmt: str, c: str, label: str, **kw) -> None:
    """`value` of `rows` at `x` with its 95% CI as error bars; cells with too few prompts hollow, their bars dotted."""
    few = few_prompts(rows)
    for part, hollow in ((~few, False), (few, True)):
        if not part.any():
            continue
        face = {"markerfacecolor": "white"} if hollow else {}
        sub = rows[part]
        container = ax.errorbar(
            x[part], sub[value], yerr=ci_yerr(sub, value), fmt=fmt, capsize=3, color=c, label=label, **face, **kw
        )
        if hollow:
            dot_error_bars(container)


def bar_with_ci(ax, x: float, point: pd.DataFrame, value: str, c: str, label: str, **kw) -> None:
    """One bar of a one-row frame's `value` with its CI; a cell with too few prompts unfilled, its bar dotted.

    kw: ax.bar's width, capsize, hatch, edgecolor.
    """
    yerr = ci_yerr(point, value)
    few = yerr is not None and bool(few_prompts(point).iloc[0])
    if few:
        kw = kw | {"edgecolor": c, "linewidth": 1.0}
    container = ax.bar(x, point[value], yerr=yerr, color="white" if few else c, label=label, **kw)
    if few:
        dot_error_bars(container.errorbar)


def few_prompts_entry(bars: bool = False):
    """The legend entry that explains the marking of cells with too few prompts."""
    if bars:
        return Patch(facecolor="white", edgecolor="black", linestyle=":", label=FEW_PROMPTS_BAR_LABEL)
    return Line2D([], [], marker="o", markerfacecolor="white", color="black", linestyle=":", label=FEW_PROMPTS_LABEL)


def marker_entries(markers: dict, what: str) -> list:
    """Neutral legend entries, one per marker: {name: marker} of `what` (draft, quantization)."""
    return [
        Line2D([], [], marker=m, color="0.3", linestyle="none", label=f"{what} {name}") for name, m in markers.items()
    ]


def new_figure(n_rows: int, n_cols: int, title: str, sharey: bool = True):
    # At least 10 inches wide so that the title and the legend fit beside one panel.
    fig = Figure(figsize=(max(10.0, PANEL_SIZE[0] * n_cols + 2.0), PANEL_SIZE[1] * n_rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharey=sharey)
    fig.suptitle(title)
    return fig, axes


def empty_figure(title: str, message: str = "no data in the tables") -> Figure:
    fig, axes = new_figure(1, 1, title)
    axes[0, 0].text(0.5, 0.5, message, ha="center", va="center", transform=axes[0, 0].transAxes)
    axes[0, 0].set_axis_off()
    return fig


def figure_legend(fig: Figure, axes, extra=()) -> None:
    """One legend for the whole figure, labels deduplicated across panels, then the `extra` artists
    (neutral entries that explain markers or line styles)."""
    seen = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    for artist in extra:
        seen.setdefault(artist.get_label(), artist)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside right center", fontsize="small")


def panel_grid(df: pd.DataFrame, row_key: str, col_keys: list[str], title: str, draw, extra=()) -> Figure:
    """One row of panels per value of `row_key`, one column per combination of `col_keys`.

    draw(ax, panel, row_value, column, j) fills a panel with its rows of `df`; `column` is the
    tuple of col_keys values and j the column index (the leftmost panel carries the y label).
    The figure gets one legend, `extra` entries last.
    """
    row_values = sorted(df[row_key].unique())
    columns = sorted(set(zip(*(df[key] for key in col_keys))))
    fig, axes = new_figure(len(row_values), len(columns), title)
    for i, row_value in enumerate(row_values):
        for j, column in enumerate(columns):
            mask = df[row_key] == row_value
            for key, value in zip(col_keys, column):
                mask &= df[key] == value
            draw(axes[i, j], df[mask], row_value, column, j)
    figure_legend(fig, axes, extra)
    return fig


def save_figure(fig: Figure, out_dir, stem: str) -> list[Path]:
    """PNG and PDF, each written atomically; no creation date, so reruns give identical PDFs."""
    # Lay out once and freeze it: both files share the layout, which is the slow part.
    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    paths = []
    for ext, metadata in (("png", {"Software": None}), ("pdf", {"CreationDate": None, "Producer": None})):
        path = Path(out_dir) / f"{stem}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150, metadata=metadata)
        paths.append(path)
    return paths
