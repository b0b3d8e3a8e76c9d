"""sd2.methods: the one registry of methods and losses, and everything that must agree with it."""

import json
import re
import shlex
import subprocess

import pytest
import yaml
from conftest import REPO, snakemake_cmd

from sd2 import config as sd2_config
from sd2 import export, methods, variants
from sd2.config import SCHEMA_PATH
from sd2.report import canvas, collect


def config(name="test.yaml", **changes) -> dict:
    raw = yaml.safe_load((REPO / "config" / name).read_text())
    return sd2_config.validate({**raw, **changes})


def test_the_schemas_names_are_the_registrys():
    """The schema file lists no method, loss or head family: sd2.config.schema fills them in."""
    raw = yaml.safe_load(SCHEMA_PATH.read_text())["properties"]
    assert "enum" not in raw["methods"]["items"] and "enum" not in raw["losses"]["items"]
    assert "enum" not in raw["heads"]["properties"]["methods"]["items"]
    assert raw["heads"]["properties"]["sizes"]["properties"] == {}
    props = sd2_config.schema()["properties"]
    assert props["methods"]["items"]["enum"] == list(methods.NAMES)
    assert set(props["methods"]["default"]) <= set(methods.NAMES)
    assert props["losses"]["items"]["enum"] == list(methods.LOSSES)
    heads = props["heads"]["properties"]
    assert heads["methods"]["items"]["enum"] == list(methods.HEAD_FAMILIES)
    sizes = heads["sizes"]["properties"]
    assert set(sizes) == set(methods.HEAD_FAMILIES)
    moa = sizes["moa"]["additionalProperties"]
    assert moa["required"] == ["layers"] and moa["properties"] is methods.HEAD_FAMILIES["moa"].size
    assert "loss" not in props["finetune"]["properties"]  # one home for the loss: the sweep axis `losses`


def test_every_loss_and_head_resolves_to_its_implementation():
    for entry in methods.LOSSES.values():
        assert callable(methods.resolve(entry.objective)), entry.name
    for family in methods.HEAD_FAMILIES.values():
        assert methods.resolve(family.module).__name__ == family.module.partition(":")[2]


def test_tables_and_figures_read_the_registry():
    assert set(collect.dense_methods()) == {"dense", "dense_sd", "direct_align"}
    assert len({canvas.color(name) for name in methods.NAMES}) == len(methods.NAMES)  # one colour per method
    assert canvas.color("no-such-method") == methods.UNKNOWN_COLOR
    assert len({m.label for m in methods.METHODS}) == len(methods.NAMES)
    assert methods.BY_NAME["direct_align"].label == "Direct Alignment"
    assert [methods.rank(n) for n in methods.NAMES] == list(range(len(methods.NAMES)))
    assert methods.NAMES[-1] == "sd2"  # the paper's method last in every table and legend
    # Masks are checked on the masked start point's copies only (layer_pruned drops whole layers instead).
    assert {name for name in methods.NAMES if export.masked_method(name)} == {"sparse_oneshot", "sparse_sft", "sd2"}


def test_registry_entries_are_consistent():
    for m in methods.METHODS:
        assert m.kind in ("draft", "head")
        assert m.data in ("target", "original", None)
        assert m.loss in (None, *methods.LOSSES)
        assert re.fullmatch(r"#[0-9a-f]{6}", m.color)
        if m.kind == "draft":
            assert m.init in methods.START_POINTS
            assert m.sparse == (m.init != "dense")  # a dense checkpoint is made at sparsity 0 only
        else:
            assert m.init is None  # heads are made by their own rules (workflow/rules/heads.smk)
        assert m.loss is None or m.tuned
    align = methods.BY_NAME["direct_align"]
    assert (align.init, align.data, align.sparse, align.loss) == ("dense", "target", False, "tvdpp")


@pytest.mark.parametrize("name", methods.NAMES)
def test_variant_names_round_trip(name):
    tuned = methods.BY_NAME[name].tuned
    assert variants.parse_variant(variants.variant_name(name, methods.default_loss(name))) == (
        name,
        methods.default_loss(name),
    )
    assert variants.variant_name(name, methods.default_loss(name)) == name  # earlier runs' paths and records
    for loss in methods.LOSSES:
        if methods.takes_losses(methods.BY_NAME[name]) and loss != "ce":
            assert variants.variant_name(name, loss) == f"{name}+{loss}"
            assert variants.parse_variant(f"{name}+{loss}") == (name, loss)
        elif loss != methods.default_loss(name):
            with pytest.raises(ValueError):
                variants.variant_name(name, loss)
    # A head's training is its own rules': no loss of the axis.
    own = methods.BY_NAME[name].loss or "ce" if tuned and methods.BY_NAME[name].kind == "draft" else None
    assert methods.default_loss(name) == own


def test_variant_names_that_are_not_made_are_refused():
    with pytest.raises(ValueError, match="unknown loss 'l2'"):
        variants.parse_variant("sd2+l2")
    with pytest.raises(ValueError, match="is named 'sd2'"):
        variants.parse_variant("sd2+ce")  # one name per checkpoint: today's paths for ce
    with pytest.raises(ValueError, match="not fine-tuned with the `losses` axis"):
        variants.parse_variant("direct_align+kl")


def test_wildcard_patterns_match_exactly_the_variant_names():
    pattern, tuned = variants.variant_pattern(), variants.variant_pattern(tuned_only=True)
    cfg = config(losses=list(methods.LOSSES), methods=list(methods.NAMES))
    made = {v.name for t in cfg["targets"] for v in variants.variants(cfg, t, "tiny-draft")}
    assert {"sd2+kl", "sd2+squarehead", "direct_align", "dense"} <= made
    for name in made:
        assert re.fullmatch(pattern, name)
        assert bool(re.fullmatch(tuned, name)) == methods.BY_NAME[variants.parse_variant(name)[0]].tuned
    for name in ("sd2+ce", "direct_align+kl", "dense+kl", "redrafter", "sd2+l2", "sd2-s50"):
        assert not re.fullmatch(pattern, name), name


def test_labels_name_the_loss_when_it_is_not_the_methods_own():
    assert variants.label("sd2", "ce") == "sd2" and variants.label("sd2", "kl") == "sd2 (kl)"
    assert variants.label("direct_align", "tvdpp") == "Direct Alignment"
    assert variants.label("dense", None) == "dense" and variants.label("mystery", None) == "mystery"
    assert methods.ce_counterpart("direct_align") == "dense_sd" and methods.ce_counterpart("sd2") == "sd2"
    assert methods.ce_counterpart("dense") is None


def variant_set(cfg, target, draft):
    return {(v.name, v.sparsity) for v in variants.variants(cfg, target, draft)}


def test_losses_fan_out_where_they_can_be_made():
    cfg = config(losses=["ce", "kl", "tvdpp", "squarehead", "skd"])
    same = variant_set(cfg, "tiny-llama", "tiny-draft")  # one tokenizer family
    other = variant_set(cfg, "tiny-qwen", "tiny-draft")  # another
    # Target-logit losses: only where the tokenizers match, and only on the target's data (not sparse_sft's).
    for loss in ("kl", "tvdpp", "skd"):
        assert {(f"sd2+{loss}", 50), (f"layer_pruned+{loss}", 50)} <= same
        assert not {v for v in same | other if v[0] == f"sparse_sft+{loss}"}
        assert not {v for v in other if v[0].endswith(f"+{loss}")}
    assert ("dense_sd+kl", 0) in same and ("direct_align", 0) in same and ("direct_align", 0) not in other
    # dense_sd with TVD++ is Direct Alignment: made once, under that name.
    assert ("dense_sd+tvdpp", 0) not in same
    # Square-head: the dense draft teaches its masked copies, whatever the target.
    for pairs in (same, other):
        assert {("sd2+squarehead", 50), ("sparse_sft+squarehead", 50)} <= pairs
        assert not {v for v in pairs if v[0] in ("layer_pruned+squarehead", "dense_sd+squarehead")}
    # Untuned methods and fixed losses ignore the axis.
    assert not {v for v in same if v[0].startswith(("dense+", "sparse_oneshot+", "direct_align+"))}
    reasons = {(s["target"], s["method"], s["loss"]): s["reason"] for s in variants.skipped(cfg)}
    assert "do not share a tokenizer" in reasons[("tiny-qwen", "sd2", "kl")]
    assert "tuned on original data" in reasons[("tiny-llama", "sparse_sft", "kl")]
    assert "not a masked copy" in reasons[("tiny-llama", "layer_pruned", "squarehead")]
    assert "is direct_align" in reasons[("tiny-llama", "dense_sd", "tvdpp")]


def test_ce_alone_keeps_todays_variants():
    cfg = config()
    assert cfg["losses"] == ["ce"]
    names = [v.name for v in variants.variants(cfg, "tiny-qwen", "tiny-draft")]
    assert names == ["dense", "dense_sd", "layer_pruned", "sd2", "sparse_sft", "sparse_oneshot"]


def test_heads_are_left_to_their_own_rules():
    cfg = config(methods=["dense", "redrafter", "moa", "sd2"])
    assert {v.method for v in variants.variants(cfg, "tiny-llama", "tiny-draft")} == {"dense", "sd2"}


def test_hub_pairs_share_a_tokenizer_by_vocabulary_size():
    paper = config("paper.yaml")
    assert variants.shares_tokenizer(paper, "llama-3.2-1b-instruct", "llama-3.1-70b-instruct")
    assert not variants.shares_tokenizer(paper, "llama-3.2-1b-instruct", "qwen2.5-7b-instruct")
    # A hub id without `shape` cannot be sized before download: counted as different (skipped).
    paper["models"]["llama-3.1-8b-instruct"].pop("shape")
    assert not variants.shares_tokenizer(paper, "llama-3.2-1b-instruct", "llama-3.1-8b-instruct")
    tiny = config()
    assert variants.shares_tokenizer(tiny, "tiny-draft", "tiny-llama")
    assert not variants.shares_tokenizer(tiny, "tiny-draft", "tiny-qwen")
    # The real model's drafts: one cut from its layers, one from scratch with its tokenizer copied.
    real = config("real.yaml")
    target = "smollm2-135m-instruct"
    assert variants.shares_tokenizer(real, "smollm2-layers6", target)
    assert variants.shares_tokenizer(real, "smollm2-scratch", target)
    assert variants.tokenizer_source(real, "smollm2-scratch") == ("model", target)


def finetune_jobs(text: str) -> list[dict]:
    """The finetune commands of a dry run (-p) as {flag: value}."""
    jobs = []
    for line in text.splitlines():
        if "sd2 finetune " in line:
            words = shlex.split(line.split("Shell command:", 1)[-1].split(">", 1)[0])
            flags = {w: words[i + 1] for i, w in enumerate(words) if w.startswith("--") and i + 1 < len(words)}
            flags["--settings"] = json.loads(flags["--settings"])
            flags["--labels"] = json.loads(flags["--labels"])
            jobs.append(flags)
    return jobs


def test_dag_plans_each_checkpoint_from_the_registry(tmp_path):
    """A dry run of config/test.yaml with four losses: every record and every fine-tuning job is the
    registry's (sd2.variants.variants), starting from its init, on its data, with its loss and teacher,
    and a parallel draft's job with the config's `parallel` settings."""
    raw = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    changed = tmp_path / "losses.yaml"
    changed.write_text(yaml.safe_dump({**raw, "losses": ["ce", "kl", "squarehead", "pard"]}))
    cfg = sd2_config.load(changed)
    proc = subprocess.run(
        snakemake_cmd(tmp_path / "run", "-n", "-p", "all", configfile=changed), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    planned = set(re.findall(r"results/records/humaneval/([\w.-]+)/([\w.-]+)/([\w+]+)-s(\d+)\.json", text))
    expected = {
        (t, d, v.name, str(v.sparsity))
        for t in cfg["targets"]
        for d in cfg["drafts"]
        if d != t
        for v in variants.variants(cfg, t, d)
    }
    assert planned == expected and {n for _, _, n, _ in planned} >= {
        "sd2+kl",
        "sd2+squarehead",
        "direct_align",
        "sd2+pard",
    }
    assert "sd2: not made for tiny-draft -> tiny-qwen: sd2 with loss kl" in text  # said, not an error
    assert "sd2: not made for tiny-draft -> tiny-qwen: sd2 with loss pard" in text
    jobs = finetune_jobs(text)
    # One job per tuned checkpoint: per target on its data, once for the original responses.
    tuned = {
        ("original" if methods.BY_NAME[v.method].data == "original" else t, d, v.name, v.sparsity)
        for t in cfg["targets"]
        for d in cfg["drafts"]
        if d != t
        for v in variants.variants(cfg, t, d)
        if methods.BY_NAME[v.method].tuned
    }
    assert sorted(tuple(j["--labels"][k] for k in ("target", "draft", "method", "sparsity")) for j in jobs) == sorted(
        tuned
    )
    for job in jobs:
        data, draft, name, sparsity = (job["--labels"][k] for k in ("target", "draft", "method", "sparsity"))
        method, loss = variants.parse_variant(name)
        m = methods.BY_NAME[method]
        start = methods.START_POINTS[m.init].path
        init = f"work/{start.format(draft=draft, data=data, sparsity=sparsity)}" if start else f"work/models/{draft}"
        assert job["--init"] == init, job
        assert job["--data"] == ("work/data/finetune" if m.data == "original" else f"work/distill/{data}")
        assert data == "original" if m.data == "original" else data in cfg["targets"]
        assert job["--settings"]["loss"] == loss
        assert job["--settings"].get("parallel") == (cfg["parallel"] if loss == "pard" else None)
        teacher = {"target": f"work/models/{data}", "draft": f"work/models/{draft}", None: None}
        assert job.get("--teacher") == teacher[methods.LOSSES[loss].teacher], job
        assert job["--out"] == f"work/drafts/{data}/{draft}/{name}-s{sparsity}"


def test_memory_plans_load_the_teachers_the_variants_need():
    """sd2.memory sizes each finetune job with the model its loss reads: none for ce, the target for
    Direct Alignment (same-tokenizer targets only), the dense draft itself for square-head."""
    from sd2.memory import job_plans

    def teachers(cfg):
        return {(p.models["draft"], p.models.get("teacher")) for p in job_plans(cfg) if p.rule == "finetune"}

    paper = config("paper.yaml")
    drafts = paper["drafts"]
    llama = [t for t in paper["targets"] if t.startswith("llama")]
    assert teachers(paper) == {(d, t) for d in drafts for t in [None, *llama]}
    assert teachers(config(methods=["dense", "sd2"], losses=["squarehead"])) == {("tiny-draft", "tiny-draft")}


def test_quantized_variant_names():
    """<variant>@<scheme>: split back, matched by the measure rule's pattern, not by finetune's."""
    assert variants.split_quantization("sd2+kl@w4a16") == ("sd2+kl", "w4a16")
    assert variants.split_quantization("sd2") == ("sd2", "none")
    assert variants.parse_variant("sd2+kl@w4a16") == ("sd2", "kl")
    assert variants.quantized_name("dense_sd", "none") == "dense_sd"
    assert variants.label("sd2", "kl", "w8a16") == "sd2 (kl) w8a16"
    with pytest.raises(ValueError, match="unknown quantization 'w2a16'"):
        variants.split_quantization("sd2@w2a16")
    measured, tuned = variants.variant_pattern(quantized=True), variants.variant_pattern(tuned_only=True)
    assert re.fullmatch(measured, "sd2+kl@w4a16") and re.fullmatch(measured, "dense@w8a16")
    assert not re.fullmatch(tuned, "sd2@w4a16") and not re.fullmatch(measured, "sd2@none")
    cfg = {
        "methods": ["dense_sd", "sd2"],
        "losses": ["ce"],
        "sparsities": [50],
        "quantization": ["none", "w4a16"],
        "models": {"t": {"tokenizer": "a"}, "d": {"tokenizer": "a"}},
    }
    names = [v.name for v in variants.variants(cfg, "t", "d", quantized=True)]
    assert names == ["dense_sd", "dense_sd@w4a16", "sd2", "sd2@w4a16"]
    assert [v.name for v in variants.variants(cfg, "t", "d")] == ["dense_sd", "sd2"]
