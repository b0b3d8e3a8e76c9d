"""The one registry of draft-making methods, start points, fine-tuning losses and draft-head
families, and the sweep's draft variants.

A method says how a draft is made: from which start point (`init`, a key of START_POINTS: the
dense draft, its SparseGPT-pruned copy, or its layer-pruned copy), tuned on which data (`data`:
the target's self-distilled answers, the original responses, or None for an untuned draft), at
every level of `sparsities` or at 0 only (`sparse`), with a fixed loss or the config's `losses`.
Everything else is derived from these entries: the config schema's name lists (sd2.config), the
Snakemake rules' wildcard patterns, paths and inputs (workflow/rules/common.smk), the tables
(sd2.report.collect, sd2.report.comparisons), the figures (sd2.report.figures) and the exports. An extension module adds
entries with register_method, register_loss and register_head (docs/extending.md) and is named
in the config's `extensions`.

Loss is a sweep axis: a tuned method without a fixed loss is fine-tuned once per entry of
the config's `losses`. The ce variant keeps the method's own name (the paths and records of
earlier runs); any other is named `<method>+<loss>` (e.g. `sd2+kl`) in paths, records and
the `method` label of the rules, and sd2.report.collect splits that name back into `method` and
`loss`. A variant that cannot be made for a (target, draft) pair is skipped, not an error
(`skipped` says which and why):
- kl, tvdpp and skd read the target's logits: only for methods tuned on the target's own data,
  and only where draft and target share a tokenizer (`shares_tokenizer`);
- squarehead matches the dense draft's hidden states layer by layer: only for masked copies of
  the dense draft (init "pruned"), not for the layer-pruned baseline, whose layers no longer pair;
- a variant identical to a listed method with that fixed loss (dense_sd+tvdpp is direct_align)
  is made once, under that method's name.

No torch here: the DAG, the tables and the figures import this module.
"""

import importlib
import os
import re
from dataclasses import dataclass, field

from sd2.errors import ConfigError
from sd2.shapes import model_shape


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
SEPARATOR = "+"
# Weight quantization after the draft is made (sd2.drafts.quantize): a sweep axis like the losses.
# "none" keeps the variant's name; any other is named `<variant>@<scheme>` (e.g. `sd2+kl@w4a16`).
# `<scheme>-qat` (config quantize.aware): the tuned variant fine-tuned again from its init with the
# forward fake-quantised to <scheme> (same data, steps and loss, masks held), then quantized to
# <scheme> as the one-shot variant is: the same quantization, seen or not during fine-tuning.
ONE_SHOT_QUANTIZATIONS = ("w8a16", "w4a16")
QAT_SUFFIX = "-qat"
QUANTIZATIONS = ("none", *(q for one_shot in ONE_SHOT_QUANTIZATIONS for q in (one_shot, one_shot + QAT_SUFFIX)))
NO_QUANTIZATION = "none"
QUANT_SEPARATOR = "@"


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


def variant_name(name: str, loss: str | None) -> str:
    """'sd2' for sd2 with ce (the names of earlier runs), 'sd2+kl' with kl."""
    if loss is None or loss == default_loss(name):
        return name
    variant = f"{name}{SEPARATOR}{loss}"
    parse_variant(variant)  # refuses a loss the method is not made with
    return variant


def split_quantization(variant: str) -> tuple[str, str]:
    """'sd2+kl@w4a16' -> ('sd2+kl', 'w4a16'); 'sd2@w4a16-qat' -> ('sd2', 'w4a16-qat'); 'sd2' -> ('sd2', 'none')."""
    base, sep, scheme = variant.partition(QUANT_SEPARATOR)
    if not sep:
        return base, NO_QUANTIZATION
    if scheme not in QUANTIZATIONS or scheme == NO_QUANTIZATION:
        raise ValueError(f"'{variant}': unknown quantization '{scheme}' (known: {', '.join(QUANTIZATIONS[1:])})")
    name = base.partition(SEPARATOR)[0]
    if quantization_aware(scheme) and name in BY_NAME and not BY_NAME[name].tuned:
        raise ValueError(f"'{variant}': quantization-aware fine-tuning needs a fine-tuned method; {name} is not one")
    return base, scheme


def quantization_aware(scheme: str) -> bool:
    """Whether a scheme of QUANTIZATIONS is quantization-aware fine-tuning ('w4a16-qat')."""
    return scheme.endswith(QAT_SUFFIX)


def base_scheme(scheme: str) -> str:
    """The weight format a scheme stores: 'w4a16-qat' -> 'w4a16' (a QAT draft is quantized as the one-shot one)."""
    return scheme.removesuffix(QAT_SUFFIX)


def quantized_name(variant: str, scheme: str) -> str:
    """'sd2' with 'w4a16' -> 'sd2@w4a16'; with 'none' -> 'sd2'."""
    return variant if scheme == NO_QUANTIZATION else f"{variant}{QUANT_SEPARATOR}{scheme}"


def parse_variant(variant: str) -> tuple[str, str | None]:
    """'sd2+kl' -> ('sd2', 'kl'); 'sd2' -> ('sd2', 'ce'); 'direct_align' -> ('direct_align', 'tvdpp');
    'dense' -> ('dense', None): the registry's method and the loss of its fine-tuning (a quantized
    variant's too: split_quantization gives its scheme)."""
    name, sep, loss = split_quantization(variant)[0].partition(SEPARATOR)
    if sep:
        if loss not in LOSSES:
            raise ValueError(f"'{variant}': unknown loss '{loss}' (known: {', '.join(LOSSES)})")
        if name in BY_NAME and not takes_losses(BY_NAME[name]):
            raise ValueError(f"'{variant}': {name} is not fine-tuned with the `losses` axis")
        if loss == default_loss(name):
            raise ValueError(f"'{variant}': {name} with {loss} is named '{name}'")
        return name, loss
    return name, default_loss(name)


def label(name: str, loss=None, quantization=None) -> str:
    """'Direct Alignment', 'sd2', 'sd2 (kl)', 'sd2 w4a16': the method's label, with the loss when it is
    not the method's own and the quantization when there is one."""
    base = BY_NAME[name].label if name in BY_NAME else name
    if isinstance(loss, str) and loss != default_loss(name):
        base = f"{base} ({loss})"
    if isinstance(quantization, str) and quantization != NO_QUANTIZATION:
        base = f"{base} {quantization}"
    return base


def quantization_rank(scheme) -> int:
    """Unquantized first, then QUANTIZATIONS order."""
    return QUANTIZATIONS.index(scheme) if scheme in QUANTIZATIONS else 0


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


def variant_pattern(tuned_only: bool = False, quantized: bool = False) -> str:
    """A regular expression of every draft variant name ('sd2', 'sd2+kl'; heads excluded), for the
    rules' wildcard constraints; `tuned_only`: the variants fine-tuned from an init; `quantized`:
    with an optional '@<scheme>' (the variants rule measure reads; '-qat' schemes for tuned ones only)."""
    drafts = [m for m in METHODS if m.kind == "draft" and (m.tuned or not tuned_only)]
    fixed = "|".join(m.name for m in drafts if not takes_losses(m))
    axis = "|".join(m.name for m in drafts if takes_losses(m))
    others = "|".join(loss for loss in LOSSES if loss != DEFAULT_LOSS)
    pattern = rf"(?:{fixed}|(?:{axis})(?:\{SEPARATOR}(?:{others}))?)"
    return rf"(?:{pattern}|{quantized_pattern()})" if quantized else pattern


def quantized_pattern() -> str:
    """The quantized variant names (rule quantize's outputs): any variant '@' a one-shot scheme, a
    tuned one also '@' a quantization-aware scheme."""
    one_shot = "|".join(q for q in QUANTIZATIONS[1:] if not quantization_aware(q))
    aware = "|".join(q for q in QUANTIZATIONS if quantization_aware(q))
    at = QUANT_SEPARATOR
    return rf"(?:{variant_pattern()}{at}(?:{one_shot})|{variant_pattern(tuned_only=True)}{at}(?:{aware}))"


def finetuned_pattern() -> str:
    """The checkpoints rule finetune makes: the tuned variants, and each '@' a quantization-aware
    scheme (its fine-tuning with the forward fake-quantised, before rule quantize)."""
    aware = "|".join(q for q in QUANTIZATIONS if quantization_aware(q))
    return rf"{variant_pattern(tuned_only=True)}(?:{QUANT_SEPARATOR}(?:{aware}))?"


# ---------------------------------------------------------------- the sweep's variants


def shares_tokenizer(config: dict, a: str, b: str) -> bool:
    """Whether models `a` and `b` of the config share a tokenizer, decided before any job runs.

    From-scratch models: the same `tokenizer` family (one tokenizer is trained per family).
    Hub models: the same vocabulary size (their `shape` or a local checkpoint's config.json);
    a size that cannot be known without downloading counts as different. Fine-tuning checks
    the tokenizers themselves (sd2.models.same_tokenizer) and stops where a guess was wrong.
    A from-scratch model never shares a tokenizer with a hub model.
    """
    spec_a, spec_b = config["models"][a], config["models"][b]
    if "hub" not in spec_a and "hub" not in spec_b:
        return spec_a["tokenizer"] == spec_b["tokenizer"]
    if "hub" not in spec_a or "hub" not in spec_b:
        return False
    try:
        return model_shape(a, config).vocab_size == model_shape(b, config).vocab_size
    except ConfigError:
        return False


def skip_reason(config: dict, target: str, draft: str, name: str, loss: str | None) -> str | None:
    """Why (method, loss) is not made for this (target, draft) pair, or None when it is."""
    m = BY_NAME[name]
    teacher = LOSSES[loss].teacher if loss else None
    if teacher == "target":
        if m.data != "target":
            return f"loss {loss} reads the target's logits, and {name} is tuned on {m.data} data, not the target's"
        if not shares_tokenizer(config, draft, target):
            return f"loss {loss} compares token distributions, and {draft} and {target} do not share a tokenizer"
    if teacher == "draft" and not START_POINTS[m.init].masked:
        return f"loss {loss} pairs the dense draft's layers with its masked copy's, and {name} is not a masked copy"
    if loss and m.loss is None:
        same = [o.name for o in map(BY_NAME.get, config["methods"]) if o.loss == loss and recipe(o) == recipe(m)]
        if same:
            return f"{name} with {loss} is {same[0]}, made under that name"
    return None


@dataclass(frozen=True)
class Variant:
    """One draft of a (target, draft) pair: `name` is what paths, records and rules call it."""

    name: str
    method: str
    loss: str | None
    sparsity: int
    quantization: str = NO_QUANTIZATION


def candidates(config: dict):
    """(method, loss) of every listed draft-kind method: fixed-loss and untuned methods once,
    the others once per entry of `losses`, in config order."""
    for name in config["methods"]:
        m = BY_NAME[name]
        if m.kind != "draft":
            continue  # heads are made by their own rules (workflow/rules/heads.smk)
        if not takes_losses(m):
            yield name, m.loss
        else:
            yield from ((name, loss) for loss in config["losses"])


def variants(config: dict, target: str, draft: str, quantized: bool = False) -> list[Variant]:
    """Every draft the sweep makes for one (target, draft) pair: methods in config order, then
    losses in config order, then sparsity levels (0 only for dense methods). `quantized`: each
    also once per quantization scheme of the config's `quantization` (after its unquantized self),
    a tuned one with `quantize.aware` also once per '<scheme>-qat' (after '<scheme>')."""
    schemes = config.get("quantization", [NO_QUANTIZATION]) if quantized else [NO_QUANTIZATION]
    with_qat = [q for s in schemes for q in ((s,) if s == NO_QUANTIZATION else (s, s + QAT_SUFFIX))]
    out = []
    for name, loss in candidates(config):
        if skip_reason(config, target, draft, name, loss) is None:
            levels = config["sparsities"] if BY_NAME[name].sparse else [0]
            qs = with_qat if BY_NAME[name].tuned and config.get("quantize", {}).get("aware") else schemes
            out += [Variant(quantized_name(variant_name(name, loss), q), name, loss, s, q) for s in levels for q in qs]
    return out


def skipped(config: dict) -> list[dict]:
    """Every (target, draft, method, loss) the config asks for but the sweep cannot make, with the reason."""
    out = []
    for target in config["targets"]:
        for draft in config["drafts"]:
            if draft == target:
                continue
            for name, loss in candidates(config):
                reason = skip_reason(config, target, draft, name, loss)
                if reason:
                    out.append({"target": target, "draft": draft, "method": name, "loss": loss, "reason": reason})
    return out
