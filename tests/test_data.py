"""Data extraction: corpus split, fine-tuning prompts, eval sets, no eval prompt in training."""

import json
import os
import subprocess
import sys

import pytest
from datasets import load_from_disk

from sd2 import data


def test_extract_functions_splits_prompt_and_body():
    src = (
        'class A:\n    def f(self, x):\n        """Double x.\n\n        More text.\n        """\n'
        "        y = x * 2\n        return y\n\n\ndef g():\n"
        '    "no body beyond docstring"\n'
    )
    fns = data.extract_functions(src, max_body_chars=1000)
    assert [f["name"] for f in fns] == ["f"]
    assert fns[0]["prompt"] == 'def f(self, x):\n    """Double x.\n\n    More text.\n    """\n'
    assert fns[0]["response"] == "    y = x * 2\n    return y\n"


def test_humaneval_has_164_prompts():
    prompts = data.humaneval_prompts()
    assert len(prompts) == 164
    assert prompts[0]["id"] == "HumanEval/0" and "def " in prompts[0]["prompt"]


def test_split_by_module_is_the_same_in_every_process():
    """Python salts str hashes per process: the split must not depend on hash()."""
    modules = [data.module_of(p.relative_to(data.stdlib_root()).as_posix()) for p in data.stdlib_files()[:200]]
    here = [data.is_validation(m, 0, 0.2) for m in modules]
    assert 0 < sum(here) < len(modules)
    code = f"from sd2 import data; print([data.is_validation(m, 0, 0.2) for m in {modules!r}])"
    for salt in ("1",):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": salt},
        )
        assert out.stdout.strip() == str(here)
    assert data.module_of("asyncio/tasks.py") == "asyncio.tasks"
    assert data.module_of("json/__init__.py") == "json"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    cfg = {
        "corpus": "stdlib",
        "validation_fraction": 0.2,
        "max_files": 150,
        "max_finetune_prompts": 40,
        "max_body_chars": 800,
        "hub": None,
        "eval_sets": {"humaneval": {"source": "humaneval", "n": 164}, "held": {"source": "stdlib_heldout", "n": 10}},
    }
    evals = {"humaneval": out / "eval_he", "held": out / "eval_held"}
    info = data.prepare(cfg, 0, out / "corpus", out / "finetune", evals, out / "manifest.json")
    return out, info


def test_prepare_counts_and_manifest(prepared):
    out, info = prepared
    corpus = load_from_disk(str(out / "corpus"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["files"] == len(corpus["train"])
    assert len(corpus["train"]) + len(corpus["validation"]) + len(manifest["removed_for_eval_overlap"]) == 150
    assert manifest["splits"]["validation"]["files"] > 0
    assert len(load_from_disk(str(out / "finetune"))) == 40
    assert len(load_from_disk(str(out / "eval_he"))) == 164
    assert len(load_from_disk(str(out / "eval_held"))) == 10
    assert manifest["provenance"]["seed"] == 0
    assert len(manifest["splits"]["train"]["sha256"]) == 64


def test_validation_modules_unseen_in_training(prepared):
    out, _ = prepared
    corpus = load_from_disk(str(out / "corpus"))
    assert not set(corpus["train"]["module"]) & set(corpus["validation"]["module"])
    held = load_from_disk(str(out / "eval_held"))
    train_paths = set(corpus["train"]["path"])
    assert all(i.split("::")[0] not in train_paths for i in held["id"])


def test_no_eval_prompt_in_training_data(prepared):
    out, _ = prepared
    train_text = "\n".join(load_from_disk(str(out / "corpus"))["train"]["text"])
    finetune = load_from_disk(str(out / "finetune"))
    for name in ("eval_he", "eval_held"):
        for prompt in load_from_disk(str(out / name))["prompt"]:
            assert prompt not in train_text
            assert prompt not in finetune["prompt"]
