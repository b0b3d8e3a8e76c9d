"""Shared fixtures: real tokenizers trained on a slice of the stdlib, tiny random models saved to disk."""

import json
import os
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from hub_models import TINY, chat_tokenizer, save_hub_model

from sd2.data import stdlib_files, stdlib_root
from sd2.drafts.prune import prune
from sd2.models import build_model
from sd2.tokenization import train_tokenizer

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(2)
START = time.time()
# `make test-times` runs both suites whole and records their wall time here (shown in the README); a plain
# `make test` records nothing, so running the tests never changes what test_readme.py compares.
RECORD_TEST_TIME = os.environ.get("SD2_RECORD_TEST_TIME") == "1"
TEST_TIME = Path(__file__).resolve().parents[1] / "results" / "test_time.json"
SUITES = {"not integration": "test", "integration": "test-integration"}


def pytest_sessionfinish(session, exitstatus):
    """A whole, green suite run by `make test-times` writes its wall time for the README."""
    option = session.config.option
    suite = SUITES.get(option.markexpr)
    if not RECORD_TEST_TIME or suite is None or exitstatus != 0 or option.file_or_dir or option.keyword:
        return
    from sd2.sweep_time import machine

    stats = session.config.pluginmanager.get_plugin("terminalreporter").stats
    record = json.loads(TEST_TIME.read_text()) if TEST_TIME.exists() else {}
    record[suite] = {
        "seconds": round(time.time() - START),
        "passed": len(stats.get("passed", [])),
        "skipped": len(stats.get("skipped", [])),
        "created": datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
    }
    TEST_TIME.write_text(json.dumps(record, indent=2) + "\n")


@pytest.fixture
def one_thread():
    """Tiny matmuls on 2 shared cores: a second thread only adds contention (10x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def stdlib_texts():
    files = stdlib_files()[:60]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


@pytest.fixture(scope="session")
def byte_tokenizer_dir(tmp_path_factory, stdlib_texts):
    out = tmp_path_factory.mktemp("tok_byte")
    train_tokenizer("byte_bpe", 512, stdlib_texts, out)
    return out


@pytest.fixture(scope="session")
def meta_tokenizer_dir(tmp_path_factory, stdlib_texts):
    out = tmp_path_factory.mktemp("tok_meta")
    train_tokenizer("metaspace_bpe", 400, stdlib_texts, out)
    return out


def _save_model(path, arch, tokenizer_dir, seed, **sizes):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build_model({"arch": arch, **TINY, **sizes}, tok, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, byte_tokenizer_dir):
    """A tiny random Llama with the byte-level tokenizer."""
    return _save_model(tmp_path_factory.mktemp("tiny_llama"), "llama", byte_tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_llama_draft_dir(tmp_path_factory, byte_tokenizer_dir):
    """A smaller tiny random Llama, same tokenizer as tiny_llama_dir (a same-family draft)."""
    return _save_model(
        tmp_path_factory.mktemp("tiny_llama_draft"),
        "llama",
        byte_tokenizer_dir,
        seed=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_key_value_heads=4,
    )


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory, meta_tokenizer_dir):
    """A tiny random Qwen2 with the metaspace tokenizer (a different-tokenizer target)."""
    return _save_model(tmp_path_factory.mktemp("tiny_qwen"), "qwen2", meta_tokenizer_dir, seed=2)


# ---- hub-format stand-ins for the paper's Instruct checkpoints (tests/hub_models.py) ----


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory, byte_tokenizer_dir):
    """The byte-level tokenizer with Llama-3.1-Instruct's special tokens and chat template."""
    return chat_tokenizer_dir(tmp_path_factory, "llama3", byte_tokenizer_dir)


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir(tmp_path_factory, meta_tokenizer_dir):
    """The metaspace tokenizer with Qwen2.5-Instruct's ChatML special tokens and chat template."""
    return chat_tokenizer_dir(tmp_path_factory, "qwen2", meta_tokenizer_dir)


def chat_tokenizer_dir(tmp_path_factory, family, base_dir):
    out = tmp_path_factory.mktemp(f"tok_{family}")
    chat_tokenizer(family, base_dir, out)
    return out


@pytest.fixture(scope="session")
def hub_llama_dir(tmp_path_factory, llama3_tokenizer_dir):
    """A tiny random Llama-3.1-Instruct-shaped hub checkpoint (bf16 config, the real generation_config.json)."""
    return save_hub_model(tmp_path_factory.mktemp("hub_llama"), "llama3", llama3_tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def hub_llama_draft_dir(tmp_path_factory, llama3_tokenizer_dir):
    """A smaller Llama-3-shaped checkpoint with the same tokenizer (a Llama-3.2-1B-style draft)."""
    return save_hub_model(
        tmp_path_factory.mktemp("hub_llama_draft"), "llama3", llama3_tokenizer_dir, seed=1, hidden_size=16
    )


@pytest.fixture(scope="session")
def hub_qwen_dir(tmp_path_factory, qwen2_tokenizer_dir):
    """A tiny random Qwen2.5-Instruct-shaped hub checkpoint (ships repetition_penalty 1.05, top_k 20, ...)."""
    return save_hub_model(tmp_path_factory.mktemp("hub_qwen"), "qwen2", qwen2_tokenizer_dir, seed=2)


@pytest.fixture(scope="session")
def stdlib_root_dir():
    return stdlib_root()


REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


def snakemake_cmd(workdir, *args, configfile="config/test.yaml"):
    """A Snakemake command on the repository's workflow, writing everything under `workdir`."""
    import sys

    return [
        "timeout",
        "-k",
        "10",
        "1200",
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "workflow" / "Snakefile"),
        "-d",
        str(workdir),
        *args,
        # Last: --configfile takes several values and would swallow a target after it.
        "--configfile",
        str(REPO / configfile),
    ]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One real local run of config/test.yaml (every rule of the sweep); returns its directory."""
    import subprocess

    workdir = tmp_path_factory.mktemp("tiny_run")
    env = {**os.environ, "WANDB_MODE": "disabled", "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"}
    proc = subprocess.run(snakemake_cmd(workdir, "--cores", "2"), capture_output=True, text=True, env=env)
    if proc.returncode:
        logs = "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in sorted((workdir / "logs").rglob("*.log")))
        pytest.fail(f"snakemake failed:\n{proc.stderr[-5000:]}\n{logs[-20000:]}")
    return workdir


@pytest.fixture(scope="session")
def sft_data_dir(tmp_path_factory, stdlib_texts):
    """Prompt/response rows cut from stdlib files: fine-tuning data for the tiny drafts."""
    rows = []
    for t in stdlib_texts[:20]:
        for start in (0, 400):
            rows.append(
                {"id": str(len(rows)), "prompt": t[start : start + 80], "response": t[start + 80 : start + 240]}
            )
    out = tmp_path_factory.mktemp("sft_data")
    Dataset.from_list(rows).save_to_disk(str(out))
    return out


@pytest.fixture(scope="session")
def calibration_dir(tmp_path_factory, stdlib_texts):
    """A few prompt/response rows for pruning and quantization calibration."""
    rows = [{"id": str(i), "prompt": t[:200], "response": t[200:600]} for i, t in enumerate(stdlib_texts[:8])]
    out = tmp_path_factory.mktemp("calib")
    Dataset.from_list(rows).save_to_disk(str(out))
    return out


@pytest.fixture(scope="session")
def sparse_draft_dir(tmp_path_factory, tiny_llama_draft_dir, calibration_dir):
    """The tiny Llama draft pruned to 50% (magnitude): widths 16 and 64, so w4a16 groups are whole rows."""
    out = tmp_path_factory.mktemp("sparse_draft") / "pruned"
    settings = dict(pruner="magnitude", structure="unstructured", calibration_samples=4, calibration_seq_len=32)
    prune(tiny_llama_draft_dir, calibration_dir, out, sparsity=50, settings=settings, seed=0)
    return out
