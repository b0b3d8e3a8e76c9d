"""Data extraction: corpus split, fine-tuning prompts, eval sets, no eval prompt in training."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import hub_layouts
import pytest
import yaml
from datasets import Dataset, load_from_disk

from sd2 import data, fields
from sd2.config import validate
from sd2.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


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


def test_function_headers_are_docstring_or_signature_prompts():
    src = (
        'def f(x):\n    """Double x."""\n    return 2 * x\n\n\n'
        "def g(a,\n      b):\n    # Sum.\n    return a + b\n\n\n"
        "def h(): return 1\n\n\n"
        'def only_doc():\n    """Nothing else."""\n'
    )
    ds = Dataset.from_list([{"path": "m.py", "text": src}])
    headers = data.function_headers(ds)
    assert [(r["id"], r["prompt"]) for r in headers["docstring"]] == [("m.py:1:f", 'def f(x):\n    """Double x."""\n')]
    # A signature keeps the comment lines above the first statement; a body on the def line gives no header.
    assert [(r["id"], r["prompt"]) for r in headers["signature"]] == [("m.py:6:g", "def g(a,\n      b):\n    # Sum.\n")]


def test_heldout_takes_every_docstring_header_before_a_signature(tmp_path):
    cfg = {"max_files": 150, "validation_fraction": 0.2, "max_finetune_prompts": 40, "max_body_chars": 800}
    every = {"held": {"source": "stdlib_heldout", "n": 100_000}}
    full = run_prepare(tmp_path / "all", data_config({**cfg, "eval_sets": every}))
    kinds = Counter(load_from_disk(str(tmp_path / "all" / "eval_held"))["header"])
    assert kinds["docstring"] > 0 and kinds["signature"] > 0
    n = kinds["docstring"] + 5
    some = {"held": {"source": "stdlib_heldout", "n": n}}
    info = run_prepare(tmp_path / "some", data_config({**cfg, "eval_sets": some}))
    held = load_from_disk(str(tmp_path / "some" / "eval_held"))
    # The manifest lists which prompts are of which kind, for comparisons within each kind.
    kinds_of = info["eval_groups"]["held"]["header"]
    assert {k: set(ids) for k, ids in kinds_of.items()} == {
        k: {i for i, h in zip(held["id"], held["header"]) if h == k} for k in ("docstring", "signature")
    }
    assert Counter(held["header"]) == {"docstring": kinds["docstring"], "signature": 5}
    assert len(set(held["prompt"])) == len(set(held["id"])) == n
    assert full["eval_sets"]["held"] == sum(kinds.values())


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


def data_config(data: dict, **top) -> dict:
    """A full data section: `data` (and top-level keys `top`) in test.yaml, defaults filled and checked."""
    cfg = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    cfg.update(data=data, **top)
    return validate(cfg)["data"]


def run_prepare(out, data_cfg: dict, seed=0) -> dict:
    evals = {name: out / f"eval_{name}" for name in data_cfg["eval_sets"]}
    return data.prepare(data_cfg, seed, out / "corpus", out / "finetune", evals, out / "manifest.json")


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    """load_dataset caches what it reads; keep the cache of these tests out of the home directory."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    cfg = data_config(
        {
            "max_files": 150,
            "validation_fraction": 0.2,
            "max_finetune_prompts": 40,
            "max_body_chars": 800,
            "eval_sets": {
                "humaneval": {"source": "humaneval", "n": 164},
                "held": {"source": "stdlib_heldout", "n": 10},
            },
        }
    )
    return out, run_prepare(out, cfg)


def test_prepare_counts_and_manifest(prepared):
    out, info = prepared
    corpus = load_from_disk(str(out / "corpus"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["files"] == len(corpus["train"])
    removed = manifest["removed_for_eval_overlap"]["corpus_files"]
    assert len(corpus["train"]) + len(corpus["validation"]) + removed["count"] == 150
    assert removed["count"] == len(removed["paths"])
    assert manifest["splits"]["validation"]["files"] > 0
    assert len(load_from_disk(str(out / "finetune"))) == 40
    assert len(load_from_disk(str(out / "eval_humaneval"))) == 164
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
    normalised_train = data._normalise(train_text)
    finetune_prompts = {data._normalise(p) for p in finetune["prompt"]}
    for name in ("eval_humaneval", "eval_held"):
        for prompt in load_from_disk(str(out / name))["prompt"]:
            assert data._normalise(prompt) not in normalised_train
            assert data._normalise(prompt) not in finetune_prompts


# --- hub and local-file sources -------------------------------------------------------------


def test_field_specs_reach_into_conversations_and_turn_lists():
    row = {
        "prompt": ["first turn", "second turn"],
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    }
    assert fields.parse("prompt[0]").resolve(row) == "first turn"
    assert fields.parse("prompt[-1]").resolve(row) == "second turn"
    assert fields.parse("messages[1].content").resolve(row) == "hello"
    assert fields.parse("messages[role=assistant].content").resolve(row) == "hello"
    # Absent items leave the field empty (the row is dropped), they are not errors.
    assert fields.parse("prompt[2]").resolve(row) is None
    assert fields.parse("messages[role=system].content").resolve(row) is None
    spec = fields.parse("messages[role=assistant].content")
    assert (spec.column, spec.steps) == ("messages", (("match", "role", "assistant"), ("key", "content")))


@pytest.mark.parametrize(
    "spec,row,message",
    [
        ("prompt", {"prompt": ["a", "b"]}, "'prompt[0]'"),
        ("messages[0].text", {"messages": [{"role": "user", "content": "x"}]}, "keys are ['content', 'role']"),
        ("prompt.content", {"prompt": "x"}, "not a dict"),
        ("prompt[0]", {"prompt": "x"}, "not a list"),
    ],
)
def test_field_spec_that_does_not_fit_the_data_says_why(spec, row, message):
    with pytest.raises(fields.FieldSpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        fields.parse(spec).resolve(row)


@pytest.mark.parametrize("spec", ["", "messages[role=assistant", "prompt[x]", "prompt..a", "[0]"])
def test_malformed_field_spec_is_refused_when_parsed(spec):
    with pytest.raises(fields.FieldSpecError, match="field spec"):
        fields.parse(spec)


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    return hub_layouts.write_all(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="module")
def paper_prepared(tmp_path_factory, standins):
    """The shipped paper.yaml data section, hub ids swapped for the stand-ins, through prepare."""
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())["data"]
    paper["finetune"]["dataset"] = str(standins[paper["finetune"]["dataset"]])
    for spec in paper["eval_sets"].values():
        if spec["source"] == "hub":
            spec["dataset"] = str(standins[spec["dataset"]])
    paper["max_files"] = 40  # the stdlib corpus only feeds from-scratch models; a slice is enough here
    out = tmp_path_factory.mktemp("paper_data")
    return out, paper, run_prepare(out, data_config(paper))


def test_paper_datasets_in_their_hub_layouts_prepare(paper_prepared, standins):
    out, _, info = paper_prepared
    finetune = load_from_disk(str(out / "finetune"))
    turns = hub_layouts.ULTRACHAT_TRAIN_SFT
    # Every UltraChat row but the one quoting a GSM8K test question; response = first assistant turn.
    assert sorted(zip(finetune["prompt"], finetune["response"])) == sorted(
        (t[0], t[1]) for t in turns if hub_layouts.GSM8K_TEST[1][0][:20] not in t[0]
    )
    mt_bench = load_from_disk(str(out / "eval_mt_bench"))
    assert mt_bench["prompt"] == [q[2][0] for q in hub_layouts.MT_BENCH_QUESTIONS]
    gsm8k = load_from_disk(str(out / "eval_gsm8k"))
    assert gsm8k["prompt"] == [q[0] for q in hub_layouts.GSM8K_TEST]  # config main, split test
    assert gsm8k["id"][0] == f"{standins[hub_layouts.GSM8K]}:main:0"
    assert info["eval_sets"] == {"humaneval": 164, "mt_bench": 5, "gsm8k": 4}
    report = info["sources"]
    assert report["finetune"]["rows_read"] == len(turns)
    assert report["finetune"]["dropped_empty"] == {"prompt": 0, "response": 0}
    assert report["eval_sets.mt_bench"] == {
        "source": str(standins[hub_layouts.MT_BENCH]),
        "rows_read": 5,
        "dropped_empty": {"prompt": 0},
    }


def test_paper_finetune_prompt_quoting_an_eval_prompt_is_removed(paper_prepared, standins):
    out, _, info = paper_prepared
    removed = info["removed_for_eval_overlap"]["finetune"]
    assert removed == {"count": 1, "ids": [f"{standins[hub_layouts.ULTRACHAT]}:3"]}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["removed_for_eval_overlap"]["finetune"] == removed


def test_hub_dataset_with_configs_needs_its_config(tmp_path, standins):
    cfg = data_config(
        {
            "max_files": 20,
            "eval_sets": {
                "gsm8k": {"source": "hub", "dataset": str(standins[hub_layouts.GSM8K]), "prompt_field": "question"}
            },
        }
    )
    with pytest.raises(ValueError, match="main"):
        run_prepare(tmp_path, cfg)


def test_list_valued_prompt_names_dataset_spec_and_columns(tmp_path, standins):
    """MT-Bench's prompt column is a list of turns: the error says so and how to pick one."""
    where = str(standins[hub_layouts.MT_BENCH])
    cfg = data_config({"max_files": 20, "eval_sets": {"mt": {"source": "hub", "dataset": where, "split": "train"}}})
    with pytest.raises(fields.FieldSpecError) as err:
        run_prepare(tmp_path, cfg)
    message = str(err.value)
    for part in ("data.eval_sets.mt", where, "'prompt'", "not text", "'prompt[0]'", "'category'", "'reference'"):
        assert part in message


def test_missing_column_names_dataset_spec_and_columns(tmp_path, standins):
    where = str(standins[hub_layouts.ULTRACHAT])
    cfg = data_config(
        {
            "max_files": 20,
            "eval_sets": {"humaneval": {"source": "humaneval", "n": 2}},
            "finetune": {"source": "hub", "dataset": where, "split": "train_sft", "response_field": "response"},
        }
    )
    with pytest.raises(fields.FieldSpecError) as err:
        run_prepare(tmp_path, cfg)
    message = str(err.value)
    for part in ("data.finetune", where, "'response'", "['prompt', 'prompt_id', 'messages']"):
        assert part in message


def test_field_spec_that_never_resolves_stops_the_run(tmp_path, standins):
    """A typo in a role name empties every row: an error, not an empty data set."""
    cfg = data_config(
        {
            "max_files": 20,
            "eval_sets": {"humaneval": {"source": "humaneval", "n": 2}},
            "finetune": {
                "source": "hub",
                "dataset": str(standins[hub_layouts.ULTRACHAT]),
                "split": "train_sft",
                "response_field": "messages[role=asistant].content",
            },
        }
    )
    with pytest.raises(ValueError, match=r"every one of the 6 rows.*'messages\[role=asistant\].content': 6"):
        run_prepare(tmp_path, cfg)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


EVAL_PROMPTS = [
    "Name three primary colours.",
    "Explain recursion to a ten-year-old\nin two sentences.",
    "What is the boiling point of water at sea level?",
]


def test_local_files_with_empty_prompts_dropped_and_counted(tmp_path):
    """Bring-your-own prompts: an eval set from .jsonl, fine-tuning prompts from .parquet."""
    evals = write_jsonl(tmp_path / "mine.jsonl", [{"q": {"text": p}} for p in EVAL_PROMPTS] + [{"q": {"text": "  "}}])
    rows = [
        {"conv": [{"from": "human", "value": f"Tell me fact number {i}."}, {"from": "gpt", "value": f"Fact {i}."}]}
        for i in range(6)
    ]
    rows[2]["conv"] = [{"from": "human", "value": ""}, {"from": "gpt", "value": "orphan answer"}]
    rows[4]["conv"] = rows[4]["conv"][:1]  # no answer
    Dataset.from_list(rows).to_parquet(str(tmp_path / "ft.parquet"))
    cfg = data_config(
        {
            "max_files": 20,
            "eval_sets": {"mine": {"source": "file", "path": str(evals), "prompt_field": "q.text", "n": 10}},
            "finetune": {
                "source": "file",
                "path": str(tmp_path / "ft.parquet"),
                "prompt_field": "conv[from=human].value",
                "response_field": "conv[from=gpt].value",
            },
        }
    )
    info = run_prepare(tmp_path / "out", cfg)
    mine = load_from_disk(str(tmp_path / "out" / "eval_mine"))
    assert mine["prompt"] == EVAL_PROMPTS
    assert mine["id"] == ["mine.jsonl:0", "mine.jsonl:1", "mine.jsonl:2"]
    assert info["sources"]["eval_sets.mine"]["dropped_empty"] == {"prompt": 1}
    finetune = load_from_disk(str(tmp_path / "out" / "finetune"))
    assert finetune["prompt"] == [f"Tell me fact number {i}." for i in (0, 1, 3, 5)]
    assert finetune["response"] == [f"Fact {i}." for i in (0, 1, 3, 5)]
    assert info["sources"]["finetune"] == {
        "source": str(tmp_path / "ft.parquet"),
        "rows_read": 6,
        "dropped_empty": {"prompt": 1, "response": 1},
    }


def test_json_records_file_and_prompts_without_responses(tmp_path):
    (tmp_path / "ft.json").write_text(json.dumps([{"prompt": f"Question {i}?"} for i in range(5)]))
    cfg = data_config(
        {
            "max_files": 20,
            "eval_sets": {"humaneval": {"source": "humaneval", "n": 2}},
            "finetune": {"source": "file", "path": str(tmp_path / "ft.json"), "response_field": None},
        },
        methods=["dense", "sd2"],  # sparse_sft needs the original responses
    )
    run_prepare(tmp_path / "out", cfg)
    finetune = load_from_disk(str(tmp_path / "out" / "finetune"))
    assert finetune.column_names == ["id", "prompt"] and len(finetune) == 5


@pytest.mark.parametrize("section", ["eval_sets", "finetune"])
def test_missing_local_file_is_named(tmp_path, section):
    missing = tmp_path / "nowhere" / "prompts.jsonl"
    spec = {"source": "file", "path": str(missing)}
    data_cfg = {"max_files": 20, "eval_sets": {"humaneval": {"source": "humaneval", "n": 2}}}
    if section == "finetune":
        data_cfg["finetune"] = spec
    else:
        data_cfg["eval_sets"]["mine"] = spec
    where = "data.finetune" if section == "finetune" else "data.eval_sets.mine"
    # Caught when the config is validated, before any job: named by its config key.
    with pytest.raises(ConfigError, match=f"config error at {where}.path: file {missing} does not exist"):
        data_config(data_cfg)


def test_unknown_file_type_is_refused(tmp_path):
    (tmp_path / "prompts.csv").write_text("prompt\nhello\n")
    with pytest.raises(ConfigError, match=r"config error at data.eval_sets.mine.path: .*prompts.csv is not one of"):
        data_config({"max_files": 20, "eval_sets": {"mine": {"source": "file", "path": str(tmp_path / "prompts.csv")}}})


def test_finetune_prompts_overlapping_eval_prompts_are_removed(tmp_path):
    """Equal up to whitespace, containing, within, or a response containing an eval prompt: removed."""
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": p} for p in EVAL_PROMPTS])
    rows = {
        "equal": ("  Name three\tprimary colours. ", "Red, yellow, blue."),
        "contains": ("Homework: Explain recursion to a ten-year-old in two\n\nsentences. Thanks!", "Sure."),
        "within": ("boiling point of water", "100 degrees Celsius."),
        "response": ("Repeat the question back to me.", "What is the boiling point of water at sea level?"),
        "clean1": ("Name three secondary colours.", "Green, orange, purple."),
        "clean2": ("Explain iteration.", "Doing something again and again."),
        "clean3": ("What is the freezing point of water?", "0 degrees Celsius."),
    }
    ft = write_jsonl(tmp_path / "ft.jsonl", [{"prompt": p, "response": r} for p, r in rows.values()])
    cfg = data_config(
        {
            "max_files": 20,
            "eval_sets": {"mine": {"source": "file", "path": str(evals)}},
            "finetune": {"source": "file", "path": str(ft)},
        }
    )
    info = run_prepare(tmp_path / "out", cfg)
    finetune = load_from_disk(str(tmp_path / "out" / "finetune"))
    names = list(rows)
    assert finetune["prompt"] == [rows[n][0] for n in ("clean1", "clean2", "clean3")]
    removed = info["removed_for_eval_overlap"]["finetune"]
    assert removed["count"] == 4
    assert sorted(removed["ids"]) == sorted(
        f"ft.jsonl:{names.index(n)}" for n in ("equal", "contains", "within", "response")
    )


def test_sample_of_finetune_prompts_skips_overlaps_and_stays_full(tmp_path):
    """With more prompts than max_finetune_prompts, removed prompts are replaced by clean ones."""
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": p} for p in EVAL_PROMPTS])
    rows = [{"prompt": f"Prompt {i}: {EVAL_PROMPTS[0] if i % 2 else 'clean'}", "response": "x"} for i in range(40)]
    ft = write_jsonl(tmp_path / "ft.jsonl", rows)
    cfg = data_config(
        {
            "max_files": 20,
            "max_finetune_prompts": 10,
            "eval_sets": {"mine": {"source": "file", "path": str(evals)}},
            "finetune": {"source": "file", "path": str(ft)},
        }
    )
    info = run_prepare(tmp_path / "out", cfg)
    finetune = load_from_disk(str(tmp_path / "out" / "finetune"))
    assert len(finetune) == 10 and all(p.endswith("clean") for p in finetune["prompt"])
    removed = info["removed_for_eval_overlap"]["finetune"]
    assert 0 < removed["count"] == len(removed["ids"]) <= 20


def test_heldout_prompts_found_in_training_leave_the_eval_set_not_the_corpus(tmp_path):
    """Growing the held-out set never moves the training corpus: a held-out function also written out in a
    training file is dropped from the eval set instead."""
    infos, outs = [], []
    for n in (10, 5000):
        cfg = data_config(
            {
                "max_files": 150,
                "validation_fraction": 0.2,
                "max_finetune_prompts": 40,
                "max_body_chars": 800,
                "eval_sets": {"held": {"source": "stdlib_heldout", "n": n}},
            }
        )
        outs.append(tmp_path / str(n))
        infos.append(run_prepare(outs[-1], cfg))
    assert infos[0]["splits"]["train"]["sha256"] == infos[1]["splits"]["train"]["sha256"]
    held = load_from_disk(str(outs[1] / "eval_held"))
    assert len(held) > 10
    training = data.TrainingText(load_from_disk(str(outs[1] / "corpus"))["train"]["text"])
    assert not any(training.holds(row) for row in held)
    dropped = infos[1]["removed_for_eval_overlap"]["eval_prompts_in_training"]["held"]
    assert dropped["count"] == len(dropped["ids"]) and not set(dropped["ids"]) & set(held["id"])


def test_training_text_finds_a_prompt_whatever_its_whitespace():
    training = data.TrainingText(["x = 1\n\ndef f(a):\n    '''Add one.'''\n    return a + 1\n", "y = 2\n"])
    assert training.holds({"prompt": "def f(a):\n  '''Add one.'''"})
    assert not training.holds({"prompt": "def g(a):\n    '''Add one.'''"})
    # A prompt never spans two files.
    assert not training.holds({"prompt": "return a + 1 y = 2"})
