"""The one registry of draft-making methods, start points, fine-tuning losses and draft-head
families.

A method says how a draft is made: from which start point (`init`, a key of START_POINTS: the
dense draft, its SparseGPT-pruned copy, or its layer-pruned copy), tuned on which data (`data`:
the target's self-distilled answers, the original responses, or None for an untuned draft), at
every level of `sparsities` or at 0 only (`sparse`), with a fixed loss or the config's `losses`.
Everything else is derived from these entries: the config schema's name lists (sd2.config), the
Snakemake rules' wildcard patterns, paths and inputs (workflow/rules/common.smk), the tables
(sd2.report.collect, sd2.report.comparisons), the figures (sd2.report.figures) and the exports. An extension module adds
entries with register_method, register_loss and register_head (docs/extending.md) and is named
in the config's `extensions`.

The names the sweep gives its drafts (`sd2+kl@w4a16`) and which drafts it makes for a (target,
draft) pair are sd2.variants'.

No torch here: the DAG, the tables and the figures import this module.
"""

import importlib
import os
import re
from dataclasses import dataclass, field

from sd2.errors import ConfigError


@dataclass(frozen=True)
class StartPoint:
    """The checkpoint a draft method begins from (Method.init) and the rule that makes it."""

    name: str
    rule: str | None  # the rule that makes it; None: the draft model's own checkpoint (no job)
    # Its path under workdir, formatted with draft, data (a target, or "original" for the original
    # responses: what it was calibrated on) and sparsity; None: the draft model's own checkpoint.
    path: str | None
    # A masked copy of the dense draft: its layers pair with the dense draft's (the squarehead loss).
    masked: bool
    description: str


START_POINTS = {
    "dense": StartPoint("dense", None, None, False, "the dense draft itself"),
    # An untuned pruned draft is calibrated on the target's self-distilled data, a tuned one on its own data.
    "pruned": StartPoint(
        "pruned", "prune", "pruned/{data}/{draft}/s{sparsity}", True, "the dense draft, SparseGPT-pruned"
    ),
    "layer_pruned": StartPoint(
        "layer_pruned",
        "layer_prune",
        "layer_pruned/{draft}/s{sparsity}",
        False,
        "the dense draft with whole decoder layers dropped to match a sparse draft's MACs",
    ),
}


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # what tables and figures call it
    kind: str  # "draft": made by workflow/rules/drafts.smk; "head": a target-dependent draft head (heads.smk)
    init: str | None  # a key of START_POINTS; None for a head
    data: str | None  # fine-tuning data: "target" (self-distilled), "original" (responses), None (not tuned)
    sparse: bool  # made at every level of `sparsities` (else at sparsity 0)
    loss: str | None  # a fixed fine-tuning loss; None = the config's `losses` (when tuned)
    color: str  # one colour per method in every figure

    @property
    def tuned(self) -> bool:
        return self.data is not None


# Table and legend order: baselines first, the paper's method last (registered methods after it).
# The SD² paper's own methods keep their names as labels (the figures of earlier runs). METHODS,
# BY_NAME and NAMES are updated in place by register_method, so their importers see registrations.
METHODS = [
    Method("dense", "dense", "draft", "dense", None, False, None, "#7f7f7f"),
    Method("dense_sd", "dense_sd", "draft", "dense", "target", False, None, "#1f77b4"),
    # Direct Alignment (Goel et al. 2024, arXiv 2403.00858): TVD++ on the target's own answers.
    Method("direct_align", "Direct Alignment", "draft", "dense", "target", False, "tvdpp", "#2ca02c"),
    # Target-dependent draft heads (ReDrafter, Zhang et al. 2024; Mixture of Attentions, Zimmer et al.
    # 2024), trained on the target's self-distilled data by their own rules.
    Method("redrafter", "ReDrafter", "head", None, "target", False, None, "#8c564b"),
    Method("moa", "MoA", "head", None, "target", False, None, "#e377c2"),
    Method("sparse_oneshot", "sparse_oneshot", "draft", "pruned", None, True, None, "#bcbd22"),
    Method("sparse_sft", "sparse_sft", "draft", "pruned", "original", True, None, "#9467bd"),
    Method("layer_pruned", "layer_pruned", "draft", "layer_pruned", "target", True, None, "#ff7f0e"),
    # SD² (arXiv 2504.08838): SparseGPT-pruned on the target's answers, then self-distilled.
    Method("sd2", "sd2", "draft", "pruned", "target", True, None, "#d62728"),
]
BY_NAME = {m.name: m for m in METHODS}
NAMES = list(BY_NAME)
UNKNOWN_COLOR = "#17becf"


@dataclass(frozen=True)
class Loss:
    name: str
    teacher: str | None  # "target": the target's logits; "draft": the dense draft itself; None: no teacher
    description: str
    objective: str  # "module:function" that implements it (sd2.drafts.losses), resolved only in the job
    shade: float = 0.0  # a loss variant's colour: its method's, lightened (> 0) or darkened (< 0)
    # Trained on the draft's own answers to the data's prompts, the target correcting them
    # (sd2.drafts.skd, settings finetune.skd_*), instead of on the data's responses.
    on_policy: bool = False
    # Teaches the draft to propose several tokens per pass from mask tokens (sd2.parallel, settings
    # `parallel`): the checkpoint names its mask token, and measuring reads its proposals in parallel.
    parallel: bool = False


# Order of loss variants in tables and legends; ce is the default of every tuned method.
LOSSES = {
    "ce": Loss("ce", None, "cross-entropy on the responses", "sd2.drafts.losses:ce"),
    "kl": Loss("kl", "target", "forward KL to the target's logits", "sd2.drafts.losses:kl", 0.45),
    "tvdpp": Loss("tvdpp", "target", "TVD++ (Goel et al. 2024)", "sd2.drafts.losses:tvdpp", -0.4),
    "squarehead": Loss(
        "squarehead",
        "draft",
        "per-layer MSE to the dense draft's normalised hidden states",
        "sd2.drafts.losses:squarehead",
        0.7,
    ),
    "skd": Loss(
        "skd",
        "target",
        "speculative knowledge distillation (on-policy, the target corrects the draft)",
        "sd2.drafts.losses:skd",
        -0.65,
        on_policy=True,
    ),
    "pard": Loss(
        "pard",
        None,
        "parallel drafting (PARD): cross-entropy of k tokens proposed in one pass from k - 1 mask tokens",
        "sd2.drafts.losses:pard",
        0.25,
        parallel=True,
    ),
}


@dataclass(frozen=True)
class HeadFamily:
    """A target-dependent draft head (kind "head" in METHODS): its nn.Module, how it proposes, and
    its sizes (the config's heads.sizes.<name>: every size name becomes a head <name>-<size>)."""

    name: str
    module: str  # "module:Class" of the head (a sd2.drafters.base.DraftHead), resolved only in the job
    beams: bool  # proposes heads.beam_width beams (True) or one chain
    # JSON schema of one size's keys (the keyword arguments of the head's constructor besides the
    # target); a key without a default is required.
    size: dict = field(default_factory=dict)
    default_sizes: dict = field(default_factory=lambda: {"default": {}})  # heads.sizes.<name>'s default
    description: str = ""  # what heads.sizes.<name> says about the sizes


HEAD_FAMILIES = {
    "redrafter": HeadFamily(
        "redrafter",
        "sd2.drafters.redrafter:ReDrafter",
        True,
        {
            "layers": {
                "type": "integer",
                "minimum": 0,
                "description": "ResBlocks (2H x 2H each) before the projection into the target's lm_head.",
            }
        },
        {"small": {"layers": 1}, "large": {"layers": 2}},
        "ReDrafter sizes: layers = ResBlocks of its MLP over [RNN state; target hidden state] (the state has "
        "the target's hidden size, as in the paper).",
    ),
    "moa": HeadFamily(
        "moa",
        "sd2.drafters.moa:MixtureOfAttentions",
        False,
        {
            "layers": {"type": "integer", "minimum": 1, "description": "Drafter layers."},
            "width": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": 1,
                "default": 0.25,
                "description": "The drafter's width (and its Layer Self-Attention's) as a fraction of the "
                "target's hidden size.",
            },
            "attention_heads": {
                "type": ["integer", "null"],
                "minimum": 1,
                "default": None,
                "description": "Attention heads (null = the target's heads x width); width x hidden must be "
                "divisible by it.",
            },
        },
        {"small": {"layers": 1, "width": 0.25}, "large": {"layers": 2, "width": 0.5}},
        "Mixture of Attentions sizes: drafter layers (self-attention over the drafted tokens, cross-attention "
        "to the verified context, MLP), width, attention heads.",
    ),
}


def resolve(reference: str):
    """The object a "module:attribute" reference of the registry names (imports the module)."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


# ---------------------------------------------------------------- extensions

# The config's `extensions`, as the workflow hands them to every job (common.smk), so that a job
# finds what they registered when it looks a name up.
EXTENSIONS_ENV = "SD2_EXTENSIONS"
NAME_PATTERN = r"[A-Za-z0-9_]+"  # a registered name: no '+', '@' or '-', which separate variant parts


def load_extensions(modules) -> None:
    """Import each extension module; importing one runs its register_* calls (once per process)."""
    for module in modules:
        importlib.import_module(module)


def _env_extensions() -> None:
    load_extensions(m for m in os.environ.get(EXTENSIONS_ENV, "").split(",") if m)


def _lookup(table: dict, name: str, kind: str):
    """table[name]; an unknown name first imports the job's extensions, then is a ConfigError naming the known ones."""
    if name not in table:
        _env_extensions()
    if name not in table:
        raise ConfigError(f"unknown {kind} '{name}' (known: {', '.join(table)})")
    return table[name]


def _add(table: dict, entry, kind: str) -> None:
    """One registry entry per name: registering the same entry again (a re-imported module) is a no-op."""
    if not re.fullmatch(NAME_PATTERN, entry.name):
        raise ConfigError(f"{kind} name '{entry.name}': letters, digits and _ only")
    if table.get(entry.name, entry) != entry:
        raise ConfigError(f"{kind} '{entry.name}' is already registered, as {table[entry.name]}")
    table[entry.name] = entry


def register_loss(entry: Loss) -> Loss:
    """Add a fine-tuning loss: a name of the config's `losses`, fine-tuned by rule finetune with
    `entry.objective` ("module:function", objective(model, teacher, batch, chunk_tokens) -> loss)."""
    if entry.teacher not in (None, "target", "draft"):
        raise ConfigError(f"loss '{entry.name}': teacher must be None, 'target' or 'draft', not {entry.teacher!r}")
    _add(LOSSES, entry, "loss")
    return entry


def register_method(entry: Method) -> Method:
    """Add a draft-making method (kind "draft": from a start point, tuned by rule finetune or not);
    it is listed after the built-in methods in tables and legends. A head is register_head's."""
    if entry.kind != "draft":
        raise ConfigError(f"method '{entry.name}': kind must be 'draft' (a head: register_head), not {entry.kind!r}")
    start_point(entry.init)
    if entry.data not in (None, "target", "original"):
        raise ConfigError(f"method '{entry.name}': data must be None, 'target' or 'original', not {entry.data!r}")
    if entry.loss is not None:
        loss(entry.loss)
        if not entry.tuned:
            raise ConfigError(f"method '{entry.name}': a fixed loss needs fine-tuning data")
    _add_method(entry)
    return entry


def register_head(family: HeadFamily, method: Method) -> HeadFamily:
    """Add a draft-head family and its method (kind "head", init None, the same name): trained by
    rule train_head, measured by rule measure_head, sized by the config's heads.sizes.<name>."""
    if method.name != family.name or method.kind != "head" or method.init is not None:
        raise ConfigError(f"head '{family.name}': its method needs the same name, kind 'head' and init None")
    _add(HEAD_FAMILIES, family, "draft-head family")
    _add_method(method)
    return family


def _add_method(entry: Method) -> None:
    _add(BY_NAME, entry, "method")
    if entry.name not in NAMES:
        METHODS.append(entry)
        NAMES.append(entry.name)


def loss(name: str) -> Loss:
    return _lookup(LOSSES, name, "loss")


def head_family(name: str) -> HeadFamily:
    return _lookup(HEAD_FAMILIES, name, "draft-head family")


def start_point(name: str) -> StartPoint:
    return _lookup(START_POINTS, name, "start point")


def head_pattern() -> str:
    """A regular expression of every head name, <family>-<size> (the head rules' wildcard constraint)."""
    return rf"(?:{'|'.join(HEAD_FAMILIES)})-[A-Za-z0-9_.]+"


DEFAULT_LOSS = "ce"


def method(name: str) -> Method:
    return _lookup(BY_NAME, name, "method")


def rank(name: str) -> int:
    """Position in the table/legend order; unknown methods after the known ones."""
    return NAMES.index(name) if name in BY_NAME else len(NAMES)


def loss_rank(loss) -> int:
    """ce first, then LOSSES order; no loss (an untuned draft) before all of them."""
    if not isinstance(loss, str):
        return -1
    return list(LOSSES).index(loss) if loss in LOSSES else len(LOSSES)


def default_loss(name: str) -> str | None:
    """The loss a method's own name stands for: its fixed loss, ce when tuned, None when not tuned
    (and for a head, whose training is its own rules')."""
    m = BY_NAME.get(name)
    if m is None or not m.tuned or m.kind != "draft":
        return None
    return m.loss or DEFAULT_LOSS


def ce_counterpart(name: str) -> str | None:
    """The method whose ce variant a loss variant of `name` is compared with: `name` itself, or for a
    fixed-loss method the method made the same way without a fixed loss (direct_align -> dense_sd)."""
    m = BY_NAME.get(name)
    if m is None or default_loss(name) is None:
        return None
    if m.loss is None:
        return name
    same = [o.name for o in METHODS if o.loss is None and recipe(o) == recipe(m)]
    return same[0] if same else None


def recipe(m: Method) -> tuple:
    """What makes a method's checkpoint, its loss aside: two methods with the same recipe and loss are one draft."""
    return (m.kind, m.init, m.data, m.sparse)


def takes_losses(m: Method) -> bool:
    """Whether the `losses` axis fans the method out: a tuned draft without a loss of its own."""
    return m.kind == "draft" and m.tuned and m.loss is None
