"""Exported drafts: plain Hugging Face checkpoints that transformers alone loads, bit for bit, zeros and dtype kept."""

import json
import os
import shutil

import pytest
import torch
from synthetic import K_MAX, PROMPT_IDS, K, synthetic_record
from transformers import AutoModelForCausalLM, AutoTokenizer

from sd2.cli import main
from sd2.drafts.prune import prune
from sd2.export import METADATA, best_k, export_draft
from sd2.models import decoder_linears

pytestmark = pytest.mark.usefixtures("one_thread")
EVAL_SETS = ("humaneval", "mt_bench")
SPARSITY = 50


@pytest.fixture(scope="module")
def sparse_bf16_draft(tmp_path_factory, tiny_llama_draft_dir):
    """A 50% magnitude-pruned draft stored in bfloat16, as the sweep saves a hub draft's checkpoint."""
    root = tmp_path_factory.mktemp("sparse_draft")
    settings = dict(pruner="magnitude", structure="unstructured", calibration_samples=1, calibration_seq_len=8)
    prune(tiny_llama_draft_dir, root / "calib", root / "fp32", sparsity=SPARSITY, settings=settings, seed=0)
    model = AutoModelForCausalLM.from_pretrained(root / "fp32", dtype=torch.bfloat16)
    model.save_pretrained(root / "bf16")
    AutoTokenizer.from_pretrained(root / "fp32").save_pretrained(root / "bf16")
    shutil.copy(root / "fp32" / "provenance.json", root / "bf16" / "provenance.json")
    (root / "bf16" / "training.csv").write_text("step,loss\n1,2.0\n")
    return root / "bf16"


def write_records(root, target, method="sparse_oneshot", sparsity=SPARSITY, same_tokenizer=True, draft="d"):
    """One record file per eval set, shaped as `measure` writes them (tests/synthetic.py)."""
    paths = []
    for eval_set in EVAL_SETS:
        if same_tokenizer:
            greedy = [
                synthetic_record(target, draft, method, sparsity, eval_set, 0.0, "teacher_forced_walk", k)
                for k in range(1, K_MAX + 1)
            ]
            tvd = [synthetic_record(target, draft, method, sparsity, eval_set, 1.0, "tvd_estimate", K)]
        else:
            # As measure writes them: transformers' rule at the headline k, vLLM's intersection at every k.
            greedy = [synthetic_record(target, draft, method, sparsity, eval_set, 0.0, "uag_walk", K)]
            greedy += [
                synthetic_record(target, draft, method, sparsity, eval_set, 0.0, "tli_walk", k)
                for k in range(1, K_MAX + 1)
            ]
            tvd = []
        sampled = [synthetic_record(target, draft, method, sparsity, eval_set, 1.0, "assisted_generation", K)]
        path = root / eval_set / f"{method}-s{sparsity}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"definitions": {}, "prompt_ids": PROMPT_IDS, "records": greedy + sampled + tvd}))
        paths.append(path)
    return paths


def labels(target, method="sparse_oneshot", sparsity=SPARSITY):
    return {"target": target, "draft": "d", "method": method, "sparsity": sparsity}


def test_export_is_a_plain_checkpoint_with_the_same_weights(sparse_bf16_draft, tiny_llama_dir, tmp_path):
    records = write_records(tmp_path / "records", "t_llama")
    out = tmp_path / "export"
    meta = export_draft(
        sparse_bf16_draft, records, out, target=str(tiny_llama_dir), labels=labels("t_llama"), run_name="r", seed=3
    )
    # transformers alone, nothing from sd2: the stored dtype, the same bytes, the same logits.
    exported = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    source = AutoModelForCausalLM.from_pretrained(sparse_bf16_draft, dtype="auto")
    assert exported.dtype == torch.bfloat16 and meta["stored_dtypes"] == ["BF16"]
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, exported.state_dict()[name]), name
    ids = torch.randint(0, exported.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, source(ids).logits)
    # The pruning masks survive: exactly half of every decoder linear is zero.
    for name, module in decoder_linears(exported).items():
        assert int((module.weight == 0).sum()) == module.weight.numel() * SPARSITY // 100, name
    assert meta["decoder_linear_sparsity"] == pytest.approx(SPARSITY / 100, abs=1e-3)
    tok = AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n    return x + 1\n"
    assert tok(text)["input_ids"] == AutoTokenizer.from_pretrained(sparse_bf16_draft)(text)["input_ids"]
    # Weights are hard links: no second copy on disk.
    assert os.stat(out / "model.safetensors").st_ino == os.stat(sparse_bf16_draft / "model.safetensors").st_ino
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", METADATA} <= names
    assert not names & {"provenance.json", "training.csv"}
    saved = json.loads((out / METADATA).read_text())
    assert saved["source"]["provenance"] == json.loads((sparse_bf16_draft / "provenance.json").read_text())
    assert (saved["method"], saved["sparsity"], saved["run_name"], saved["seed"]) == ("sparse_oneshot", 50, "r", 3)
    assert saved["loss"] is None  # an untuned draft
    assert saved["eval_sets"] == sorted(EVAL_SETS)


def test_metadata_holds_the_headline_mal_and_the_serving_command(sparse_bf16_draft, tiny_llama_dir, tmp_path):
    records = write_records(tmp_path / "records", "t_llama")
    out = tmp_path / "export"
    meta = export_draft(
        sparse_bf16_draft, records, out, target=str(tiny_llama_dir), labels=labels("t_llama"), run_name="r", seed=0
    )
    # Headline: k = measure.k only, the exact estimator per temperature (not the TVD estimate).
    assert {(h["eval_set"], h["temperature"], h["k"], h["estimator"]) for h in meta["headline"]} == {
        (e, t, K, "teacher_forced_walk" if t == 0 else "assisted_generation") for e in EVAL_SETS for t in (0.0, 1.0)
    }
    source = {
        (r["eval_set"], r["temperature"]): r
        for path in records
        for r in json.loads(path.read_text())["records"]
        if r["k"] == K and r["estimator"] != "tvd_estimate"
    }
    for h in meta["headline"]:
        r = source[(h["eval_set"], h["temperature"])]
        assert (h["mal"], h["mal_ci_low"], h["mal_ci_high"]) == (r["mal"], r["mal_ci_low"], r["mal_ci_high"])
    k = meta["best_k"]["k"]
    assert 1 <= k <= K_MAX and meta["best_k"]["temperature"] == 0.0
    spec = meta["vllm"]["speculative_config"]
    assert spec == {"method": "draft_model", "model": str(out.absolute()), "num_speculative_tokens": k}
    assert meta["vllm"]["serve"].startswith(f"vllm serve {tiny_llama_dir} --speculative-config '")
    assert json.loads(meta["vllm"]["serve"].split("--speculative-config ")[1].strip("'")) == spec


def test_different_tokenizer_target_needs_heterogeneous_vocab(sparse_bf16_draft, tiny_qwen_dir, tmp_path):
    records = write_records(tmp_path / "records", "t_qwen", same_tokenizer=False)
    meta = export_draft(
        sparse_bf16_draft,
        records,
        tmp_path / "export",
        target=str(tiny_qwen_dir),
        labels=labels("t_qwen"),
        run_name="r",
        seed=0,
    )
    assert meta["vllm"]["speculative_config"]["use_heterogeneous_vocab"] is True
    # The numbers of the rule vLLM runs with use_heterogeneous_vocab, not transformers' re-encoding.
    greedy = [h for h in meta["headline"] if h["temperature"] == 0]
    assert greedy and {h["estimator"] for h in greedy} == {"tli_walk"}
    assert 1 <= meta["best_k"]["k"] <= K_MAX
    assert meta["vocab_size"]["draft"] != meta["vocab_size"]["target"]


def test_best_k_averages_the_eval_sets_at_the_lowest_temperature():
    def rec(eval_set, k, factor, temperature=0.0):
        return {"eval_set": eval_set, "k": k, "temperature": temperature, "estimator": "teacher_forced_walk",
                "improvement_factor": factor, "mal": factor * 2}  # fmt: skip

    records = [rec("a", 2, 1.5), rec("b", 2, 1.1), rec("a", 3, 1.2), rec("b", 3, 1.6), rec("a", 4, 9.0)]
    records += [rec("a", 2, 9.0, temperature=1.0), rec("b", 2, 9.0, temperature=1.0)]
    chosen = best_k(records)
    # k=3 averages 1.4, k=2 1.3; k=4 was measured on one eval set only; sampling does not compete.
    assert (chosen["k"], chosen["mal"]) == (3, {"a": 2.4, "b": 3.2})
    assert chosen["mean_improvement_factor"] == pytest.approx(1.4)


def test_records_of_another_draft_are_refused(sparse_bf16_draft, tiny_llama_dir, tmp_path):
    records = write_records(tmp_path / "records", "t_llama", method="sd2")
    with pytest.raises(ValueError, match=r"humaneval.*sd2"):
        export_draft(
            sparse_bf16_draft,
            records,
            tmp_path / "export",
            target=str(tiny_llama_dir),
            labels=labels("t_llama"),
            run_name="r",
            seed=0,
        )
    assert not (tmp_path / "export").exists()


def test_a_loss_variant_is_exported_as_its_method_and_loss(sparse_bf16_draft, tiny_llama_dir, tmp_path):
    """The workflow names a loss variant sd2+kl (sd2.methods); the export says sd2 with kl, its masks checked."""
    records = write_records(tmp_path / "records", "t_llama", method="sd2+kl")
    saved = export_draft(
        sparse_bf16_draft,
        records,
        tmp_path / "export",
        target=str(tiny_llama_dir),
        labels=labels("t_llama", method="sd2+kl"),
        run_name="r",
        seed=0,
    )
    assert (saved["method"], saved["loss"]) == ("sd2", "kl") and saved["decoder_linear_sparsity"] >= 0.5


def test_a_lost_mask_is_refused(sparse_bf16_draft, tiny_llama_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sparse_bf16_draft, broken)
    model = AutoModelForCausalLM.from_pretrained(broken, dtype="auto")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(0.5)
    model.save_pretrained(broken)
    records = write_records(tmp_path / "records", "t_llama")
    with pytest.raises(ValueError, match="down_proj.weight has 0.0000 zeros, the draft is 50% sparse"):
        export_draft(
            broken, records, tmp_path / "export", target=str(tiny_llama_dir), labels=labels("t_llama"), run_name="r",
            seed=0,
        )  # fmt: skip
    assert not (tmp_path / "export").exists()


def test_a_tokenizer_autotokenizer_would_load_differently_is_refused(tiny_qwen_dir, tiny_llama_dir, tmp_path):
    """A qwen2 model with a tokenizer trained here: AutoTokenizer picks Qwen2Tokenizer, which encodes otherwise."""
    records = write_records(tmp_path / "records", "t_llama", method="dense", sparsity=0)
    with pytest.raises(ValueError, match="Qwen2Tokenizer"):
        export_draft(
            tiny_qwen_dir,
            records,
            tmp_path / "export",
            target=str(tiny_llama_dir),
            labels=labels("t_llama", method="dense", sparsity=0),
            run_name="r",
            seed=0,
        )


def test_cli_prints_the_serving_command(sparse_bf16_draft, tiny_llama_dir, tmp_path, capsys):
    records = write_records(tmp_path / "records", "t_llama")
    out = tmp_path / "export"
    args = ["--draft", str(sparse_bf16_draft), "--target", str(tiny_llama_dir), "--records", *map(str, records)]
    main(["export-draft", *args, "--labels", json.dumps(labels("t_llama")), "--run-name", "r", "--out", str(out)])
    assert capsys.readouterr().out.strip().splitlines()[-1] == json.loads((out / METADATA).read_text())["vllm"]["serve"]


def test_best_k_without_any_counted_step_is_the_headline_k():
    settings = {"settings": {"k": [4, 2]}}
    records = [{"eval_set": "a", "k": k, "temperature": 0.0, "estimator": "teacher_forced_walk",
                "improvement_factor": None, "provenance": settings} for k in (1, 2, 3, 4)]  # fmt: skip
    assert best_k(records)["k"] == 4


def test_a_missing_generation_config_is_written(sparse_bf16_draft, tiny_llama_dir, tmp_path):
    from transformers import GenerationConfig

    draft = tmp_path / "draft"
    shutil.copytree(sparse_bf16_draft, draft)
    (draft / "generation_config.json").unlink()
    records = write_records(tmp_path / "records", "t_llama")
    meta = export_draft(
        draft, records, tmp_path / "export", target=str(tiny_llama_dir), labels=labels("t_llama"), run_name="r", seed=0
    )
    assert meta["files"]["generation_config.json"] == "written"
    written = GenerationConfig.from_pretrained(tmp_path / "export")
    assert written.eos_token_id == AutoTokenizer.from_pretrained(draft).eos_token_id
