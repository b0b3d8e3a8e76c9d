"""Rule `figures`: `results/tables/*.csv` -> `results/figures/{stem}.png|pdf`.

Reads only the aggregated tables, so every figure regenerates in seconds from cached
results; never imports torch or transformers. Figures are built on matplotlib's Agg
canvas without pyplot: no global figure state, nothing to close, safe in a notebook.

Each `plot_*` function takes DataFrames and returns a Figure (the notebook calls them
too); `make_figures` writes them all under deterministic names. Unless said otherwise a
figure shows greedy decoding (temperature 0) at one reported k (the smallest of the
config's measure.k), measured rows only (never the tvd_estimate), and puts each eval set
in its own row of panels rather than averaging over them. MAL figures carry the 95%
bootstrap CIs of the table as error bars.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, LogLocator, MaxNLocator, NullFormatter

from sd2 import methods
from sd2.checkpoint import atomic_path
from sd2.report.results import method_rank, unquantized, with_variant_columns

MAL_LABEL = "MAL τ (tokens per verification step)"
IMPROVEMENT_LABEL = "improvement factor (×, from MACs)"
MACS_LABEL = "draft MACs per token (linear layers)"
SPARSITY_LABEL = "sparsity of decoder linears (%)"
PANEL_SIZE = (4.0, 3.0)  # inches per panel
MAX_K_COLUMNS = 4  # mal_vs_k shows one eval set only when all of them would need more columns
CI_NOTE = "error bars: 95% bootstrap CI over prompts."

# One colour per method in every figure (the registry's); a loss variant is a shade of its method's colour.
METHOD_COLORS = {m.name: m.color for m in methods.METHODS}
# Per loss other than the method's own: how far its colour moves toward white (> 0) or black (< 0).
LOSS_SHADES = {"kl": 0.45, "tvdpp": -0.4, "squarehead": 0.7, "skd": -0.65}
MARKERS = "os^Dv<>p*h"
LINESTYLES = ("-", "--", ":", "-.")

CAPTIONS = {
    "mal_vs_sparsity": (
        "Mean Accepted Length (MAL, bonus token included) against draft sparsity, one line per draft-making method, "
        "greedy decoding; dense drafts are the dotted reference lines; " + CI_NOTE
    ),
    "mal_vs_macs": (
        "MAL against draft MACs per token for every draft and method, greedy decoding; the grey step line is the "
        "Pareto front (the best MAL reachable at or below each cost); " + CI_NOTE
    ),
    "improvement_factor": (
        "Theoretical improvement factor MAL / (1 + k·MACs_draft/MACs_target) of each draft, greedy decoding; "
        "above 1 speculative decoding beats autoregressive decoding in MACs; " + CI_NOTE
    ),
    "mal_vs_k": (
        "MAL (top) and theoretical improvement factor (bottom) against the number of drafted tokens k, "
        "greedy decoding measured by the teacher-forced walk (same-tokenizer pairs), one line per draft; "
        "stars mark the k with the largest improvement factor; shaded bands: 95% bootstrap CI over prompts."
    ),
    "acceptance_by_position": (
        "Share of verification steps in which the drafted token at each position was accepted, greedy decoding, "
        "one line per draft."
    ),
    "tokenizer_comparison": (
        "MAL of each draft with a same-tokenizer target and with a different-tokenizer target "
        "(Universal Assisted Generation), greedy decoding; " + CI_NOTE
    ),
    "speedup": (
        "Measured CPU wall-clock speed-up of speculative decoding over autoregressive decoding of the target "
        "(tokens/s ratio, batch size 1), greedy decoding."
    ),
    "loss_curves": (
        "Loss curves: pretraining of the from-scratch models (against tokens) and fine-tuning of each draft "
        "(against steps); solid validation, dashed training loss."
    ),
}
FIGURES = tuple(CAPTIONS)
ALL_QUANTIZATIONS = ("mal_vs_weight_bytes",)


# ---------------------------------------------------------------- table helpers


def load_tables(tables_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """measurements.csv and training.csv of `tables_dir` (with a `loss` column, even in tables written before it)."""
    tables_dir = Path(tables_dir)
    return with_variant_columns(pd.read_csv(tables_dir / "measurements.csv")), with_variant_columns(
        pd.read_csv(tables_dir / "training.csv")
    )


def main_slice(measurements: pd.DataFrame, temperature: float = 0.0, k: int | None = None) -> pd.DataFrame:
    """Measured rows at one temperature and one reported k (default: the smallest reported k).

    The walk's other k values belong to the MAL-vs-k figure only, and the tvd_estimate is
    a model of acceptance, not a measurement.
    """
    # eq(True): a column with empty cells is read back as objects, where astype(bool) makes NaN True.
    df = measurements[
        (measurements["temperature"] == temperature)
        & (measurements["estimator"] != "tvd_estimate")
        & measurements["headline_k"].eq(True)
    ]
    if k is None and len(df):
        k = int(df["k"].min())
    return df[df["k"] == k]


def slice_title(what: str, df: pd.DataFrame, temperature: float) -> str:
    k = f", k = {int(df['k'].iloc[0])}" if len(df) else ""
    return f"{what} (temperature {temperature:g}{k})"


def is_dense(method: str) -> bool:
    """A method made at sparsity 0 only (dense, dense_sd, direct_align): no level in its label."""
    return method in methods.BY_NAME and not methods.BY_NAME[method].sparse


def variant_label(method: str, sparsity, loss=None) -> str:
    """'dense', 'Direct Alignment', 'sd2 s50' or 'sd2 (kl) s50': a draft-making method, with its loss
    where it is not the method's own, at a sparsity level."""
    name = methods.label(method, loss)
    return name if is_dense(method) else f"{name} s{int(sparsity)}"


def same_variant(df: pd.DataFrame, method: str, loss, sparsity=None) -> pd.Series:
    """Rows of one method and loss (an untuned draft's empty loss included), at one sparsity if given."""
    mask = (df["method"] == method) & (df["loss"].isna() if not isinstance(loss, str) else df["loss"] == loss)
    return mask if sparsity is None else mask & (df["sparsity"] == sparsity)


def ci_yerr(rows: pd.DataFrame, value: str) -> np.ndarray | None:
    """Error-bar lengths below and above `value` from its 95% CI columns; None where the table has none (speed-up).

    A missing interval gives NaN lengths, which matplotlib leaves undrawn.
    """
    low, high = f"{value}_ci_low", f"{value}_ci_high"
    if low not in rows:
        return None
    # A percentile interval may miss its point estimate on a degenerate sample; errorbar rejects negative lengths.
    return np.vstack([(rows[value] - rows[low]).clip(lower=0), (rows[high] - rows[value]).clip(lower=0)])


def sparsity_styles(df: pd.DataFrame) -> dict:
    """Line style per sparsity level, solid for dense and the lowest sparse level (colour tells the method)."""
    sparse = sorted(set(df["sparsity"]) - {0})
    return {s: LINESTYLES[n % len(LINESTYLES)] for n, s in enumerate(sparse)} | {0: "-"}


def variant_order(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Unique (keys..., method, loss, sparsity) combinations in table order (methods by the registry, ce first)."""
    combos = df[keys + ["method", "loss", "sparsity"]].drop_duplicates()
    combos = combos.assign(_rank=combos["method"].map(method_rank), _loss_rank=combos["loss"].map(methods.loss_rank))
    by = keys + ["_rank", "method", "_loss_rank", "sparsity"]
    return combos.sort_values(by).drop(columns=["_rank", "_loss_rank"])


def pareto_front(points: pd.DataFrame, cost: str, value: str) -> pd.DataFrame:
    """Points that no other point beats: strictly higher `value` than every cheaper point."""
    ordered = points.sort_values([cost, value], ascending=[True, False])
    best, keep = float("-inf"), []
    for idx, v in ordered[value].items():
        if v > best:
            keep.append(idx)
            best = v
    return ordered.loc[keep]


# ---------------------------------------------------------------- figure helpers


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


def figure_legend(fig: Figure, axes) -> None:
    """One legend for the whole figure, labels deduplicated across panels."""
    seen = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside right center", fontsize="small")


def panel_grid(df: pd.DataFrame, row_key: str, col_keys: list[str], title: str, draw) -> Figure:
    """One row of panels per value of `row_key`, one column per combination of `col_keys`.

    draw(ax, panel, row_value, column, j) fills a panel with its rows of `df`; `column` is the
    tuple of col_keys values and j the column index (the leftmost panel carries the y label).
    The figure gets one legend.
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
    figure_legend(fig, axes)
    return fig


def color(method: str, loss=None) -> str:
    """The method's colour; a loss other than the method's own shades it (toward white or black)."""
    base = METHOD_COLORS.get(method, methods.UNKNOWN_COLOR)
    shade = LOSS_SHADES.get(loss, 0.0) if isinstance(loss, str) and loss != methods.default_loss(method) else 0.0
    rgb = np.array([int(base[i : i + 2], 16) for i in (1, 3, 5)], dtype=float)
    rgb = rgb + (255 - rgb) * shade if shade > 0 else rgb * (1 + shade)
    return "#" + "".join(f"{int(round(v)):02x}" for v in rgb)


def mean_row(rows: pd.DataFrame) -> pd.DataFrame:
    """The numeric columns' means as a one-row frame: one bar, with its error bar, for several rows."""
    return rows.mean(numeric_only=True).to_frame().T


def bar_panel(ax, df: pd.DataFrame, value: str) -> None:
    """One bar per draft variant (draft model, method, sparsity), coloured by method,
    with its CI when the table has one."""
    combos = variant_order(df, ["draft"])
    for x, c in enumerate(combos.itertuples(index=False)):
        point = mean_row(df[(df["draft"] == c.draft) & same_variant(df, c.method, c.loss, c.sparsity)])
        ax.bar(
            x,
            point[value],
            yerr=ci_yerr(point, value),
            capsize=3,
            color=color(c.method, c.loss),
            label=methods.label(c.method, c.loss),
        )
    # The draft's name only matters when a panel holds more than one draft model.
    several = combos["draft"].nunique() > 1
    labels = [f"{c.draft}: " * several + variant_label(c.method, c.sparsity, c.loss) for c in combos.itertuples()]
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize="small")


# ---------------------------------------------------------------- figures


def plot_mal_vs_sparsity(measurements: pd.DataFrame, temperature: float = 0.0, k: int | None = None) -> Figure:
    """Rows: eval sets. Columns: target x draft. One line per method across sparsity levels."""
    df = main_slice(measurements, temperature, k)
    title = slice_title("MAL of each draft-making method against sparsity", df, temperature)
    if df.empty:
        return empty_figure(title)

    lines = variant_order(df, [])[["method", "loss"]].drop_duplicates()

    def draw(ax, panel, eval_set, column, j):
        for n, line in enumerate(lines.itertuples(index=False)):
            rows = panel[same_variant(panel, line.method, line.loss)].sort_values("sparsity")
            if rows.empty:
                continue
            if is_dense(line.method):
                # Dense drafts exist only at 0%: a reference level for the sparse ones.
                ax.axhline(rows["mal"].mean(), color=color(line.method, line.loss), linestyle=":", linewidth=1)
            # Lines share sparsity levels: a small sideways shift per line keeps their error bars apart.
            shift = (n - (len(lines) - 1) / 2) * 0.8
            ax.errorbar(
                rows["sparsity"] + shift,
                rows["mal"],
                yerr=ci_yerr(rows, "mal"),
                marker="o",
                capsize=3,
                color=color(line.method, line.loss),
                label=methods.label(line.method, line.loss),
            )
        ax.set_title(f"{eval_set}: {column[1]} → {column[0]}", fontsize="medium")
        ax.set_xlabel(SPARSITY_LABEL)
        ax.set_ylabel(MAL_LABEL if j == 0 else "")
        ax.grid(alpha=0.3)

    return panel_grid(df, "eval_set", ["target", "draft"], title, draw)


def plot_mal_vs_macs(measurements: pd.DataFrame, temperature: float = 0.0, k: int | None = None) -> Figure:
    """Rows: eval sets. Columns: targets. Every draft variant as a point; the Pareto front as a step line."""
    df = main_slice(measurements, temperature, k)
    title = slice_title("MAL against draft cost: which drafts are Pareto-optimal", df, temperature)
    if df.empty:
        return empty_figure(title)
    drafts = sorted(df["draft"].unique())

    def draw(ax, panel, eval_set, column, j):
        for line in variant_order(panel, [])[["method", "loss"]].drop_duplicates().itertuples(index=False):
            for d, draft in enumerate(drafts):
                rows = panel[same_variant(panel, line.method, line.loss) & (panel["draft"] == draft)]
                if len(rows):
                    ax.errorbar(
                        rows["draft_macs_per_token"],
                        rows["mal"],
                        yerr=ci_yerr(rows, "mal"),
                        fmt=MARKERS[d % len(MARKERS)],
                        capsize=3,
                        color=color(line.method, line.loss),
                        label=methods.label(line.method, line.loss),
                        zorder=3,
                    )
        front = pareto_front(panel, "draft_macs_per_token", "mal")
        ax.step(
            front["draft_macs_per_token"],
            front["mal"],
            where="post",
            color="0.5",
            linewidth=1.5,
            label="Pareto front",
            zorder=2,
        )
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.set_title(f"{eval_set}: target {column[0]}", fontsize="medium")
        ax.set_xlabel(MACS_LABEL)
        ax.set_ylabel(MAL_LABEL if j == 0 else "")
        ax.grid(alpha=0.3)

    fig = panel_grid(df, "eval_set", ["target"], title, draw)
    if len(drafts) > 1:
        fig.text(
            0.99,
            0.01,
            "markers: " + ", ".join(f"{MARKERS[d % len(MARKERS)]} {name}" for d, name in enumerate(drafts)),
            ha="right",
            fontsize="small",
        )
    return fig


def bars_per_target(
    measurements: pd.DataFrame, value: str, title: str, ylabel: str, temperature: float, k: int | None
) -> Figure:
    """Rows: eval sets. Columns: targets. One bar of `value` per draft variant, a dashed line at 1."""
    df = main_slice(measurements, temperature, k)
    title = slice_title(title, df, temperature)
    if df.empty:
        return empty_figure(title)

    def draw(ax, panel, eval_set, column, j):
        bar_panel(ax, panel, value)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_title(f"{eval_set}: target {column[0]}", fontsize="medium")
        ax.set_ylabel(ylabel if j == 0 else "")
        ax.grid(axis="y", alpha=0.3)

    return panel_grid(df, "eval_set", ["target"], title, draw)


def plot_improvement_factor(measurements: pd.DataFrame, temperature: float = 0.0, k: int | None = None) -> Figure:
    """The paper's headline figure: theoretical improvement factor per draft variant."""
    return bars_per_target(
        measurements,
        "improvement_factor",
        "Theoretical improvement factor MAL / (1 + k·c) of each draft",
        IMPROVEMENT_LABEL,
        temperature,
        k,
    )


def k_panel(ax, panel: pd.DataFrame, value: str, styles: dict) -> None:
    """`value` against k, one line per draft variant with its CI as a band, a star at the variant's best k."""
    for combo in variant_order(panel, []).itertuples(index=False):
        rows = panel[same_variant(panel, combo.method, combo.loss, combo.sparsity)].sort_values("k")
        c = color(combo.method, combo.loss)
        ax.plot(
            rows["k"],
            rows[value],
            styles[combo.sparsity],
            marker=".",
            color=c,
            label=variant_label(combo.method, combo.sparsity, combo.loss),
        )
        ax.fill_between(rows["k"], rows[f"{value}_ci_low"], rows[f"{value}_ci_high"], color=c, alpha=0.12, linewidth=0)
        best = rows[rows["best_k"].eq(True)]
        ax.plot(best["k"], best[value], "*", markersize=12, color=c, markeredgecolor="black", zorder=3)
    # One neutral legend entry for the stars, after the variants, whatever their colours.
    ax.plot(
        [], [], "*", markersize=12, color="white", markeredgecolor="black", label="best k (largest improvement factor)"
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def panel_columns(rows: pd.DataFrame, scope: str) -> tuple[list, str]:
    """The (eval set, target, draft) panels of a per-k figure, and its scope: one eval set only
    when all of them would need more than MAX_K_COLUMNS columns."""
    columns = sorted(set(zip(rows["eval_set"], rows["target"], rows["draft"])))
    if len(columns) > MAX_K_COLUMNS:
        first = columns[0][0]
        columns = [c for c in columns if c[0] == first]
        scope += f", eval set {first} only"
    return columns, scope


def plot_mal_vs_k(measurements: pd.DataFrame) -> Figure:
    """Rows: MAL, improvement factor. Columns: eval set x target x draft. Greedy walk rows, every k."""
    df = measurements[(measurements["temperature"] == 0) & (measurements["estimator"] == "teacher_forced_walk")]
    scope = "greedy, teacher-forced walk"
    if df.empty:
        return empty_figure(
            f"MAL and improvement factor against k ({scope})",
            "no teacher-forced walk rows (greedy decoding of same-tokenizer pairs)",
        )
    columns, scope = panel_columns(df, scope)
    styles = sparsity_styles(df)
    fig, axes = new_figure(2, len(columns), f"MAL and improvement factor against k ({scope})", sharey="row")
    for j, (eval_set, target, draft) in enumerate(columns):
        panel = df[(df["eval_set"] == eval_set) & (df["target"] == target) & (df["draft"] == draft)]
        for i, (value, ylabel) in enumerate((("mal", MAL_LABEL), ("improvement_factor", IMPROVEMENT_LABEL))):
            k_panel(axes[i, j], panel, value, styles)
            axes[i, j].set_ylabel(ylabel if j == 0 else "")
        axes[0, j].set_title(f"{eval_set}: {draft} → {target}", fontsize="medium")
        axes[1, j].axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        axes[1, j].set_xlabel("k (draft tokens per verification step)")
    figure_legend(fig, axes)
    return fig


def plot_acceptance_by_position(measurements: pd.DataFrame, temperature: float = 0.0, k: int | None = None) -> Figure:
    """Rows: eval sets. Columns: target x draft. One line per draft variant over positions 1..k."""
    df = main_slice(measurements, temperature, k)
    title = slice_title("Acceptance of the draft token at each drafted position", df, temperature)
    if df.empty:
        return empty_figure(title)
    styles = sparsity_styles(df)

    def draw(ax, panel, eval_set, column, j):
        for row in variant_order(panel, []).itertuples(index=False):
            record = panel[same_variant(panel, row.method, row.loss, row.sparsity)].iloc[0]
            rates = json.loads(record["acceptance_by_position"])
            ax.plot(
                range(1, len(rates) + 1),
                rates,
                styles[row.sparsity],
                marker="o",
                color=color(row.method, row.loss),
                label=variant_label(row.method, row.sparsity, row.loss),
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{eval_set}: {column[1]} → {column[0]}", fontsize="medium")
        ax.set_xlabel("draft position (1 = first drafted token)")
        ax.set_ylabel("share of steps accepting this position" if j == 0 else "")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)

    return panel_grid(df, "eval_set", ["target", "draft"], title, draw)


def plot_tokenizer_comparison(measurements: pd.DataFrame, temperature: float = 0.0, k: int | None = None) -> Figure:
    """Rows: eval sets. Columns: drafts. Grouped bars: each draft variant with each target,
    hatched when the tokenizers differ."""
    df = main_slice(measurements, temperature, k)
    title = slice_title("Same-tokenizer target vs different-tokenizer (UAG) target: MAL", df, temperature)
    if df.empty:
        return empty_figure(title)
    targets = (
        df[["target", "same_tokenizer"]]
        .drop_duplicates()
        .sort_values(["same_tokenizer", "target"], ascending=[False, True])
    )
    width = 0.8 / max(1, len(targets))

    def draw(ax, panel, eval_set, column, j):
        combos = variant_order(panel, [])
        for t, target in enumerate(targets.itertuples(index=False)):
            tok = "same tokenizer" if target.same_tokenizer else "different tokenizer, UAG"
            for x, combo in enumerate(combos.itertuples(index=False)):
                rows = panel[
                    (panel["target"] == target.target) & same_variant(panel, combo.method, combo.loss, combo.sparsity)
                ]
                if len(rows):
                    point = mean_row(rows)
                    ax.bar(
                        x + (t - (len(targets) - 1) / 2) * width,
                        point["mal"],
                        width,
                        yerr=ci_yerr(point, "mal"),
                        capsize=2,
                        color=f"C{t}",
                        hatch=None if target.same_tokenizer else "//",
                        edgecolor="white",
                        label=f"{target.target} ({tok})",
                    )
        ax.set_xticks(
            range(len(combos)),
            [variant_label(c.method, c.sparsity, c.loss) for c in combos.itertuples()],
            rotation=60,
            ha="right",
            fontsize="small",
        )
        ax.set_title(f"{eval_set}: draft {column[0]}", fontsize="medium")
        ax.set_ylabel(MAL_LABEL if j == 0 else "")
        ax.grid(axis="y", alpha=0.3)

    return panel_grid(df, "eval_set", ["draft"], title, draw)


def plot_speedup(measurements: pd.DataFrame, temperature: float = 0.0, k: int | None = None) -> Figure:
    """Measured tokens/s ratio over autoregressive decoding per draft variant."""
    return bars_per_target(
        measurements,
        "speedup",
        "CPU wall-clock speed-up of speculative over autoregressive decoding",
        "speed-up over autoregressive (×)",
        temperature,
        k,
    )


def plot_loss_curves(training: pd.DataFrame) -> Figure:
    """First panel: pretraining against tokens. Then one panel per (data, draft): fine-tuning against steps."""
    title = "Training and fine-tuning loss curves (solid: validation, dashed: training)"
    if training.empty:
        return empty_figure(title)
    pre = training[training["stage"] == "pretrain"]
    tune = training[training["stage"] == "finetune"].assign(data=lambda d: d["target"].fillna("original"))
    groups = sorted(set(zip(tune["data"], tune["draft"])))
    # Colour tells the method, the marker the sparsity level (dashes are taken by training loss).
    marks = {s: MARKERS[n % len(MARKERS)] for n, s in enumerate(sorted(set(tune["sparsity"].dropna()) - {0}))}
    fig, axes = new_figure(1, 1 + len(groups), title, sharey=False)
    ax = axes[0, 0]
    for n, (model, curve) in enumerate(pre.groupby("model", sort=True)):
        ax.plot(curve["tokens"], curve["val_loss"], color=f"C{n}", label=f"pretrain {model}")
        ax.plot(curve["tokens"], curve["train_loss"], "--", color=f"C{n}")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_title("pretraining", fontsize="medium")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("cross-entropy loss (nats per token)")
    ax.legend(fontsize="small")
    for j, (data, draft) in enumerate(groups, start=1):
        ax = axes[0, j]
        panel = tune[(tune["data"] == data) & (tune["draft"] == draft)]
        for row in variant_order(panel, []).itertuples(index=False):
            curve = panel[same_variant(panel, row.method, row.loss, row.sparsity)].sort_values("step")
            ax.plot(
                curve["step"],
                curve["val_loss"],
                color=color(row.method, row.loss),
                label=variant_label(row.method, row.sparsity, row.loss),
                marker=marks.get(row.sparsity),
                markersize=4,
            )
            ax.plot(curve["step"], curve["train_loss"], "--", color=color(row.method, row.loss), alpha=0.6)
        ax.set_title(f"fine-tuning {draft} on {data} data", fontsize="medium")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss on responses (nats per token)")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    axes[0, 0].grid(alpha=0.3)
    return fig


PLOTS = {
    "mal_vs_sparsity": plot_mal_vs_sparsity,
    "mal_vs_macs": plot_mal_vs_macs,
    "improvement_factor": plot_improvement_factor,
    "mal_vs_k": plot_mal_vs_k,
    "acceptance_by_position": plot_acceptance_by_position,
    "tokenizer_comparison": plot_tokenizer_comparison,
    "speedup": plot_speedup,
}


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


def make_figures(tables_dir, out_dir) -> list[Path]:
    """Every figure of FIGURES as out_dir/{stem}.png and .pdf; returns the paths in FIGURES order."""
    measurements, training = load_tables(tables_dir)
    paths = []
    for stem in FIGURES:
        if stem == "loss_curves":
            fig = plot_loss_curves(training)
        else:
            # Quantized drafts only in the bytes figure: elsewhere a line per method would mix them.
            fig = PLOTS[stem](measurements if stem in ALL_QUANTIZATIONS else unquantized(measurements))
        paths += save_figure(fig, out_dir, stem)
    return paths


# ---------------------------------------------------------------- draft-token trees (sd2.measure.trees)

TREE_BUDGET_LABEL = "tree budget n (draft tokens per step)"


def plot_mal_vs_tree_budget(measurements: pd.DataFrame) -> Figure:
    """Rows: MAL, improvement factor. Columns: eval set x target x draft. One line per draft variant
    across tree budgets (branching per depth written at each MAL point), and the chain of as many
    nodes (the walk's k = budget, where measured) dotted."""
    greedy = measurements[measurements["temperature"] == 0]
    tree_rows = greedy[greedy["estimator"] == "tree_walk"]
    chains = greedy[greedy["estimator"] == "teacher_forced_walk"]
    scope = "greedy, exact rank walk"
    if tree_rows.empty:
        return empty_figure(
            f"MAL and improvement factor against draft-tree budget ({scope})",
            "no tree_walk rows (measure.tree_budgets is empty)",
        )
    columns, scope = panel_columns(tree_rows, scope)
    marks = {s: MARKERS[n % len(MARKERS)] for n, s in enumerate(sorted(set(tree_rows["sparsity"])))}
    fig, axes = new_figure(
        2, len(columns), f"MAL and improvement factor against draft-tree budget ({scope})", sharey="row"
    )
    for j, (eval_set, target, draft) in enumerate(columns):
        panel, chain_panel = (
            rows[(rows["eval_set"] == eval_set) & (rows["target"] == target) & (rows["draft"] == draft)]
            for rows in (tree_rows, chains)
        )
        for combo in variant_order(panel, []).itertuples(index=False):
            rows = panel[same_variant(panel, combo.method, combo.loss, combo.sparsity)].sort_values("tree_budget")
            ref = chain_panel[
                same_variant(chain_panel, combo.method, combo.loss, combo.sparsity)
                & chain_panel["k"].isin(rows["tree_budget"])
            ].sort_values("k")
            c, marker = color(combo.method, combo.loss), marks[combo.sparsity]
            for i, value in enumerate(("mal", "improvement_factor")):
                ax = axes[i, j]
                ax.plot(
                    rows["tree_budget"],
                    rows[value],
                    "-",
                    marker=marker,
                    color=c,
                    label=variant_label(combo.method, combo.sparsity, combo.loss),
                )
                ax.fill_between(
                    rows["tree_budget"],
                    rows[f"{value}_ci_low"],
                    rows[f"{value}_ci_high"],
                    color=c,
                    alpha=0.12,
                    linewidth=0,
                )
                ax.plot(ref["k"], ref[value], ":", marker=marker, markerfacecolor="none", color=c)
            for row in rows.itertuples(index=False):
                axes[0, j].annotate(
                    str(row.tree_branching),
                    (row.tree_budget, row.mal),
                    textcoords="offset points",
                    xytext=(0, 5),
                    ha="center",
                    fontsize="xx-small",
                    color=c,
                )
        axes[0, j].set_title(f"{eval_set}: {draft} → {target}", fontsize="medium")
        axes[0, j].set_ylabel(MAL_LABEL if j == 0 else "")
        axes[1, j].set_ylabel(IMPROVEMENT_LABEL if j == 0 else "")
        axes[1, j].axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        axes[1, j].set_xlabel(TREE_BUDGET_LABEL)
        for ax in axes[:, j]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    # Neutral legend entries for the two line styles, after the variants.
    axes[0, 0].plot([], [], "-", color="black", label="tree (shape per budget)")
    axes[0, 0].plot([], [], ":", color="black", label="chain of as many nodes (k = n)")
    figure_legend(fig, axes)
    return fig


CAPTIONS["mal_vs_tree_budget"] = (
    "MAL (top) and theoretical improvement factor MAL / (1 + expanded nodes·MACs_draft/MACs_target) (bottom) "
    "against the node budget of a static draft-token tree, greedy decoding measured exactly from the draft's "
    "teacher-forced ranks (same-tokenizer pairs), one solid line per draft with its branching per depth written "
    "above each point; dotted: the chain with as many draft tokens (k = budget) where the walk measured it; "
    "shaded bands: 95% bootstrap CI over prompts."
)
PLOTS["mal_vs_tree_budget"] = plot_mal_vs_tree_budget
FIGURES = tuple(CAPTIONS)


# ---------------------------------------------------------------- weight bytes, quantization (sd2.measure.weight_bytes)

BYTES_LABEL = "draft weight bytes read per token"
# A quantization-aware draft (-qat) beside its one-shot scheme: the same shape, turned.
QUANTIZATION_MARKERS = {methods.NO_QUANTIZATION: "o", "w8a16": "s", "w8a16-qat": "D", "w4a16": "^", "w4a16-qat": "v"}


def plot_mal_vs_weight_bytes(measurements: pd.DataFrame, temperature: float = 0.0, k: int | None = None) -> Figure:
    """Rows: eval sets. Columns: targets. Every draft (quantized ones too) as a point at the bytes of
    weights it reads per token in its smallest stored layout; marker = quantization, colour = method;
    the Pareto front as a step line."""
    df = main_slice(measurements, temperature, k)
    df = df[df["draft_weight_bytes_per_token"].notna()] if "draft_weight_bytes_per_token" in df else df.iloc[:0]
    title = slice_title("MAL against the weight bytes a draft reads per token", df, temperature)
    if df.empty:
        return empty_figure(title, "no records with weight bytes (measured before bytes were counted)")

    def draw(ax, panel, eval_set, column, j):
        for c in variant_order(panel, ["draft", "quantization"]).itertuples(index=False):
            rows = panel[same_variant(panel, c.method, c.loss, c.sparsity) & (panel["draft"] == c.draft)]
            rows = rows[rows["quantization"] == c.quantization]
            ax.errorbar(
                rows["draft_weight_bytes_per_token"],
                rows["mal"],
                yerr=ci_yerr(rows, "mal"),
                fmt=QUANTIZATION_MARKERS.get(c.quantization, "X"),
                capsize=3,
                color=color(c.method, c.loss),
                label=methods.label(c.method, c.loss),
                zorder=3,
            )
        front = pareto_front(panel, "draft_weight_bytes_per_token", "mal")
        ax.step(front["draft_weight_bytes_per_token"], front["mal"], where="post", color="0.5", label="Pareto front")
        ax.set_xscale("log")
        # A range within one decade: labels at 1, 2 and 5 of each decade, none in scientific notation.
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(EngFormatter(unit="B"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{eval_set}: target {column[0]}", fontsize="medium")
        ax.set_xlabel(BYTES_LABEL)
        ax.set_ylabel(MAL_LABEL if j == 0 else "")
        ax.grid(alpha=0.3)

    fig = panel_grid(df, "eval_set", ["target"], title, draw)
    shown = [q for q in QUANTIZATION_MARKERS if q in set(df["quantization"])]
    fig.text(
        0.99,
        0.01,
        "markers: " + ", ".join(f"{QUANTIZATION_MARKERS[q]} {q}" for q in shown),
        ha="right",
        fontsize="small",
    )
    return fig


CAPTIONS["mal_vs_weight_bytes"] = (
    "MAL against the bytes of weights each draft reads per generated token (log scale): 16-bit weights, "
    "quantized decoder layers at 8 or 4 bits with their scales, sparse layers in a bitmask layout where it is "
    "smaller; marker = quantization, colour = method; the grey step line is the Pareto front; " + CI_NOTE
)
PLOTS["mal_vs_weight_bytes"] = plot_mal_vs_weight_bytes
FIGURES = tuple(CAPTIONS)


# ---------------------------------------------------------------- sparse kernels (benchmarks/sparse_kernels.py)
# Not a FIGURES entry: the benchmark draws it from its own table, rule `figures` never does.

SPARSE_KERNELS_CAPTION = (
    "Speed-up of sparse kernels over dense torch (zeros stored) for one decoder layer's linear layers "
    "(q, k, v, o, gate, up, down: dense time / backend time, both summed over the layer) against unstructured "
    "sparsity, on the CPU named in the title; rows: batch 1 (drafting) and k + 1 (verification); above the dashed "
    "line the sparse kernel is faster."
)


def sparse_layer_speedups(table: pd.DataFrame) -> pd.DataFrame:
    """Per model, batch, sparsity, dtype, threads and backend: the layer's summed dense time over its summed
    backend time, each shape weighted by how often it occurs in a layer (q and o share one, ...)."""
    ok = table[table["status"] == "ok"].copy()
    keys = ["model", "batch", "sparsity", "dtype", "threads", "backend"]
    if ok.empty:
        return pd.DataFrame(columns=[*keys, "speedup"])
    ok["backend_us"] = ok["median_us"] * ok["count_per_layer"]
    ok["dense_us"] = ok["dense_median_us"] * ok["count_per_layer"]
    layer = ok.groupby(keys, as_index=False)[["backend_us", "dense_us"]].sum()
    layer["speedup"] = layer["dense_us"] / layer["backend_us"]
    return layer[[*keys, "speedup"]]


def plot_sparse_kernels(table: pd.DataFrame) -> Figure:
    """Rows: batch. Columns: model. One line per sparse backend, dtype (marker) and thread count (line style)."""
    layer = sparse_layer_speedups(table)
    layer = layer[layer["backend"] != "dense"]
    cpu = table["cpu"].dropna().iloc[0] if table["cpu"].notna().any() else "unknown CPU"
    title = f"Sparse kernels against dense torch: one decoder layer's linears (q, k, v, o, gate, up, down) on {cpu}"
    if layer.empty:
        return empty_figure(title, "no sparse backend ran")
    backends = sorted(layer["backend"].unique())
    colors = {b: f"C{i % 10}" for i, b in enumerate(backends)}
    markers = {d: MARKERS[i] for i, d in enumerate(sorted(layer["dtype"].unique()))}
    styles = {t: LINESTYLES[i % len(LINESTYLES)] for i, t in enumerate(sorted(layer["threads"].unique()))}

    def draw(ax, panel, batch, column, j):
        for (backend, dtype, threads), rows in panel.groupby(["backend", "dtype", "threads"]):
            rows = rows.sort_values("sparsity")
            ax.plot(
                rows["sparsity"],
                rows["speedup"],
                styles[threads],
                marker=markers[dtype],
                color=colors[backend],
                label=f"{backend}, {dtype}, {threads} thread{'s' if threads > 1 else ''}",
            )
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks(sorted(layer["sparsity"].unique()))
        ax.set_yscale("log")
        ax.set_title(f"{column[0]}, batch {batch}", fontsize="medium")
        ax.set_xlabel("unstructured sparsity (%)")
        ax.set_ylabel("speed-up over dense (×)" if j == 0 else "")
        ax.grid(alpha=0.3, which="both")

    return panel_grid(layer, "batch", ["model"], title, draw)
