"""Draft variants: the names the sweep gives its drafts and which drafts it makes for a pair.

A variant is a registered method (sd2.methods) with the loss it was fine-tuned with and the
quantization applied after: `sd2`, `sd2+kl`, `sd2+kl@w4a16`, `sd2@w4a16-qat`. Paths, records, the
rules' wildcards and the tables all use these names; this module makes and parses them, and lists
the variants a config asks for (skipping, with the reason, those a pair cannot make).

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
- pard makes a parallel draft, whose exact walk is built for a shared tokenizer only;
- a variant identical to a listed method with that fixed loss (dense_sd+tvdpp is direct_align)
  is made once, under that method's name.

No torch here: the DAG, the tables and the figures import this module.
"""

from dataclasses import dataclass

from sd2 import methods
from sd2.errors import ConfigError
from sd2.shapes import model_shape

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


def variant_name(name: str, loss: str | None) -> str:
    """'sd2' for sd2 with ce (the names of earlier runs), 'sd2+kl' with kl."""
    if loss is None or loss == methods.default_loss(name):
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
    if quantization_aware(scheme) and name in methods.BY_NAME and not methods.BY_NAME[name].tuned:
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
        if loss not in methods.LOSSES:
            raise ValueError(f"'{variant}': unknown loss '{loss}' (known: {', '.join(methods.LOSSES)})")
        if name in methods.BY_NAME and not methods.takes_losses(methods.BY_NAME[name]):
            raise ValueError(f"'{variant}': {name} is not fine-tuned with the `losses` axis")
        if loss == methods.default_loss(name):
            raise ValueError(f"'{variant}': {name} with {loss} is named '{name}'")
        return name, loss
    return name, methods.default_loss(name)


def label(name: str, loss=None, quantization=None) -> str:
    """'Direct Alignment', 'sd2', 'sd2 (kl)', 'sd2 w4a16': the method's label, with the loss when it is
    not the method's own and the quantization when there is one."""
    base = methods.BY_NAME[name].label if name in methods.BY_NAME else name
    if isinstance(loss, str) and loss != methods.default_loss(name):
        base = f"{base} ({loss})"
    if isinstance(quantization, str) and quantization != NO_QUANTIZATION:
        base = f"{base} {quantization}"
    return base


def quantization_rank(scheme) -> int:
    """Unquantized first, then QUANTIZATIONS order."""
    return QUANTIZATIONS.index(scheme) if scheme in QUANTIZATIONS else 0


def variant_pattern(tuned_only: bool = False, quantized: bool = False) -> str:
    """A regular expression of every draft variant name ('sd2', 'sd2+kl'; heads excluded), for the
    rules' wildcard constraints; `tuned_only`: the variants fine-tuned from an init; `quantized`:
    with an optional '@<scheme>' (the variants rule measure reads; '-qat' schemes for tuned ones only)."""
    drafts = [m for m in methods.METHODS if m.kind == "draft" and (m.tuned or not tuned_only)]
    fixed = "|".join(m.name for m in drafts if not methods.takes_losses(m))
    axis = "|".join(m.name for m in drafts if methods.takes_losses(m))
    others = "|".join(loss for loss in methods.LOSSES if loss != methods.DEFAULT_LOSS)
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


def tokenizer_source(config: dict, name: str) -> tuple[str, str]:
    """Where model `name`'s tokenizer comes from: ("model", a hub model's name) for a hub model, a draft cut
    from its layers (`layers_of`) and a from-scratch model whose family copies its tokenizer (`from_model`);
    ("family", the family) for a from-scratch model of a tokenizer trained here."""
    spec = config["models"][name]
    if "layers_of" in spec:
        return tokenizer_source(config, spec["layers_of"]["model"])
    if "hub" in spec:
        return "model", name
    family = config.get("tokenizers", {}).get(spec["tokenizer"], {})
    if family.get("kind") == "from_model":
        return tokenizer_source(config, family["model"])
    return "family", spec["tokenizer"]


def shares_tokenizer(config: dict, a: str, b: str) -> bool:
    """Whether models `a` and `b` of the config share a tokenizer, decided before any job runs.

    The same tokenizer source (tokenizer_source: one family trained here, or one hub model's,
    copied or inherited) shares it. Two hub models: the same vocabulary size (their `shape` or a
    local checkpoint's config.json); a size that cannot be known without downloading counts as
    different. Fine-tuning checks the tokenizers themselves (sd2.models.same_tokenizer) and stops
    where a guess was wrong. A tokenizer trained here never matches a hub model's.
    """
    source_a, source_b = tokenizer_source(config, a), tokenizer_source(config, b)
    if source_a == source_b:
        return True
    if source_a[0] != "model" or source_b[0] != "model":
        return False
    try:
        return model_shape(source_a[1], config).vocab_size == model_shape(source_b[1], config).vocab_size
    except ConfigError:
        return False


def skip_reason(config: dict, target: str, draft: str, name: str, loss: str | None) -> str | None:
    """Why (method, loss) is not made for this (target, draft) pair, or None when it is."""
    m = methods.BY_NAME[name]
    teacher = methods.LOSSES[loss].teacher if loss else None
    if teacher == "target":
        if m.data != "target":
            return f"loss {loss} reads the target's logits, and {name} is tuned on {m.data} data, not the target's"
        if not shares_tokenizer(config, draft, target):
            return f"loss {loss} compares token distributions, and {draft} and {target} do not share a tokenizer"
    if loss and methods.LOSSES[loss].parallel and not shares_tokenizer(config, draft, target):
        return f"loss {loss} makes a parallel draft, measured only where {draft} shares {target}'s tokenizer"
    if teacher == "draft" and not methods.START_POINTS[m.init].masked:
        return f"loss {loss} pairs the dense draft's layers with its masked copy's, and {name} is not a masked copy"
    if loss and m.loss is None:
        same = [
            o.name
            for o in map(methods.BY_NAME.get, config["methods"])
            if o.loss == loss and methods.recipe(o) == methods.recipe(m)
        ]
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
        m = methods.BY_NAME[name]
        if m.kind != "draft":
            continue  # heads are made by their own rules (workflow/rules/heads.smk)
        if not methods.takes_losses(m):
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
            levels = config["sparsities"] if methods.BY_NAME[name].sparse else [0]
            qs = with_qat if methods.BY_NAME[name].tuned and config.get("quantize", {}).get("aware") else schemes
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
