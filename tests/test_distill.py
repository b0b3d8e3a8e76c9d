import json

import pytest
import torch
from datasets import Dataset, load_from_disk

from sd2.distill import decode_response, self_distill
from sd2.models import load_model, load_tokenizer

PROMPTS = [
    'def add(a, b):\n    """Return a + b."""\n',
    "import os\n",
    'class Stack:\n    """A last-in first-out stack of items, backed by a list."""\n\n    def push(self, item):\n',
    "def f(x):\n    return x ** 2  # ünïcode\n",
    "x",
]


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prompts")
    Dataset.from_list(
        [{"id": f"p{i}", "prompt": p, "response": f"orig{i}"} for i, p in enumerate(PROMPTS)]
    ).save_to_disk(str(out))
    return out


def unbatched_greedy(model_dir, prompts, max_new_tokens):
    """The reference: one prompt at a time, no padding at all."""
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    answers = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, enc["input_ids"].shape[1] :].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id) + 1]
        answers.append(decode_response(tok, enc["input_ids"][0].tolist(), new))
    return answers


@pytest.mark.parametrize("target", ["tiny_llama_dir", "tiny_qwen_dir"])
def test_batched_equals_unbatched_greedy(request, target, prompts_dir, tmp_path):
    target_dir = request.getfixturevalue(target)
    out = tmp_path / "distill"
    self_distill(
        target_dir,
        prompts_dir,
        out,
        settings=dict(max_new_tokens=12, temperature=0.0, batch_size=3, max_prompts=None),
        seed=0,
    )
    data = load_from_disk(str(out))
    assert data.column_names == ["id", "prompt", "response", "original_response"]
    assert data["id"] == [f"p{i}" for i in range(len(PROMPTS))] and data["prompt"] == PROMPTS
    assert data["original_response"] == [f"orig{i}" for i in range(len(PROMPTS))]
    assert data["response"] == unbatched_greedy(target_dir, PROMPTS, 12)
    assert any(r for r in data["response"])
    settings = json.loads((out / "settings.json").read_text())
    assert (
        settings["settings"]["max_new_tokens"] == 12 and settings["seed"] == 0 and settings["versions"]["transformers"]
    )


def test_sampling_and_max_prompts(tiny_llama_dir, prompts_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        self_distill(
            tiny_llama_dir,
            prompts_dir,
            tmp_path / name,
            settings=dict(max_new_tokens=8, temperature=1.0, batch_size=2, max_prompts=3),
            seed=7,
        )
        runs.append(load_from_disk(str(tmp_path / name))["response"])
    assert len(runs[0]) == 3 and runs[0] == runs[1]  # same seed, same samples
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert settings["settings"]["decoding"].startswith("sampling") and settings["stats"]["prompts"] == 3


@pytest.mark.parametrize("tokenizer", ["byte_tokenizer_dir", "meta_tokenizer_dir"])
def test_decode_response_is_the_new_text(request, tokenizer):
    tok = load_tokenizer(request.getfixturevalue(tokenizer))
    head = tok("def f(x):")["input_ids"]
    new = tok(" return x", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert decode_response(tok, head, new) == " return x"
