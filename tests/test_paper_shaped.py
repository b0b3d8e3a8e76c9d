"""config/paper.yaml's rules end to end through Snakemake, on tiny stand-ins with the real formats.

The config is the shipped paper config with only what a CPU test cannot have changed: the hub
ids of the models and datasets point to local directories in the hub's own layouts (tiny
random Llama-3.1-style and Qwen2.5-style Instruct checkpoints with chat templates, bf16
config.json and the generation_config.json the real ones ship; UltraChat `messages`, GSM8K
with its configs); the 70B target, the 3B draft, the eval sets other than GSM8K and the
methods whose rules the tiny test config already runs are left out; and the sizes (prompts,
tokens, steps) are cut. Everything else (chat templates, dtypes, micro-batches, gradient
checkpointing, exports) runs as the paper run would.
"""

import json

import pandas as pd
import pytest
import yaml
from conftest import REPO, snakemake_cmd
from hub_layouts import write_all
from safetensors import safe_open

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TARGETS = ["llama-3.1-8b-instruct", "qwen2.5-7b-instruct"]
DRAFT = "llama-3.2-1b-instruct"
METHODS = ["sd2", "sparse_sft"]


def paper_shaped_config(root, models: dict) -> dict:
    cfg = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    datasets = write_all(root / "datasets")
    data = cfg["data"]
    data["finetune"]["dataset"] = str(datasets[data["finetune"]["dataset"]])
    # GSM8K only (a hub set with a config): HumanEval's source is the tiny test config's too, and
    # MT-Bench's turn list goes through the same field specs in tests/test_data.py.
    data["eval_sets"] = {"gsm8k": data["eval_sets"]["gsm8k"]}
    for spec in data["eval_sets"].values():
        spec["dataset"] = str(datasets[spec["dataset"]])
    data.update(max_files=12, max_finetune_prompts=8)
    for name, path in models.items():
        cfg["models"][name] = {"hub": str(path)}  # a local checkpoint: sized from its config.json
    cfg["models"] = {name: cfg["models"][name] for name in models}
    cfg.update(
        targets=TARGETS,
        drafts=[DRAFT],
        methods=METHODS,
        sparsities=[50],
        wandb={"mode": "disabled"},
        hub={**cfg.get("hub", {}), "cache_dir": str(root / "hf_cache")},
        resources={**cfg["resources"], "gpu": 0, "threads": 1, "mem_mb": 2000, "runtime_min": 20},
    )
    cfg["distill"].update(max_new_tokens=12, batch_size=4)
    cfg["prune"].update(calibration_samples=4, calibration_seq_len=64)
    cfg["finetune"].update(batch_size=4, micro_batch_size=2, seq_len=96, max_steps=2, eval_every=1)
    cfg["measure"].update(
        k_max=3,
        k=[2],
        temperatures=[0.0],
        max_new_tokens=8,
        n_check=1,
        n_assisted=1,
        batch_size=2,
        bootstrap=1000,
        tree_budgets=[2],
    )
    # paper.yaml's heads and trees, one small size each and a few steps: the code path on the real formats.
    cfg["heads"] = {
        **cfg["heads"],
        "sizes": {"redrafter": {"small": {"layers": 1}}, "moa": {"small": {"layers": 1, "width": 0.25}}},
        "train": {"steps": 2, "batch_size": 2, "seq_len": 64, "warmup": 1, "log_every": 1},
    }
    return cfg


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, hub_llama_dir, hub_qwen_dir, hub_llama_draft_dir):
    import os
    import subprocess

    root = tmp_path_factory.mktemp("paper_run")
    models = {TARGETS[0]: hub_llama_dir, TARGETS[1]: hub_qwen_dir, DRAFT: hub_llama_draft_dir}
    cfg = paper_shaped_config(root, models)
    (root / "paper-local.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "WANDB_MODE": "disabled", "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"}
    cmd = snakemake_cmd(root, "--cores", "2", configfile=root / "paper-local.yaml")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        logs = "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in sorted((root / "logs").rglob("*.log")))
        pytest.fail(f"snakemake failed:\n{proc.stderr[-5000:]}\n{logs[-20000:]}")
    return root, cfg


def test_every_eval_set_and_target_is_measured(paper_run):
    root, cfg = paper_run
    table = pd.read_csv(root / cfg["results_dir"] / "tables" / "measurements.csv")
    cells = table.groupby(["eval_set", "target", "method"]).size()
    heads = ["redrafter", "moa"]
    assert cfg["heads"]["methods"] == heads
    assert len(cells) == len(cfg["data"]["eval_sets"]) * len(TARGETS) * len(METHODS + heads), cells
    assert (table["mal"] >= 1).all() and table["mal_ci_low"].notna().all()
    chains = table[table["method"].isin(METHODS)]
    assert set(chains[chains["target"] == TARGETS[0]]["estimator"]) == {"teacher_forced_walk", "tree_walk"}
    # The other tokenizer: transformers' and vLLM's rules, each walked on every prompt.
    other = chains[chains["target"] == TARGETS[1]]
    assert set(other["estimator"]) == {"uag_walk", "tli_walk"}
    prompts = chains[chains["estimator"] == "teacher_forced_walk"].groupby("eval_set")["n_prompts"].max()
    assert (other["n_prompts"] == other["eval_set"].map(prompts)).all()
    # A head is fed its own target's states, so every target gets them, whatever its tokenizer.
    head_rows = table[table["method"].isin(heads)]
    assert set(head_rows["estimator"]) == {"rollout_walk"} and set(head_rows["target"]) == set(TARGETS)
    # The decoding loop replayed its n_check prompt: agreed, or a float near-tie said why not.
    checked = head_rows[head_rows["headline_k"]]
    assert len(checked) and (checked[["checked_prompts", "target_near_ties", "draft_near_ties"]].sum(axis=1) == 1).all()


def test_real_dataset_layouts_and_decontamination(paper_run):
    root, cfg = paper_run
    manifest = json.loads((root / cfg["results_dir"] / "data" / "manifest.json").read_text())
    assert manifest["eval_sets"] == {"gsm8k": 4}  # every row of the stand-in
    assert manifest["finetune_prompts"] > 0
    # the UltraChat stand-in quotes a GSM8K test question (hub_layouts.py): dropped before fine-tuning
    assert manifest["removed_for_eval_overlap"]["finetune"]["count"] >= 1


def test_targets_answer_in_their_chat_format(paper_run):
    from datasets import load_from_disk

    root, cfg = paper_run
    llama = load_from_disk(str(root / cfg["workdir"] / "distill" / TARGETS[0]))
    qwen = load_from_disk(str(root / cfg["workdir"] / "distill" / TARGETS[1]))
    assert all(p.startswith("<|begin_of_text|><|start_header_id|>system") for p in llama["target_prompt"])
    assert all("Today Date: 26 Jul 2024" in p for p in llama["target_prompt"])
    assert all(p.startswith("<|im_start|>system\nYou are Qwen") for p in qwen["target_prompt"])
    settings = json.loads((root / cfg["workdir"] / "distill" / TARGETS[0] / "settings.json").read_text())
    assert settings["settings"]["chat"]["applied"] and settings["settings"]["chat"]["date_string"] == "26 Jul 2024"
    outputs = json.loads((root / cfg["workdir"] / "target_outputs" / TARGETS[1] / "gsm8k.json").read_text())
    assert outputs["provenance"]["settings"]["chat"]["applied"]


def test_drafts_keep_the_hub_dtype_and_export_for_vllm(paper_run):
    root, cfg = paper_run
    tuned = root / cfg["workdir"] / "drafts" / TARGETS[0] / DRAFT / "sd2-s50"
    assert json.loads((tuned / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tuned / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {__import__("torch").bfloat16}
    memory = json.loads((tuned / "provenance.json").read_text())["memory"]
    assert memory["micro_batch_size"] == 2 and memory["gradient_checkpointing"]
    for target, heterogeneous in ((TARGETS[0], False), (TARGETS[1], True)):
        meta = json.loads(
            (root / cfg["workdir"] / "export" / target / DRAFT / "sd2-s50" / "sd2_draft.json").read_text()
        )
        assert meta["vllm"]["speculative_config"]["method"] == "draft_model"
        assert meta["vllm"]["speculative_config"].get("use_heterogeneous_vocab", False) == heterogeneous
