"""`python -m sd2`: every rule has a step, and bad input is a one-line error naming it."""

import json
import subprocess
import sys

from conftest import REPO

STEPS = [
    "prepare-data",
    "train-tokenizer",
    "pretrain",
    "model-report",
    "self-distill",
    "prune",
    "layer-prune",
    "finetune",
    "target-outputs",
    "measure",
    "macs",
    "collect",
    "figures",
    "estimate-run-time",
    "sweep",
    "job-times",
    "readme",
]


def sd2(*args):
    return subprocess.run([sys.executable, "-m", "sd2", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_step():
    out = sd2("--help").stdout
    for step in STEPS:
        assert step in out


def test_missing_model_path_is_named(tmp_path):
    proc = sd2("macs", str(tmp_path / "no-such-model"))
    assert proc.returncode != 0
    assert "no-such-model" in proc.stderr and "Traceback" not in proc.stderr


def test_sparsity_out_of_range(tiny_llama_dir):
    proc = sd2("macs", str(tiny_llama_dir), "--sparsity", "100")
    assert proc.returncode != 0 and "[0, 100)" in proc.stderr and "Traceback" not in proc.stderr


def test_macs_of_a_checkpoint(tiny_llama_dir):
    proc = sd2("macs", str(tiny_llama_dir), "--sparsity", "50")
    out = json.loads(proc.stdout)
    assert out["macs_per_token"] < out["dense_macs_per_token"]


def test_macs_of_a_workflow_config():
    config = str(REPO / "config" / "test.yaml")
    every = json.loads(sd2("macs", config, "--sparsity", "50").stdout)
    assert set(every["models"]) == {"tiny-llama", "tiny-qwen", "tiny-draft"}
    one = sd2("macs", "tiny-draft", "--config", config, "--sparsity", "50")
    assert json.loads(one.stdout) == every["models"]["tiny-draft"]
    proc = sd2("macs", "nope", "--config", config)
    assert proc.returncode != 0 and "unknown model 'nope' (known: tiny-llama" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_json_argument(tmp_path):
    proc = sd2(
        "prune", "--model", "x", "--calibration", "y", "--sparsity", "50", "--settings", "{oops", "--out", str(tmp_path)
    )
    assert proc.returncode == 2 and "not valid JSON" in proc.stderr


def test_tokenizer_mismatch_for_kl_is_a_clear_error(tiny_llama_draft_dir, tiny_qwen_dir, tmp_path):
    from datasets import Dataset

    data = tmp_path / "data"
    Dataset.from_list([{"prompt": "def f():\n", "response": "    return 1\n"}] * 4).save_to_disk(str(data))
    settings = {
        "loss": "kl",
        "epochs": 1,
        "max_steps": 1,
        "batch_size": 2,
        "seq_len": 32,
        "lr": 1e-3,
        "validation_fraction": 0.5,
        "eval_every": 1,
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "micro_batch_size": None,
        "gradient_checkpointing": False,
        "loss_chunk_tokens": None,
    }
    proc = sd2(
        "finetune",
        "--init",
        str(tiny_llama_draft_dir),
        "--data",
        str(data),
        "--teacher",
        str(tiny_qwen_dir),
        "--settings",
        json.dumps(settings),
        "--out",
        str(tmp_path / "out"),
    )
    assert proc.returncode != 0 and "tokenizer" in proc.stderr.lower() and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
