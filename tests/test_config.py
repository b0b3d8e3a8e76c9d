"""The schema rejects bad configs before any job runs, with a message naming the key."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sd2.config import ConfigError, load, validate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def test_config():
    return yaml.safe_load((ROOT / "config" / "test.yaml").read_text())


@pytest.mark.parametrize(
    "name",
    ["config.yaml", "test.yaml", "paper.yaml", "families.yaml", "quantization.yaml", "real.yaml", "parallel.yaml"],
)
def test_shipped_configs_validate(name):
    cfg = load(ROOT / "config" / name)
    assert cfg["targets"] and cfg["drafts"]


def test_defaults_are_filled(test_config):
    cfg = validate(test_config)
    assert cfg["prune"]["pruner"] == "sparsegpt"
    assert cfg["models"]["tiny-llama"]["train"]["lr"] == 0.003
    assert cfg["losses"] == ["ce"]
    assert cfg["models"]["tiny-llama"]["train"]["bf16"] == "auto" and cfg["finetune"]["bf16"] == "auto"


BAD = [
    (lambda c: c.update(typo_key=1), "<top level>", "typo_key"),
    (lambda c: c["measure"].update(kk=[5]), "measure", "kk"),
    (lambda c: c["models"]["tiny-llama"].update(hidden_sise=8), "models.tiny-llama", "hidden_sise"),
    (lambda c: c.update(sparsities=[50, 100]), "sparsities.1", "100"),
    (lambda c: c.update(sparsities=[-5]), "sparsities.0", "-5"),
    (lambda c: c["models"]["tiny-llama"].update(hidden_size="big"), "models.tiny-llama.hidden_size", "big"),
    (lambda c: c["wandb"].update(mode="loud"), "wandb.mode", "loud"),
    (lambda c: c.update(methods=["sd2", "magic"]), "methods.1", "magic"),
    (lambda c: c.update(losses=["ce", "l2"]), "losses.1", "l2"),
    (lambda c: c.update(losses=[]), "losses", "non-empty"),
    # The loss was one setting before it became a sweep axis: the old key says where it went.
    (lambda c: c["finetune"].update(loss="kl"), "finetune.loss", "losses: [kl]"),
    (lambda c: c.update(targets=["nope"]), "targets.0", "nope"),
    (lambda c: c["models"]["tiny-llama"].update(tokenizer="klingon"), "models.tiny-llama.tokenizer", "klingon"),
    (lambda c: c["models"]["tiny-draft"].update(hub="org/model"), "models.tiny-draft", "hub model"),
    (lambda c: c.update(sparsities=[50, 70], prune={"structure": "2:4"}), "prune.structure", "2:4"),
    (lambda c: c["models"]["tiny-llama"]["train"].update(bf16="yes"), "models.tiny-llama.train.bf16", "yes"),
    (lambda c: c["finetune"].update(bf16="fp16"), "finetune.bf16", "fp16"),
    (lambda c: c["measure"].update(k=[3, 9], k_max=8), "measure.k", "k_max"),
    (lambda c: c["measure"].update(bootstrap=100), "measure.bootstrap", "100"),
    (lambda c: c["measure"].update(uag_eval_sets=["humaneval", "mbpp"]), "measure.uag_eval_sets", "mbpp"),
    (lambda c: c["measure"].update(uag_methods=["sd2", "sd3"]), "measure.uag_methods", "sd3"),
    (
        lambda c: c["measure"].update(
            check_every_k={"draft": "nope", "method": "dense", "sparsity": 0, "eval_set": "humaneval", "prompts": 4}
        ),
        "measure.check_every_k.draft",
        "nope",
    ),
    (
        lambda c: c["measure"].update(
            check_every_k={"draft": "tiny-draft", "method": "dense", "sparsity": 30, "eval_set": "x", "prompts": 4}
        ),
        "measure.check_every_k.sparsity",
        "30",
    ),
    # data sources: each names what it reads, and nothing it would ignore
    (lambda c: c["data"].update(hub={"dataset": "org/set"}), "data", "hub"),
    (lambda c: c["data"]["eval_sets"].update(x={"source": "hub"}), "data.eval_sets.x.dataset", "needs a dataset"),
    (lambda c: c["data"]["eval_sets"].update(x={"source": "file"}), "data.eval_sets.x.path", "needs a path"),
    (
        lambda c: c["data"]["eval_sets"].update(x={"source": "hub", "dataset": "org/set", "path": "p.jsonl"}),
        "data.eval_sets.x.path",
        "does not read",
    ),
    (
        lambda c: c["data"]["eval_sets"].update(x={"source": "file", "path": "p.jsonl", "config": "main"}),
        "data.eval_sets.x.config",
        "does not read",
    ),
    (
        lambda c: c["data"]["eval_sets"]["humaneval"].update(dataset="org/set"),
        "data.eval_sets.humaneval.dataset",
        "does not read",
    ),
    (
        lambda c: c["data"].update(
            finetune={"source": "hub", "dataset": "d", "response_field": "messages[role=assistant"}
        ),
        "data.finetune.response_field",
        "messages[role=assistant",
    ),
    (
        lambda c: c["data"]["eval_sets"].update(
            x={"source": "file", "path": "p.jsonl", "prompt_field": "turns[first]"}
        ),
        "data.eval_sets.x.prompt_field",
        "turns[first]",
    ),
    (lambda c: c["data"].update(corpus={"source": "file", "path": "c.jsonl"}), "data.finetune.source", "stdlib corpus"),
    (
        lambda c: c["data"].update(
            corpus={"source": "file", "path": "c.jsonl"},
            finetune={"source": "file", "path": "f.jsonl"},
            eval_sets={"held": {"source": "stdlib_heldout"}},
        ),
        "data.eval_sets.held.source",
        "stdlib corpus",
    ),
    (
        lambda c: c["data"].update(finetune={"source": "file", "path": "f.jsonl", "response_field": None}),
        "data.finetune.response_field",
        "sparse_sft",
    ),
    (lambda c: c["models"]["tiny-llama"].update(dtype="bf16"), "models.tiny-llama.dtype", "bf16"),
    (lambda c: c["models"]["tiny-llama"].update(shape=dict(HUB_SHAPE)), "models.tiny-llama.shape", "from-scratch"),
    (lambda c: c["models"].update(hub={"hub": "org/m", "shape": {"params_b": 1}}), "models.hub.shape", "hidden_size"),
    (lambda c: c["resources"].update(gpu_mem_gb=0), "resources.gpu_mem_gb", "0"),
    (lambda c: c["resources"].update(gpu="auto"), "resources.gpu", "auto"),
    # A GPU run sizes every job: a hub id needs its shape before anything is downloaded.
    (
        lambda c: (c["models"].update({"tiny-draft": {"hub": "org/model"}}), c["resources"].update(gpu=1)),
        "models.tiny-draft.shape",
        "hub id",
    ),
    # A draft made of another model's layers, a tokenizer copied from a model, a GGUF fallback.
    (
        lambda c: c["models"].update(sub={"layers_of": {"model": "nowhere", "keep": 2}}),
        "models.sub.layers_of.model",
        "nowhere",
    ),
    (
        lambda c: c["models"].update(sub={"layers_of": {"model": "tiny-llama", "keep": 2}, "arch": "llama"}),
        "models.sub",
        "arch",
    ),
    (lambda c: c["models"].update(sub={"layers_of": {"model": "tiny-llama", "keep": 1}}), "models.sub", "keep"),
    (lambda c: c["tokenizers"].update(own={"kind": "from_model"}), "tokenizers.own.model", "from_model"),
    (lambda c: c["tokenizers"].update(own={"kind": "byte_bpe"}), "tokenizers.own", "vocab_size"),
    (
        lambda c: c["models"]["tiny-llama"].update(
            gguf={"package": "p==1", "file": "m.gguf", "sha256": "0" * 64, "quantization": "Q4_1"}
        ),
        "models.tiny-llama.gguf",
        "hub",
    ),
    (
        lambda c: c["models"].update(
            m={"hub": "org/m", "gguf": {"package": "p==1", "file": "m.gguf", "sha256": "xyz", "quantization": "Q4_1"}}
        ),
        "models.m.gguf.sha256",
        "xyz",
    ),
]
HUB_SHAPE = {
    "params_b": 1.2358144,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
}


@pytest.mark.parametrize("mutate,key,word", BAD)
def test_bad_configs_name_the_key(test_config, mutate, key, word):
    cfg = copy.deepcopy(test_config)
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert f"config error at {key}" in str(err.value)
    assert word in str(err.value)


def test_paper_data_reaches_into_the_real_layouts():
    data = load(ROOT / "config" / "paper.yaml")["data"]
    assert data["finetune"]["response_field"] == "messages[role=assistant].content"
    assert data["eval_sets"]["mt_bench"]["prompt_field"] == "prompt[0]"
    assert data["eval_sets"]["gsm8k"]["config"] == "main"


def test_prompts_without_responses_are_fine_without_sparse_sft(test_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a local file's path is relative to where Snakemake runs
    Path("f.jsonl").write_text('{"prompt": "Name three colours."}\n')
    test_config["data"]["finetune"] = {"source": "file", "path": "f.jsonl", "response_field": None}
    test_config["methods"] = ["dense", "sd2"]
    assert validate(test_config)["data"]["finetune"]["response_field"] is None


def test_hub_model_keys(test_config):
    cfg = copy.deepcopy(test_config)
    cfg["models"]["tiny-draft"] = {"hub": "org/model", "shape": dict(HUB_SHAPE)}
    cfg["resources"]["gpu"] = 1
    checked = validate(cfg)
    model = checked["models"]["tiny-draft"]
    assert model["dtype"] == "auto"
    assert model["shape"]["dtype"] == "bfloat16" and model["shape"]["tie_word_embeddings"] is False
    assert checked["resources"]["gpu_mem_gb"] == 80
    assert validate(copy.deepcopy(test_config))["models"]["tiny-llama"]["dtype"] == "auto"


def test_validate_leaves_its_argument_as_it_is(test_config):
    before = copy.deepcopy(test_config)
    checked = validate(test_config)
    assert test_config == before
    assert checked["quantize"]["algorithm"] == "gptq" and "quantize" not in test_config


def test_unknown_names_list_the_known_ones(test_config):
    test_config["losses"] = ["ce", "l2"]
    with pytest.raises(ConfigError, match=r"config error at losses.1: unknown loss 'l2' \(known: ce, kl, tvdpp, "):
        validate(test_config)
    test_config["losses"] = ["ce"]
    test_config["heads"] = {"methods": ["medusa"]}
    with pytest.raises(
        ConfigError, match=r"heads.methods.0: unknown draft-head family 'medusa' \(known: redrafter, moa"
    ):
        validate(test_config)


def test_head_sizes_are_checked_against_their_family(test_config):
    test_config["heads"] = {"methods": ["moa"], "sizes": {"moa": {"tiny": {"width": 0.5}}}}
    with pytest.raises(ConfigError, match="config error at heads.sizes.moa.tiny: 'layers' is a required property"):
        validate(test_config)
    test_config["heads"]["sizes"] = {"moa": {"tiny": {"layers": 1}}}
    heads = validate(test_config)["heads"]
    assert heads["sizes"]["moa"] == {"tiny": {"layers": 1, "width": 0.25, "attention_heads": None}}
    assert heads["sizes"]["redrafter"] == {"small": {"layers": 1}, "large": {"layers": 2}}


def test_an_extension_that_cannot_be_imported_is_named(test_config):
    test_config["extensions"] = ["no_such_sd2_extension"]
    with pytest.raises(ConfigError, match="config error at extensions.0: cannot import no_such_sd2_extension"):
        validate(test_config)


def test_runtime_per_class_of_job(test_config):
    from sd2 import memory

    assert memory.runtime_min("finetune", validate(test_config)) == test_config["resources"]["runtime_min"]
    test_config["resources"]["runtime_min"] = {"training": 600}
    cfg = validate(test_config)
    assert [memory.runtime_min(r, cfg) for r in ("finetune", "train_head", "measure", "prune", "layer_prune")] == [
        600,
        600,
        120,
        120,
        120,
    ]
    test_config["resources"]["runtime_min"] = {"trainnig": 600}
    with pytest.raises(ConfigError, match="resources.runtime_min: .*trainnig"):
        validate(test_config)


def test_a_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("models:\n  a: {hub: org/a}\n  b: {hub: org/b}\n  a: {hub: org/c}\ntargets: [a]\ndrafts: [b]\n")
    with pytest.raises(ConfigError, match=r"config error at models.a: duplicate key in .*twice.yaml \(lines 2 and 4\)"):
        load(path)


LOCAL = {"source": "file", "path": "mine.jsonl", "prompt_field": "turns[0]"}


@pytest.mark.parametrize(
    "rows,word",
    [
        (None, "config error at data.eval_sets.mine.path: file mine.jsonl does not exist"),
        ([{"question": "x"}], "config error at data.eval_sets.mine.prompt_field: mine.jsonl has no column 'turns'"),
        (
            [{"turns": "x"}],
            "config error at data.eval_sets.mine.prompt_field: in the first row of mine.jsonl: turns is",
        ),
        ([], "config error at data.eval_sets.mine.path: mine.jsonl has no rows"),
    ],
)
def test_a_local_prompt_file_is_checked_at_validation(test_config, tmp_path, monkeypatch, rows, word):
    monkeypatch.chdir(tmp_path)
    if rows is not None:
        Path("mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    test_config["data"]["eval_sets"]["mine"] = dict(LOCAL)
    with pytest.raises(ConfigError) as err:
        validate(test_config)
    assert word in str(err.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_a_good_local_prompt_file_validates(test_config, tmp_path, monkeypatch, suffix):
    monkeypatch.chdir(tmp_path)
    rows = [{"turns": ["Hello?", "Again?"]}, {"turns": ["Bye?"]}]
    path = Path("mine" + suffix)
    if suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test_config["data"]["eval_sets"]["mine"] = {**LOCAL, "path": str(path)}
    assert validate(test_config)["data"]["eval_sets"]["mine"]["n"] == 164


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.yaml")


def test_snakemake_refuses_a_key_given_twice_in_its_configfile(tmp_path):
    text = (ROOT / "config" / "test.yaml").read_text()
    path = tmp_path / "twice.yaml"
    path.write_text(text + "\nseed: 3\n")  # test.yaml sets seed already
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", str(path), "-d", str(tmp_path / "wd")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "config error at seed: duplicate key" in proc.stdout + proc.stderr


def test_snakemake_stops_before_any_job(tmp_path, test_config):
    bad = copy.deepcopy(test_config)
    bad["finetune"]["learning_rate"] = 1e-4
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", str(path), "-d", str(tmp_path / "wd")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "config error at finetune" in proc.stdout + proc.stderr
    assert "learning_rate" in proc.stdout + proc.stderr
    assert not (tmp_path / "wd" / "work").exists()


def test_real_config_models_are_sized_without_any_download():
    """The real-model config: a GGUF fallback for the target, a draft of its layers, a draft with its tokenizer."""
    from sd2.shapes import model_shape

    cfg = load(ROOT / "config" / "real.yaml")
    target, layers, scratch = "smollm2-135m-instruct", "smollm2-layers6", "smollm2-scratch"
    assert cfg["models"][target]["gguf"]["quantization"] == "Q4_1"
    whole, part = model_shape(target, cfg), model_shape(layers, cfg)
    assert whole.params == 134_515_008 and part.num_hidden_layers == 6
    assert part.params == whole.params - 24 * whole.layer_params
    assert model_shape(scratch, cfg).vocab_size == whole.vocab_size == 49152
