"""The figure registry: every figure rule `figures` draws, declared once with its caption.

Each entry names the figure (its file stem), the function that draws it (sd2.report.plots), the
tables it reads, and its caption: one sentence for the README and the report, and the report's
longer explanation. `make_figures` writes every figure; `write_captions` writes the caption files
that `snakemake --report` shows beside them (workflow/rules/aggregate.smk). No torch here.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from sd2.checkpoint import atomic_path
from sd2.report import plots
from sd2.report.canvas import save_figure
from sd2.report.collect import unquantized
from sd2.report.comparisons import MIN_PROMPTS_FOR_SIGNIFICANCE

CI_NOTE = (
    "error bars: 95% bootstrap CI over prompts, hollow and dotted where fewer than "
    f"{MIN_PROMPTS_FOR_SIGNIFICANCE} prompts make it unreliable."
)


@dataclass(frozen=True)
class FigureSpec:
    name: str  # file stem: results/figures/<name>.png and .pdf
    draw: Callable[..., Figure]  # called with the tables below, in order
    tables: tuple[str, ...]  # "measurements" and/or "training" (results/tables/<table>.csv)
    caption: str  # one sentence: the README's and the report's caption
    details: str  # the report's explanation below the caption
    # Quantized drafts drawn too; elsewhere they are left out, as a line per method would mix them.
    quantized: bool = False

    def rst(self) -> str:
        """The caption file of the Snakemake report."""
        return f"{self.caption}\n\n{self.details}\n"


FIGURES: dict[str, FigureSpec] = {}  # in drawing order


def register_figure(spec: FigureSpec) -> FigureSpec:
    """Add a figure to rule `figures` (and to the report, with its caption)."""
    if spec.name in FIGURES:
        raise ValueError(f"figure '{spec.name}' is registered already (known: {', '.join(FIGURES)})")
    FIGURES[spec.name] = spec
    return spec


register_figure(
    FigureSpec(
        "mal_vs_sparsity",
        plots.plot_mal_vs_sparsity,
        ("measurements",),
        caption=(
            "Mean Accepted Length (MAL, bonus token included) against draft sparsity, one line per draft-making "
            "method, greedy decoding; dense drafts are the dotted reference lines; " + CI_NOTE
        ),
        details=(
            "MAL is the mean number of tokens committed per target verification step, the target's bonus token "
            "included (1 to k+1 for a same-tokenizer pair; counted in target tokens for a different-tokenizer draft); "
            "final steps cut short by the token limit or EOS are excluded. One row of panels per evaluation set, one "
            "column per target and draft model. Points of different methods at one sparsity level are shifted "
            "slightly sideways so that their error bars stay apart."
        ),
    )
)


register_figure(
    FigureSpec(
        "mal_vs_macs",
        plots.plot_mal_vs_macs,
        ("measurements",),
        caption=(
            "MAL against draft MACs per token for every draft and method, greedy decoding; the grey step line is the "
            "Pareto front (the best MAL reachable at or below each cost); " + CI_NOTE
        ),
        details=(
            "MACs per token count the weights of the linear layers only (q, k, v, o, gate, up, down and lm_head); a "
            "sparse layer costs its non-zeros. A draft on the front is not beaten by any cheaper draft. Marker shape "
            "tells the draft model when there are several."
        ),
    )
)


register_figure(
    FigureSpec(
        "improvement_factor",
        plots.plot_improvement_factor,
        ("measurements",),
        caption=(
            "Theoretical improvement factor MAL / (1 + k·MACs_draft/MACs_target) of each draft, greedy decoding; "
            "above 1 speculative decoding beats autoregressive decoding in MACs; " + CI_NOTE
        ),
        details=(
            "The cost ratio c = MACs_draft / MACs_target replaces Leviathan et al.'s measured time ratio, so the "
            "factor is independent of hardware and sparse kernels. The dashed line marks 1 (no gain)."
        ),
    )
)


register_figure(
    FigureSpec(
        "mal_vs_k",
        plots.plot_mal_vs_k,
        ("measurements",),
        caption=(
            "MAL (top) and theoretical improvement factor (bottom) against the number of drafted tokens k, greedy "
            "decoding measured by the teacher-forced walk (same-tokenizer pairs), one line per draft; stars mark the "
            "k with the largest improvement factor; shaded bands: 95% bootstrap CI over prompts."
        ),
        details=(
            "The teacher-forced walk gives the exact greedy acceptance of every k = 1..k_max from one draft pass over "
            "the target's greedy continuation, so each line is one set of prompts seen at every k. It applies to "
            "same-tokenizer pairs only; the other figures show the reported k. MAL grows with k while the draft's "
            "cost per step grows too, so the improvement factor MAL / (1 + k·MACs_draft/MACs_target) can peak before "
            "the largest k. Colour tells the method, line style the sparsity level; the dashed line marks an "
            "improvement factor of 1 (no gain). With many targets, drafts and eval sets only the first eval set is "
            "shown, as the title says."
        ),
    )
)


register_figure(
    FigureSpec(
        "acceptance_by_position",
        plots.plot_acceptance_by_position,
        ("measurements",),
        caption=(
            "Share of verification steps in which the drafted token at each position was accepted, greedy decoding, "
            "one line per draft."
        ),
        details=(
            "Colour tells the method, line style the sparsity level. A position can only be accepted when every "
            "earlier drafted token was. With a different-tokenizer draft, positions are counted in target tokens, so "
            "there may be more than k."
        ),
    )
)


register_figure(
    FigureSpec(
        "tokenizer_comparison",
        plots.plot_tokenizer_comparison,
        ("measurements",),
        caption=(
            "MAL of each draft with a same-tokenizer target and with a different-tokenizer target (vLLM's token-level "
            "intersection), greedy decoding; " + CI_NOTE
        ),
        details=(
            "With a different-tokenizer target the draft reads and proposes only the tokens both vocabularies hold, "
            "mapped one for one (vLLM's token-level intersection, measured for every draft); hatched bars. "
            "transformers' Universal Assisted Generation, measured for the drafts the SD² comparisons use, is in the "
            "tables."
        ),
    )
)


register_figure(
    FigureSpec(
        "speedup",
        plots.plot_speedup,
        ("measurements",),
        caption=(
            "Measured CPU wall-clock speed-up of speculative decoding over autoregressive decoding of the target "
            "(tokens/s ratio, batch size 1), greedy decoding."
        ),
        details=(
            "Measured with transformers' assisted generation at batch size 1. Pruned weights are kept as dense "
            "tensors holding zeros, so on CPU a sparse draft runs at its dense cost: this figure shows the gain from "
            "MAL alone, while the improvement-factor figure credits the MAC savings. The dashed line marks 1 (no "
            "gain)."
        ),
    )
)


register_figure(
    FigureSpec(
        "loss_curves",
        plots.plot_loss_curves,
        ("training",),
        caption=(
            "Loss curves: pretraining of the from-scratch models (against tokens) and fine-tuning of each draft "
            "(against steps); solid validation, dashed training loss."
        ),
        details=(
            "Pretraining curves are against training tokens, fine-tuning curves against optimizer steps; sparse "
            "drafts are fine-tuned with their pruning masks held fixed."
        ),
    )
)


register_figure(
    FigureSpec(
        "mal_vs_tree_budget",
        plots.plot_mal_vs_tree_budget,
        ("measurements",),
        caption=(
            "MAL (top) and theoretical improvement factor MAL / (1 + expanded nodes·MACs_draft/MACs_target) (bottom) "
            "against the node budget of a static draft-token tree, greedy decoding measured exactly from the draft's "
            "teacher-forced ranks (same-tokenizer pairs), one solid line per draft with its branching per depth "
            "written above each point; dotted: the chain with as many draft tokens (k = budget) where the walk "
            "measured it; shaded bands: 95% bootstrap CI over prompts."
        ),
        details=(
            "A static draft-token tree gives every node at depth d-1 the draft's top-b_d tokens as children; greedy "
            "verification accepts the longest root path equal to the target's greedy continuation, so one "
            "teacher-forced pass of the draft gives every tree exactly: a step starting at t accepts the largest "
            "depth d at which the target's tokens y[t], ..., y[t+d-1] all rank within their depth's branching. For "
            "each node budget n (measure.tree_budgets) the shape is the branching with at most n nodes that maximises "
            "the expected accepted length when ranks are treated as independent, with the draft's own rank "
            "distribution on this eval set (sd2/measure/trees.py); the table's tree_branching column gives it, and "
            "tree_nodes_expanded the draft forwards it costs per step (the root and every node above the last depth). "
            "A tree never accepts less than the chain it contains, but it costs more draft forwards and a wider "
            "target verification (tree_verify_width = nodes + 1 tokens), so its improvement factor can fall while its "
            "MAL rises. Every tree's numbers were checked on the first n_check prompts against a tree decoding loop "
            "of our own (one target forward with a tree attention mask per step): the same tokens as the target "
            "alone, the same committed counts step by step. Colour tells the method, the marker the sparsity level; "
            "the dashed line marks an improvement factor of 1 (no gain). With many targets, drafts and eval sets only "
            "the first eval set is shown, as the title says."
        ),
    )
)


register_figure(
    FigureSpec(
        "mal_vs_weight_bytes",
        plots.plot_mal_vs_weight_bytes,
        ("measurements",),
        quantized=True,
        caption=(
            "MAL against the bytes of weights each draft reads per generated token (log scale): 16-bit weights, "
            "quantized decoder layers at 8 or 4 bits with their scales, sparse layers in a bitmask layout where it is "
            "smaller; marker = quantization, colour = method; the grey step line is the Pareto front; " + CI_NOTE
        ),
        details=(
            "Each draft reads every linear layer's weights once per generated token; the x axis counts those bytes "
            "with each layer in its smallest stored layout (sd2/measure/weight_bytes.py): dense, a bitmask (one bit "
            "per position plus the non-zeros) or CSR (a 16-bit index per non-zero). Unquantized weights count 16 bits "
            "(bf16, as served), quantized decoder layers (config quantization: w8a16, w4a16, and their -qat variants "
            "fine-tuned with the quantization in the forward pass) their bits plus one 16-bit scale per group; "
            "lm_head is read whole at 16 bits. A quantized draft is measured with its quantized weights, dequantized "
            "in the forward pass. The quantized checkpoints (compressed-tensors, pack-quantized) store a sparse "
            "draft's zeros as quantized zeros: the bitmask bytes are what a sparse store would read, counted from the "
            "mask, not what is on disk."
        ),
    )
)


def make_figures(tables_dir, out_dir) -> list[Path]:
    """Every figure of FIGURES as out_dir/{name}.png and .pdf; returns the paths in FIGURES order."""
    measurements, training = plots.load_tables(tables_dir)
    tables = {"measurements": measurements, "training": training}
    methods_only = {"measurements": unquantized(measurements), "training": training}
    paths = []
    for spec in FIGURES.values():
        fig = spec.draw(*((tables if spec.quantized else methods_only)[t] for t in spec.tables))
        paths += save_figure(fig, out_dir, spec.name)
    return paths


def write_captions(out_dir) -> dict[str, str]:
    """{figure name: absolute path of its caption file}: out_dir/{name}.rst, rewritten only when its text
    changed (the workflow calls this on every parse)."""
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for spec in FIGURES.values():
        path = out_dir / f"{spec.name}.rst"
        if not path.exists() or path.read_text() != spec.rst():
            with atomic_path(path) as tmp:
                tmp.write_text(spec.rst())
        paths[spec.name] = str(path)
    return paths
