"""The figures: each `plot_*` function takes DataFrames of the aggregated tables and returns a Figure.

Rule `figures` draws them through the registry (sd2.report.figures), the notebook calls them
directly. Reads only the tables, so every figure regenerates in seconds from cached results; never
imports torch or transformers. Unless said otherwise a figure shows greedy decoding (temperature 0)
at one reported k (the smallest of the config's measure.k), measured rows only (never the
tvd_estimate), and puts each eval set in its own row of panels rather than averaging over them.
MAL figures carry the 95% bootstrap CIs of the table as error bars, marked where a cell has too
few prompts for its interval to hold (sd2.report.canvas).
"""

import json
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, LogLocator, MaxNLocator, NullFormatter

from sd2 import methods, variants
from sd2.report.canvas import (
    IMPROVEMENT_LABEL,
    LINESTYLES,
    MACS_LABEL,
    MAL_LABEL,
    MARKERS,
    SPARSITY_LABEL,
    bar_with_ci,
    color,
    empty_figure,
    few_prompts,
    few_prompts_entry,
    figure_legend,
    marker_entries,
    new_figure,
    panel_grid,
    points_with_ci,
)
from sd2.report.collect import with_variant_columns

MAX_K_COLUMNS = 4  # mal_vs_k shows one eval set only when all of them would need more columns
TREE_BUDGET_LABEL = "tree budget n (draft tokens per step)"
BYTES_LABEL = "draft weight bytes read per token"
# A quantization-aware draft (-qat) beside its one-shot scheme: the same shape, turned.
QUANTIZATION_MARKERS = {variants.NO_QUANTIZATION: "o", "w8a16": "s", "w8a16-qat": "D", "w4a16": "^", "w4a16-qat": "v"}


# ---------------------------------------------------------------- table helpers


def load_tables(tables_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """measurements.csv and training.csv of `tables_dir` (with a `loss` column, even in tables written before it)."""
    tables_dir = Path(tables_dir)
    return with_variant_columns(pd.read_csv(tables_dir / "measurements.csv")), with_variant_columns(
        pd.read_csv(tables_dir / "training.csv")
    )


def main_slice(measurements: pd.DataFrame, temperature: float = 0.0, k: int | None = None) -> pd.DataFrame:
    """Measured rows at one temperature and one reported k (default: the smallest reported k).

    The walk's other k values belong to the MAL-vs-k figure only, the tvd_estimate is a model of
    acceptance, not a measurement, and a different-tokenizer pair is drawn under vLLM's token-intersection
    rule (tli_walk, measured for every draft) only: transformers' rule (uag_walk) is in the tables.
    """
    # eq(True): a column with empty cells is read back as objects, where astype(bool) makes NaN True.
    df = measurements[
        (measurements["temperature"] == temperature)
        & ~measurements["estimator"].isin(["tvd_estimate", "uag_walk"])
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
    name = variants.label(method, loss)
    return name if is_dense(method) else f"{name} s{int(sparsity)}"


def same_variant(df: pd.DataFrame, method: str, loss, sparsity=None) -> pd.Series:
    """Rows of one method and loss (an untuned draft's empty loss included), at one sparsity if given."""
    mask = (df["method"] == method) & (df["loss"].isna() if not isinstance(loss, str) else df["loss"] == loss)
    return mask if sparsity is None else mask & (df["sparsity"] == sparsity)


def sparsity_styles(df: pd.DataFrame) -> dict:
    """Line style per sparsity level, solid for dense and the lowest sparse level (colour tells the method)."""
    sparse = sorted(set(df["sparsity"]) - {0})
    return {s: LINESTYLES[n % len(LINESTYLES)] for n, s in enumerate(sparse)} | {0: "-"}


def variant_order(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Unique (keys..., method, loss, sparsity) combinations in table order (methods by the registry, ce first)."""
    combos = df[keys + ["method", "loss", "sparsity"]].drop_duplicates()
    combos = combos.assign(_rank=combos["method"].map(methods.rank), _loss_rank=combos["loss"].map(methods.loss_rank))
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


def mean_row(rows: pd.DataFrame) -> pd.DataFrame:
    """The numeric columns' means as a one-row frame: one bar, with its error bar, for several rows."""
    return rows.mean(numeric_only=True).to_frame().T


def bar_panel(ax, df: pd.DataFrame, value: str) -> None:
    """One bar per draft variant (draft model, method, sparsity), coloured by method,
    with its CI when the table has one."""
    combos = variant_order(df, ["draft"])
    for x, c in enumerate(combos.itertuples(index=False)):
        point = mean_row(df[(df["draft"] == c.draft) & same_variant(df, c.method, c.loss, c.sparsity)])
        bar_with_ci(ax, x, point, value, color(c.method, c.loss), variants.label(c.method, c.loss), capsize=3)
    # The draft's name only matters when a panel holds more than one draft model.
    several = combos["draft"].nunique() > 1
    labels = [f"{c.draft}: " * several + variant_label(c.method, c.sparsity, c.loss) for c in combos.itertuples()]
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize="small")


def few_prompts_note(df: pd.DataFrame, value: str, bars: bool = False) -> list:
    """The legend entry for cells with too few prompts, where `df` has such a cell and `value` a CI."""
    return [few_prompts_entry(bars)] if f"{value}_ci_low" in df and few_prompts(df).any() else []


def panel_columns(rows: pd.DataFrame, scope: str) -> tuple[list, str]:
    """The (eval set, target, draft) panels of a per-k figure, and its scope: one eval set only
    when all of them would need more than MAX_K_COLUMNS columns."""
    columns = sorted(set(zip(rows["eval_set"], rows["target"], rows["draft"])))
    if len(columns) > MAX_K_COLUMNS:
        first = columns[0][0]
        columns = [c for c in columns if c[0] == first]
        scope += f", eval set {first} only"
    return columns, scope


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
            c = color(line.method, line.loss)
            if is_dense(line.method):
                # Dense drafts exist only at 0%: a reference level for the sparse ones.
                ax.axhline(rows["mal"].mean(), color=c, linestyle=":", linewidth=1)
            # Lines share sparsity levels: a small sideways shift per line keeps their error bars apart.
            shift = (n - (len(lines) - 1) / 2) * 0.8
            ax.plot(rows["sparsity"] + shift, rows["mal"], color=c)
            points_with_ci(ax, rows["sparsity"] + shift, rows, "mal", "o", c, variants.label(line.method, line.loss))
        ax.set_title(f"{eval_set}: {column[1]} → {column[0]}", fontsize="medium")
        ax.set_xlabel(SPARSITY_LABEL)
        ax.set_ylabel(MAL_LABEL if j == 0 else "")
        ax.grid(alpha=0.3)

    return panel_grid(df, "eval_set", ["target", "draft"], title, draw, few_prompts_note(df, "mal"))


def plot_mal_vs_macs(measurements: pd.DataFrame, temperature: float = 0.0, k: int | None = None) -> Figure:
    """Rows: eval sets. Columns: targets. Every draft variant as a point; the Pareto front as a step line."""
    df = main_slice(measurements, temperature, k)
    title = slice_title("MAL against draft cost: which drafts are Pareto-optimal", df, temperature)
    if df.empty:
        return empty_figure(title)
    marks = {draft: MARKERS[d % len(MARKERS)] for d, draft in enumerate(sorted(df["draft"].unique()))}

    def draw(ax, panel, eval_set, column, j):
        for line in variant_order(panel, [])[["method", "loss"]].drop_duplicates().itertuples(index=False):
            for draft in marks:
                rows = panel[same_variant(panel, line.method, line.loss) & (panel["draft"] == draft)]
                if len(rows):
                    c, label = color(line.method, line.loss), variants.label(line.method, line.loss)
                    points_with_ci(ax, rows["draft_macs_per_token"], rows, "mal", marks[draft], c, label, zorder=3)
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

    # The marker tells the draft model only when there are several.
    extra = marker_entries(marks, "draft") if len(marks) > 1 else []
    return panel_grid(df, "eval_set", ["target"], title, draw, extra + few_prompts_note(df, "mal"))


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

    return panel_grid(df, "eval_set", ["target"], title, draw, few_prompts_note(df, value, bars=True))


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
    title = slice_title("Same-tokenizer target vs different-tokenizer (intersection) target: MAL", df, temperature)
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
            tok = "same tokenizer" if target.same_tokenizer else "different tokenizer, intersection"
            for x, combo in enumerate(combos.itertuples(index=False)):
                rows = panel[
                    (panel["target"] == target.target) & same_variant(panel, combo.method, combo.loss, combo.sparsity)
                ]
                if len(rows):
                    bar_with_ci(
                        ax,
                        x + (t - (len(targets) - 1) / 2) * width,
                        mean_row(rows),
                        "mal",
                        f"C{t}",
                        f"{target.target} ({tok})",
                        width=width,
                        capsize=2,
                        hatch=None if target.same_tokenizer else "//",
                        edgecolor="white",
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

    return panel_grid(df, "eval_set", ["draft"], title, draw, few_prompts_note(df, "mal", bars=True))


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


def tree_lines(axes, rows: pd.DataFrame, ref: pd.DataFrame, c: str, marker: str, label: str) -> None:
    """One draft variant in a column of the tree figure (axes: MAL, improvement factor): the tree against
    its budget with its CI band, the chain of as many nodes (`ref`) dotted, the branching above each MAL."""
    for ax, value in zip(axes, ("mal", "improvement_factor")):
        ax.plot(rows["tree_budget"], rows[value], "-", marker=marker, color=c, label=label)
        ax.fill_between(
            rows["tree_budget"], rows[f"{value}_ci_low"], rows[f"{value}_ci_high"], color=c, alpha=0.12, linewidth=0
        )
        ax.plot(ref["k"], ref[value], ":", marker=marker, markerfacecolor="none", color=c)
    for row in rows.itertuples(index=False):
        axes[0].annotate(
            str(row.tree_branching),
            (row.tree_budget, row.mal),
            textcoords="offset points",
            xytext=(0, 5),
            ha="center",
            fontsize="xx-small",
            color=c,
        )


def tree_column(axes, panel: pd.DataFrame, chain_panel: pd.DataFrame, marks: dict) -> None:
    """Every draft variant of one (eval set, target, draft) column: trees from `panel`, chains of
    as many nodes from `chain_panel`; the marker tells the sparsity level."""
    for combo in variant_order(panel, []).itertuples(index=False):
        rows = panel[same_variant(panel, combo.method, combo.loss, combo.sparsity)].sort_values("tree_budget")
        ref = chain_panel[
            same_variant(chain_panel, combo.method, combo.loss, combo.sparsity)
            & chain_panel["k"].isin(rows["tree_budget"])
        ].sort_values("k")
        label = variant_label(combo.method, combo.sparsity, combo.loss)
        tree_lines(axes, rows, ref, color(combo.method, combo.loss), marks[combo.sparsity], label)
    axes[1].axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    axes[1].set_xlabel(TREE_BUDGET_LABEL)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)


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
        tree_column(axes[:, j], panel, chain_panel, marks)
        axes[0, j].set_title(f"{eval_set}: {draft} → {target}", fontsize="medium")
        axes[0, j].set_ylabel(MAL_LABEL if j == 0 else "")
        axes[1, j].set_ylabel(IMPROVEMENT_LABEL if j == 0 else "")
    # Neutral legend entries for the two line styles, after the variants.
    styles = [
        Line2D([], [], linestyle="-", color="black", label="tree (shape per budget)"),
        Line2D([], [], linestyle=":", color="black", label="chain of as many nodes (k = n)"),
    ]
    figure_legend(fig, axes, styles)
    return fig


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
        for v in variant_order(panel, ["draft", "quantization"]).itertuples(index=False):
            rows = panel[same_variant(panel, v.method, v.loss, v.sparsity) & (panel["draft"] == v.draft)]
            rows = rows[rows["quantization"] == v.quantization]
            points_with_ci(
                ax,
                rows["draft_weight_bytes_per_token"],
                rows,
                "mal",
                QUANTIZATION_MARKERS.get(v.quantization, "X"),
                color(v.method, v.loss),
                variants.label(v.method, v.loss),
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

    present = set(df["quantization"])
    shown = {q: m for q, m in QUANTIZATION_MARKERS.items() if q in present}
    shown |= {q: "X" for q in sorted(present - set(QUANTIZATION_MARKERS))}
    extra = marker_entries(shown, "quantization") + few_prompts_note(df, "mal")
    return panel_grid(df, "eval_set", ["target"], title, draw, extra)


# ---------------------------------------------------------------- sparse kernels (benchmarks/sparse_kernels.py)
# Not in the figure registry: the benchmark draws it from its own table, rule `figures` never does.


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
