"""Pretraining a tiny model lowers its loss; checkpoints are written atomically."""

import json

import pytest
import torch
from datasets import Dataset, DatasetDict

from sd2.checkpoint import atomic_path
from sd2.models import load_model, load_tokenizer
from sd2.pretrain import pretrain

SPEC = {
    "arch": "llama",
    "tokenizer": "code",
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
    "train": {
        "tokens": 64 * 8 * 64,
        "batch_size": 8,
        "seq_len": 64,
        "lr": 0.01,
        "warmup_steps": 5,
        "weight_decay": 0.1,
        "eval_every": 16,
        "eval_batches": 2,
        "bf16": "auto",
    },
}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, stdlib_texts):
    out = tmp_path_factory.mktemp("corpus")
    rows = [{"path": str(i), "module": str(i), "text": t} for i, t in enumerate(stdlib_texts)]
    DatasetDict({"train": Dataset.from_list(rows[:50]), "validation": Dataset.from_list(rows[50:])}).save_to_disk(
        str(out)
    )
    return out


def test_loss_goes_down_and_checkpoint_loads(tmp_path, corpus_dir, byte_tokenizer_dir):
    out = tmp_path / "model"
    history = pretrain("tiny", SPEC, byte_tokenizer_dir, corpus_dir, out, seed=0)
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.5
    assert history[-1]["step"] == 64
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["seed"] == 0 and prov["versions"]["torch"] and prov["final"]["val_loss"] == history[-1]["val_loss"]
    assert (out / "training.csv").read_text().startswith("step,tokens,train_loss,val_loss")
    model, tok = load_model(out), load_tokenizer(out)
    assert tok.decode(tok("def f():")["input_ids"]) == "def f():"
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == len(tok)


def test_instruct_stage_trains_on_bodies_after_pretraining(tmp_path, corpus_dir, byte_tokenizer_dir):
    instruct = {
        "steps": 24,
        "batch_size": 8,
        "seq_len": 128,
        "lr": 0.005,
        "warmup_steps": 2,
        "eval_every": 8,
        "validation_fraction": 0.1,
        "max_body_chars": 1200,
    }
    spec = {**SPEC, "train": {**SPEC["train"], "tokens": 16 * 8 * 64, "instruct": instruct}}
    out = tmp_path / "model"
    rows = pretrain("tiny", spec, byte_tokenizer_dir, corpus_dir, out, seed=0)
    stages = [r["stage"] for r in rows]
    assert stages == ["pretrain"] * stages.count("pretrain") + ["instruct"] * 4  # steps 0, 8, 16, 24
    tuned = [r for r in rows if r["stage"] == "instruct"]
    assert tuned[-1]["val_loss"] < tuned[0]["val_loss"]
    # Loss on the bodies only: fewer loss tokens than the 24 x 8 x (prompt + body) sequences.
    assert 0 < tuned[-1]["tokens"] < 24 * 8 * 128
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["instruct_final"]["step"] == 24 and prov["final"]["stage"] == "pretrain"
    csv = (out / "training.csv").read_text()
    assert csv.count(",instruct\n") == 4 and csv.count(",pretrain\n") == stages.count("pretrain")


def test_same_seed_same_model(tmp_path, corpus_dir, byte_tokenizer_dir):
    spec = {**SPEC, "train": {**SPEC["train"], "tokens": 4 * 8 * 64}}
    a = pretrain("a", spec, byte_tokenizer_dir, corpus_dir, tmp_path / "a", seed=3)
    b = pretrain("b", spec, byte_tokenizer_dir, corpus_dir, tmp_path / "b", seed=3)
    assert [r["val_loss"] for r in a] == [r["val_loss"] for r in b]


def test_atomic_checkpoint_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("killed mid-save")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_checkpoint_replaces_existing(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"]


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "no-such-model")
