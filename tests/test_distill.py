import json

import pytest
import torch
from datasets import Dataset, load_from_disk
from hub_models import save_hub_model

from sd2 import chat, generation
from sd2.calibration import calibration_set
from sd2.drafts.distill import partial_dir, self_distill
from sd2.generation import decode_response, generate_batch
from sd2.models import load_model, load_tokenizer

PROMPTS = [
    'def add(a, b):\n    """Return a + b."""\n',
    "import os\n",
    'class Stack:\n    """A last-in first-out stack of items, backed by a list."""\n\n    def push(self, item):\n',
    "def f(x):\n    return x ** 2  # ünïcode\n",
    "x",
]
# The config's distill settings this file does not vary, as the schema's defaults fill them.
DISTILL = dict(
    max_prompts=None,
    max_prompt_tokens=None,
    shard_batches=20,
    engine={"name": "transformers", "gpu_memory_utilization": 0.9, "max_model_len": None},
)


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prompts")
    Dataset.from_list(
        [{"id": f"p{i}", "prompt": p, "response": f"orig{i}"} for i, p in enumerate(PROMPTS)]
    ).save_to_disk(str(out))
    return out


def unbatched_greedy(model_dir, prompts, max_new_tokens):
    """The reference: one prompt at a time (formatted by sd2.chat), no padding at all."""
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    answers = []
    for prompt in prompts:
        ids = torch.tensor([chat.prompt_ids(tok, prompt, None)])
        with torch.no_grad():
            # Greedy, with the repetition penalty a Qwen checkpoint ships switched off by hand.
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                repetition_penalty=1.0,
                pad_token_id=tok.pad_token_id,
            )
        new = out[0, ids.shape[1] :].tolist()
        end = next((j for j, t in enumerate(new) if t in eos), None)
        new = new if end is None else new[: end + 1]
        answers.append(decode_response(tok, ids[0].tolist(), new))
    return answers


COLUMNS = [
    "id",
    "prompt",
    "response",
    "original_response",
    "target_prompt",
    "target_prompt_text",
    "finished",
    "end_token",
]


@pytest.mark.parametrize("target", ["tiny_llama_dir", "tiny_qwen_dir", "hub_llama_dir", "hub_qwen_dir"])
def test_batched_equals_unbatched_greedy(request, target, prompts_dir, tmp_path, one_thread):
    target_dir = request.getfixturevalue(target)
    out = tmp_path / "distill"
    self_distill(
        target_dir,
        prompts_dir,
        out,
        settings=dict(DISTILL, max_new_tokens=12, temperature=0.0, batch_size=3),
        seed=0,
    )
    data = load_from_disk(str(out))
    assert data.column_names == COLUMNS
    assert data["id"] == [f"p{i}" for i in range(len(PROMPTS))] and data["prompt"] == PROMPTS
    assert data["original_response"] == [f"orig{i}" for i in range(len(PROMPTS))]
    assert data["response"] == unbatched_greedy(target_dir, PROMPTS, 12)
    assert any(r for r in data["response"])
    tok = load_tokenizer(target_dir)
    for row in data:
        # The formatted prompt is exactly what the target was given.
        assert tok(row["target_prompt"], add_special_tokens=False)["input_ids"] == chat.prompt_ids(
            tok, row["prompt"], None
        )
        assert (row["end_token"] != "") == row["finished"]
    settings = json.loads((out / "settings.json").read_text())
    assert (
        settings["settings"]["max_new_tokens"] == 12 and settings["seed"] == 0 and settings["versions"]["transformers"]
    )
    assert settings["settings"]["chat"] == chat.describe(tok, None)
    assert settings["settings"]["chat"]["applied"] == target.startswith("hub")
    assert not partial_dir(out).exists()


def test_sampling_and_max_prompts(tiny_llama_dir, prompts_dir, tmp_path, one_thread):
    runs = []
    for name in ("a", "b"):
        self_distill(
            tiny_llama_dir,
            prompts_dir,
            tmp_path / name,
            settings=dict(DISTILL, max_new_tokens=8, temperature=1.0, batch_size=2, max_prompts=3),
            seed=7,
        )
        runs.append(load_from_disk(str(tmp_path / name))["response"])
    assert len(runs[0]) == 3 and runs[0] == runs[1]  # same seed, same samples
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert settings["settings"]["decoding"].startswith("sampling") and settings["stats"]["prompts"] == 3


def test_prompts_longer_than_max_prompt_tokens_are_left_out(hub_llama_dir, prompts_dir, tmp_path, one_thread):
    from transformers import AutoTokenizer

    from sd2 import chat

    tok = AutoTokenizer.from_pretrained(hub_llama_dir)
    prompts = load_from_disk(str(prompts_dir))
    lengths = {i: len(chat.prompt_ids(tok, p, None)) for i, p in zip(prompts["id"], prompts["prompt"])}
    limit = sorted(lengths.values())[len(lengths) // 2]  # the chat template's header counts too
    settings = dict(DISTILL, max_new_tokens=4, temperature=0.0, batch_size=2, max_prompt_tokens=limit)
    self_distill(hub_llama_dir, prompts_dir, tmp_path / "out", settings=settings, seed=0)
    kept = load_from_disk(str(tmp_path / "out"))["id"]
    assert sorted(kept) == sorted(i for i, n in lengths.items() if n <= limit) and len(kept) < len(lengths)
    left_out = json.loads((tmp_path / "out" / "settings.json").read_text())["stats"]
    assert sorted(left_out["left_out_longer_than_max_prompt_tokens"]["ids"]) == sorted(
        i for i, n in lengths.items() if n > limit
    )
    with pytest.raises(ValueError, match="max_prompt_tokens=1: every one"):
        too_short = {**settings, "max_prompt_tokens": 1}
        self_distill(hub_llama_dir, prompts_dir, tmp_path / "none", settings=too_short, seed=0)


@pytest.mark.parametrize("tokenizer", ["byte_tokenizer_dir", "meta_tokenizer_dir"])
def test_decode_response_is_the_new_text(request, tokenizer):
    tok = load_tokenizer(request.getfixturevalue(tokenizer))
    head = tok("def f(x):")["input_ids"]
    new = tok(" return x", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert decode_response(tok, head, new) == " return x"


# ---- resuming a killed run ----


def test_killed_run_resumes_to_the_same_dataset(tiny_llama_dir, prompts_dir, tmp_path, monkeypatch, capsys, one_thread):
    # Sampling, so the resumed part must draw exactly what an uninterrupted run draws.
    settings = dict(DISTILL, max_new_tokens=6, temperature=1.0, batch_size=2, shard_batches=1)
    self_distill(tiny_llama_dir, prompts_dir, tmp_path / "whole", settings=settings, seed=3)
    whole = load_from_disk(str(tmp_path / "whole"))

    out = tmp_path / "killed"
    real, calls = generation.generate_batch, []

    def dies_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_batch", dies_on_third_batch)
    with pytest.raises(RuntimeError, match="killed"):
        self_distill(tiny_llama_dir, prompts_dir, out, settings=settings, seed=3)
    assert not out.exists() and sorted(p.name for p in partial_dir(out).glob("shard-*.json")) == [
        "shard-00000.json",
        "shard-00001.json",
    ]

    monkeypatch.setattr(generation, "generate_batch", real)
    self_distill(tiny_llama_dir, prompts_dir, out, settings=settings, seed=3)
    assert "resuming from 2 shard(s)" in capsys.readouterr().out
    assert load_from_disk(str(out)).to_dict() == whole.to_dict()
    stats = json.loads((out / "settings.json").read_text())["stats"]
    assert stats["resumed_prompts"] == 4 and stats["generated_prompts"] == 1
    assert not partial_dir(out).exists()


def test_partial_run_with_other_settings_starts_over(
    tiny_llama_dir, prompts_dir, tmp_path, monkeypatch, capsys, one_thread
):
    settings = dict(DISTILL, max_new_tokens=6, temperature=0.0, batch_size=2, shard_batches=1)
    out = tmp_path / "d"
    real = generation.generate_batch
    monkeypatch.setattr(generation, "generate_batch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
    partial_dir(out).mkdir()
    (partial_dir(out) / "settings.json").write_text(json.dumps({"digest": "other"}))
    (partial_dir(out) / "shard-00000.json").write_text(json.dumps({"shard": 0, "digest": "other", "rows": {}}))
    with pytest.raises(RuntimeError):
        self_distill(tiny_llama_dir, prompts_dir, out, settings=settings, seed=0)
    assert "other settings" in capsys.readouterr().out
    assert not (partial_dir(out) / "shard-00000.json").exists()  # the stale shard is gone
    monkeypatch.setattr(generation, "generate_batch", real)
    self_distill(tiny_llama_dir, prompts_dir, out, settings=settings, seed=0)
    assert json.loads((out / "settings.json").read_text())["stats"]["resumed_prompts"] == 0


# ---- generation hygiene: nothing a checkpoint ships leaks into the decoding ----


@pytest.fixture(scope="module")
def penalised_pair(tmp_path_factory, byte_tokenizer_dir):
    """Same weights twice: one ships repetition_penalty 1.5 (and Qwen's sampling settings), one nothing."""
    root = tmp_path_factory.mktemp("penalised")
    shipped = {"do_sample": True, "repetition_penalty": 1.5, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    return (
        save_hub_model(root / "penalised", "llama3", byte_tokenizer_dir, seed=5, generation_config=shipped),
        save_hub_model(root / "clean", "llama3", byte_tokenizer_dir, seed=5, generation_config={}),
    )


def test_shipped_generation_config_does_not_leak(penalised_pair, one_thread):
    tok = load_tokenizer(penalised_pair[1])
    models = [load_model(d) for d in penalised_pair]
    assert models[0].generation_config.repetition_penalty == 1.5
    # Left to generate(), the shipped penalty changes a greedy answer: the leak is real...
    leaky = []
    for model in models:
        outputs = []
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                outputs.append(
                    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
                    .flatten()
                    .tolist()
                )
        leaky.append(outputs)
    assert leaky[0] != leaky[1]
    # ...and the explicit generation config shuts it out, greedy and sampling alike.
    for temperature in (0.0, 1.0):
        answers = []
        for model in models:
            torch.manual_seed(0)
            answers.append(generate_batch(model, tok, PROMPTS, max_new_tokens=12, temperature=temperature))
        assert [r["new_ids"] for r in answers[0]] == [r["new_ids"] for r in answers[1]]


def test_undoable_shipped_setting_is_refused(tiny_llama_dir):
    tok, model = load_tokenizer(tiny_llama_dir), load_model(tiny_llama_dir)
    model.generation_config.min_p = 0.1
    with pytest.raises(ValueError, match="min_p"):
        generate_batch(model, tok, PROMPTS[:1], max_new_tokens=2, temperature=0.0)


# ---- what drafts train on: the target's format ----


def test_drafts_train_on_what_the_target_saw(hub_llama_dir, qwen2_tokenizer_dir, prompts_dir, tmp_path, one_thread):
    out = tmp_path / "distill"
    self_distill(
        hub_llama_dir, prompts_dir, out, settings=dict(DISTILL, max_new_tokens=8, temperature=0.0, batch_size=5), seed=0
    )
    rows = load_from_disk(str(out)).to_list()
    target_tok = load_tokenizer(hub_llama_dir)
    # A random model rarely ends an answer: one finished and one cut-off row, whatever it did.
    rows[0].update(finished=True, end_token="<|eot_id|>")
    rows[1].update(finished=False, end_token="")
    data = Dataset.from_list(rows)

    same, fmt = chat.encode_dataset(target_tok, data, out, None, seq_len=512)
    assert fmt["format"] == "target" and fmt["target_chat"]["applied"]
    for example, row in zip(same, data):
        head = chat.prompt_ids(target_tok, row["prompt"], None)
        assert example["input_ids"][: len(head)] == head and example["labels"][: len(head)] == [-100] * len(head)
        answer = target_tok.decode([i for i, lab in zip(example["input_ids"], example["labels"]) if lab != -100])
        assert answer == row["response"] + (row["end_token"] if row["finished"] else "")

    # Pruning calibration reads the same format: prompt and answer as one text, the target's exact prompt ids first.
    calibration, fmt = calibration_set(out, target_tok, n=5, seq_len=512, seed=0)
    assert fmt["format"] == "target"
    by_text = {row["target_prompt"] + row["response"]: row for row in rows}
    for ids in calibration["input_ids"]:
        row = by_text[target_tok.decode(ids)]
        head = chat.prompt_ids(target_tok, row["prompt"], None)
        assert ids[: len(head)] == head

    other_tok = load_tokenizer(qwen2_tokenizer_dir)
    other, fmt = chat.encode_dataset(other_tok, data, out, None, seq_len=512)
    assert fmt["format"] == "target_text"
    for example, row in zip(other, data):
        # What transformers' UAG gives this draft: the target's prompt ids decoded without special tokens.
        head = other_tok(row["target_prompt_text"])["input_ids"]
        assert example["input_ids"][: len(head)] == head
        assert (
            "<|start_header_id|>" not in other_tok.decode(head)
            and "Today Date: 26 Jul 2024" in row["target_prompt_text"]
        )
        labels = [lab for lab in example["labels"] if lab != -100]
        assert (labels[-1] == other_tok.eos_token_id) == row["finished"]


def test_demo_fine_tuning_examples_are_those_of_before(
    tiny_llama_dir, tiny_qwen_dir, prompts_dir, tmp_path, one_thread
):
    """No template: the encoding of before sd2.chat, except that a cut-off answer gets no end-of-text."""
    out = tmp_path / "distill"
    self_distill(
        tiny_llama_dir,
        prompts_dir,
        out,
        settings=dict(DISTILL, max_new_tokens=8, temperature=0.0, batch_size=5),
        seed=0,
    )
    data = load_from_disk(str(out))
    for draft_dir in (tiny_llama_dir, tiny_qwen_dir):  # the target's tokenizer, and another one (UAG)
        tok = load_tokenizer(draft_dir)
        examples, _ = chat.encode_dataset(tok, data, out, None, seq_len=512)
        for example, row in zip(examples, data):
            head = tok(row["prompt"])["input_ids"]
            answer = tok(row["response"], add_special_tokens=False)["input_ids"]
            answer += [tok.eos_token_id] if row["finished"] else []
            assert example == {"input_ids": head + answer, "labels": [-100] * len(head) + answer}
