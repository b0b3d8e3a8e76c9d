"""Quantization-aware fine-tuning (config quantize.aware, variants <variant>@<scheme>-qat): the
fine-tuning with a fake-quantised forward, its quantization, and the names the workflow gives it."""

import contextlib
import json
import re
import subprocess

import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, snakemake_cmd
from datasets import load_from_disk

from sd2 import chat, training, variants
from sd2.config import SCHEMA_PATH
from sd2.drafts.finetune import finetune
from sd2.drafts.quantize import fake_quantized, quantize
from sd2.measure.weight_bytes import layer_bytes
from sd2.models import decoder_linears, load_model, load_tokenizer
from sd2.quantized import group_size, load_quantized, scheme_spec, weight_bits

SETTINGS = dict(
    loss="ce",
    epochs=10,
    max_steps=30,
    batch_size=8,
    seq_len=64,
    lr=1e-2,
    validation_fraction=0.2,
    eval_every=15,
    warmup_steps=2,
    weight_decay=0.0,
    bf16=False,
    micro_batch_size=None,
    gradient_checkpointing=False,
    loss_chunk_tokens=None,
)


def validation_loss(model_dir, sft_data_dir, scheme=None) -> float:
    """The held-out response cross-entropy finetune reports (token mean over its validation batches)
    of a checkpoint, its forward fake-quantised to `scheme` when given."""
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    examples = chat.encode_dataset(
        tokenizer, load_from_disk(str(sft_data_dir)), sft_data_dir, None, SETTINGS["seq_len"]
    )[0]
    val = [examples[i] for i in training.split(len(examples), SETTINGS["validation_fraction"], 0)[1]]
    total, tokens = 0.0, 0
    with torch.no_grad(), fake_quantized(model, scheme) if scheme else contextlib.nullcontext():
        for i in range(0, len(val), SETTINGS["batch_size"]):
            batch = training.collate(val[i : i + SETTINGS["batch_size"]], tokenizer.pad_token_id)
            n = training.label_tokens(batch)
            total, tokens = total + float(model(**batch).loss) * n, tokens + n
    return total / tokens


def test_quantization_aware_finetune_trains_the_quantized_model_with_the_mask_held(
    sparse_draft_dir, sft_data_dir, tmp_path, one_thread
):
    """The same run with the forward fake-quantised: zeros held, its loss falls, its curve is the
    quantized model's, and rule quantize on its checkpoint keeps the mask and gives that model."""
    plain, aware = tmp_path / "plain", tmp_path / "aware"
    finetune(sparse_draft_dir, sft_data_dir, plain, settings=SETTINGS, seed=0)
    history = finetune(
        sparse_draft_dir, sft_data_dir, aware, settings={**SETTINGS, "quantization_aware": "w4a16"}, seed=0
    )
    assert [h["step"] for h in history] == [0, 15, 30]
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.3
    info = json.loads((aware / "provenance.json").read_text())
    assert info["quantization_aware"]["scheme"] == "w4a16" and info["settings"]["finetune"]["quantization_aware"]
    assert json.loads((plain / "provenance.json").read_text())["quantization_aware"] is None

    before, after = load_model(sparse_draft_dir), load_model(aware)
    for (name, b), a in zip(decoder_linears(before).items(), decoder_linears(after).values()):
        assert torch.equal(b.weight != 0, a.weight != 0), name
        assert not torch.equal(b.weight, a.weight), name  # it trained
        # Same seed, data and steps: only the forward differs, and it changed the result.
        assert not torch.equal(a.weight, decoder_linears(load_model(plain))[name].weight), name

    # Rule quantize on it (the same scheme, round to nearest: exactly the training forward's values):
    # the mask survives, and the quantized draft is the model whose loss the curve ends on, not the
    # checkpoint as stored.
    summary = quantize(aware, tmp_path / "aware-q", scheme="w4a16", method="rtn", seed=0)
    assert summary["mask_kept"]
    quantized = decoder_linears(load_quantized(tmp_path / "aware-q"))
    for name, b in decoder_linears(before).items():
        assert not quantized[name].weight[b.weight == 0].any(), name
    end = history[-1]["val_loss"]
    assert validation_loss(tmp_path / "aware-q", sft_data_dir) == pytest.approx(end, rel=1e-5)
    assert validation_loss(aware, sft_data_dir, "w4a16") == pytest.approx(end, rel=1e-5)
    assert abs(validation_loss(aware, sft_data_dir) - end) > 1e-4  # unquantized, it is another model


def test_qat_scheme_names():
    assert variants.QUANTIZATIONS == ("none", "w8a16", "w8a16-qat", "w4a16", "w4a16-qat")
    assert variants.split_quantization("sd2+kl@w4a16-qat") == ("sd2+kl", "w4a16-qat")
    assert variants.parse_variant("sd2+kl@w4a16-qat") == ("sd2", "kl")
    assert variants.quantization_aware("w8a16-qat") and not variants.quantization_aware("w8a16")
    assert variants.base_scheme("w4a16-qat") == "w4a16" and variants.base_scheme("w4a16") == "w4a16"
    assert variants.label("sd2", "ce", "w4a16-qat") == "sd2 w4a16-qat"
    ranks = [variants.quantization_rank(q) for q in ("none", "w8a16", "w8a16-qat", "w4a16", "w4a16-qat")]
    assert ranks == sorted(ranks) and len(set(ranks)) == 5  # a QAT row right after its one-shot row
    with pytest.raises(ValueError, match="'dense@w4a16-qat': quantization-aware fine-tuning needs a fine-tuned"):
        variants.split_quantization("dense@w4a16-qat")
    with pytest.raises(ValueError, match="unknown quantization 'w4a16-gptq'"):
        variants.split_quantization("sd2@w4a16-gptq")
    # A QAT draft stores its base scheme's weights: the same bits, groups and bytes.
    assert scheme_spec("w4a16-qat") is scheme_spec("w4a16") and weight_bits("w8a16-qat") == weight_bits("w8a16")
    assert group_size("w4a16-qat", 176) == 88
    assert layer_bytes(64, 256, 100, "w4a16-qat") == layer_bytes(64, 256, 100, "w4a16")
    with pytest.raises(ValueError, match="unknown quantization scheme 'w3a16-qat'"):
        scheme_spec("w3a16-qat")


def test_qat_wildcard_patterns():
    """finetune makes the tuned variants and their -qat fine-tunings; quantize and measure take
    <variant>@<scheme> for any variant and <variant>@<scheme>-qat for tuned ones only."""
    made, quantized, measured = (
        variants.finetuned_pattern(),
        variants.quantized_pattern(),
        variants.variant_pattern(quantized=True),
    )
    for name in ("sd2", "sd2+kl", "direct_align", "sd2@w4a16-qat", "sd2+kl@w8a16-qat", "layer_pruned@w4a16-qat"):
        assert re.fullmatch(made, name), name
    for name in ("dense", "sparse_oneshot", "sd2@w4a16", "dense@w4a16-qat", "sd2@none", "sd2@w4a16-qat-qat"):
        assert not re.fullmatch(made, name), name
    for name in ("sd2@w4a16", "dense@w8a16", "sparse_oneshot@w4a16", "sd2+kl@w4a16-qat", "dense_sd@w8a16-qat"):
        assert re.fullmatch(quantized, name) and re.fullmatch(measured, name), name
    for name in ("sd2", "dense@w4a16-qat", "sparse_oneshot@w8a16-qat", "sd2@none", "sd2@w4a16-qat@w4a16"):
        assert not re.fullmatch(quantized, name), name
    assert re.fullmatch(measured, "sd2") and not re.fullmatch(measured, "dense@w4a16-qat")


def test_aware_adds_a_qat_variant_to_tuned_methods_only():
    cfg = {
        "methods": ["dense", "sparse_oneshot", "sd2"],
        "losses": ["ce", "kl"],
        "sparsities": [50],
        "quantization": ["none", "w8a16", "w4a16"],
        "quantize": {"aware": True},
        "models": {"t": {"tokenizer": "a"}, "d": {"tokenizer": "a"}},
    }
    names = [v.name for v in variants.variants(cfg, "t", "d", quantized=True)]
    assert names == [
        "dense",
        "dense@w8a16",
        "dense@w4a16",
        "sparse_oneshot",
        "sparse_oneshot@w8a16",
        "sparse_oneshot@w4a16",
        *(f"{v}{q}" for v in ("sd2", "sd2+kl") for q in ("", "@w8a16", "@w8a16-qat", "@w4a16", "@w4a16-qat")),
    ]
    qat = [v for v in variants.variants(cfg, "t", "d", quantized=True) if variants.quantization_aware(v.quantization)]
    assert {(v.method, v.loss, v.sparsity) for v in qat} == {("sd2", "ce", 50), ("sd2", "kl", 50)}
    assert [v.name for v in variants.variants(cfg, "t", "d")] == ["dense", "sparse_oneshot", "sd2", "sd2+kl"]
    off = {**cfg, "quantize": {"aware": False}}
    assert not any("-qat" in v.name for v in variants.variants(off, "t", "d", quantized=True))


def test_schema_lists_the_one_shot_schemes_and_aware_is_off_by_default():
    props = yaml.safe_load(SCHEMA_PATH.read_text())["properties"]
    assert props["quantization"]["items"]["enum"] == ["none", *variants.ONE_SHOT_QUANTIZATIONS]
    assert props["quantize"]["properties"]["aware"]["default"] is False


def job_counts(text: str) -> dict[str, int]:
    """{rule: count} from the 'Job stats' table of a dry run."""
    table = text.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    return {p[0]: int(p[1]) for p in map(str.split, table.splitlines()) if len(p) == 2 and p[1].isdigit()}


def test_dry_run_plans_a_qat_fine_tuning_and_quantization_per_tuned_variant(tmp_path):
    """config/test.yaml with quantization [none, w4a16] and quantize.aware: each tuned checkpoint is
    fine-tuned twice (plain, w4a16-aware), every variant quantized one-shot, every tuned one also QAT."""
    cfg = yaml.safe_load((REPO / "config/test.yaml").read_text())
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump({**cfg, "quantization": ["none", "w4a16"], "quantize": {"aware": True}})
    )
    proc = subprocess.run(
        snakemake_cmd(tmp_path / "w", "-n", "-p", configfile=tmp_path / "c.yaml"), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_counts(proc.stdout + proc.stderr)
    # 2 targets x 1 draft. Variants: tiny-llama 7 (5 tuned: dense_sd, direct_align, layer_pruned, sd2,
    # sparse_sft), tiny-qwen 6 (direct_align skipped: another tokenizer; 4 tuned). Fine-tuned checkpoints
    # without QAT: sparse_sft (original data) once, the other tuned ones per target: 4 + 3 + 1 = 8; with
    # QAT each twice. Quantized: 13 one-shot + 9 QAT (per target); measured: those and the 13 unquantized.
    assert {k: counts[k] for k in ("finetune", "quantize", "measure")} == dict(
        finetune=8 * 2, quantize=13 + 9, measure=13 + 13 + 9
    )
    # The commands: the QAT fine-tuning gets the scheme, rule quantize reads its
    # checkpoint with the base scheme, and the one-shot variant still quantizes the plain fine-tuning.
    text, drafts = proc.stdout + proc.stderr, "work/drafts/tiny-llama/tiny-draft"
    qat_settings = r"""--settings '[^']*"quantization_aware": "w4a16"[^']*'"""
    assert re.search(rf"--out {drafts}/sd2@w4a16-qat-s50 {qat_settings}", text)
    assert len(re.findall(qat_settings, text)) == 8
    for source in ("sd2@w4a16-qat-s50", "sd2-s50"):
        assert f"--model {drafts}/{source} --calibration work/distill/tiny-llama --scheme w4a16 " in text


def test_qat_rows_compare_with_the_unquantized_and_the_one_shot_draft(tmp_path):
    """sd2@w4a16-qat: quantization w4a16-qat, compared paired with sd2 as made and with sd2@w4a16;
    ranked after the one-shot row and drawn with its own marker."""
    import matplotlib

    matplotlib.use("Agg")
    from synthetic import K, write_synthetic_records

    from sd2.report.collect import collect_measurements
    from sd2.report.comparisons import collect_comparisons
    from sd2.report.plots import QUANTIZATION_MARKERS, plot_mal_vs_weight_bytes

    drafts = [("sd2@w4a16-qat", 50), ("sd2@w4a16", 50), ("sd2", 50)]
    paths = write_synthetic_records(tmp_path, targets=("t_llama",), variants=drafts, eval_sets=("humaneval",))
    for path in paths:
        doc = json.loads(path.read_text())
        for r in doc["records"]:
            r["draft_weight_bytes_per_token"] = 300_000 if "@" in r["method"] else 1_000_000
        path.write_text(json.dumps(doc))
    m = collect_measurements(paths, tmp_path / "m.csv")
    walk = m[(m["estimator"] == "teacher_forced_walk") & (m["k"] == K)]
    assert walk["quantization"].tolist() == ["none", "w4a16", "w4a16-qat"] and set(walk["method"]) == {"sd2"}
    c = collect_comparisons(paths, tmp_path / "c.csv")
    c = c[(c["estimator"] == "teacher_forced_walk") & (c["k"] == K)].set_index("quantization")
    qat, one_shot = c.loc["w4a16-qat"], c.loc["w4a16"]
    assert qat["unquantized_mal"] == one_shot["unquantized_mal"] == walk["mal"].iloc[0]
    assert qat["one_shot_mal"] == one_shot["mal"]
    assert qat["mal_ratio_vs_one_shot"] == pytest.approx(qat["mal"] / one_shot["mal"])
    assert 1 < qat["vs_one_shot_ci_low"] < qat["mal_ratio_vs_one_shot"] < qat["vs_one_shot_ci_high"]
    assert qat["vs_one_shot_significant"] and pd.isna(one_shot["mal_ratio_vs_one_shot"])

    assert set(QUANTIZATION_MARKERS) == set(variants.QUANTIZATIONS)
    assert len(set(QUANTIZATION_MARKERS.values())) == len(QUANTIZATION_MARKERS)
    fig = plot_mal_vs_weight_bytes(m)
    drawn = {line.get_marker() for ax in fig.axes for line in ax.get_lines()}
    assert {"o", "^", "v"} <= drawn
    handles = [h for leg in fig.legends for h in leg.legend_handles if hasattr(h, "get_marker")]
    legend = {(h.get_marker(), h.get_label()) for h in handles}
    assert ("v", "quantization w4a16-qat") in legend
