import json
import os
import shlex
import sys

from snakemake.settings.types import DeploymentMethod

from sd2.config import validate
from sd2.plots import FIGURES

# Fills defaults in place; an unknown key, wrong type or bad value stops here, before any job.
validate(config)

W = config["workdir"]
R = config["results_dir"]
MODELS = config["models"]
SCRATCH = sorted(name for name, spec in MODELS.items() if "hub" not in spec)
# Every job runs `python -m sd2` (passed on as params.sd2, so the command text is the same
# wherever the repository and its virtualenv live: a moved checkout reruns nothing). Under
# `--sdm conda` the job's environment (workflow/envs/sd2.yaml) provides `python`; otherwise the
# interpreter that runs Snakemake does (the project's virtualenv), put first on PATH.
SD2 = "python -m sd2"
if DeploymentMethod.CONDA not in getattr(workflow.deployment_settings, "deployment_method", ()):
    shell.prefix(f"export PATH={shlex.quote(os.path.dirname(sys.executable))}:\"$PATH\"; ")
SPARSE_METHODS = ["layer_pruned", "sd2", "sparse_sft", "sparse_oneshot"]
TUNED_METHODS = ["dense_sd", "layer_pruned", "sd2", "sparse_sft"]
NAME = r"[A-Za-z0-9_.-]+"
# Only what the target's continuations depend on (the prompt format included): changing
# n_assisted must not regenerate them, changing the chat settings must.
TARGET_OUTPUT_SETTINGS = {
    **{key: config["measure"][key] for key in ("max_new_tokens", "n_prompts", "n_check", "warmup_prompts", "batch_size")},
    "chat": config["chat"],
}


wildcard_constraints:
    target=NAME,
    draft=NAME,
    data=NAME,
    eval_set=NAME,
    sparsity=r"\d+",


def as_arg(value):
    """A config value as one shell word of JSON."""
    return shlex.quote(json.dumps(value, sort_keys=True))


def model_path(name):
    """Local checkpoint of a from-scratch model, or the hub id / path of a real one."""
    return f"{W}/models/{name}" if name in SCRATCH else MODELS[name]["hub"]


def model_input(name):
    """What a job that loads `name` depends on (nothing to build for a hub model)."""
    return [f"{W}/models/{name}"] if name in SCRATCH else []


def trust(*names):
    """The flag that lets a job run custom model code: only if one of the models it loads asks for it."""
    return "--trust-remote-code" if any(MODELS[n].get("trust_remote_code") for n in names if n in MODELS) else ""


def data_path(data):
    """Fine-tuning data: a target's self-distilled answers, or the original responses."""
    return f"{W}/data/finetune" if data == "original" else f"{W}/distill/{data}"


def draft_path(target, draft, method, sparsity):
    """The checkpoint a (target, draft, method, sparsity) measurement uses."""
    if method == "dense":
        return model_path(draft)
    if method == "sparse_oneshot":
        return f"{W}/pruned/{target}/{draft}/s{sparsity}"
    data = "original" if method == "sparse_sft" else target
    return f"{W}/drafts/{data}/{draft}/{method}-s{sparsity}"


def draft_variants():
    """(method, sparsity) pairs of the sweep: dense methods at 0, the others at every level."""
    for method in config["methods"]:
        if method in SPARSE_METHODS:
            yield from ((method, s) for s in config["sparsities"])
        else:
            yield method, 0


def record_paths():
    return [
        f"{R}/records/{e}/{t}/{d}/{m}-s{s}.json"
        for e in config["data"]["eval_sets"]
        for t in config["targets"]
        for d in config["drafts"]
        if d != t
        for m, s in draft_variants()
    ]


def tuned_drafts():
    """Every fine-tuned draft checkpoint of the sweep, labelled for the training table."""
    seen = {}
    for t in config["targets"]:
        for d in config["drafts"]:
            for m, s in draft_variants():
                if m in TUNED_METHODS:
                    path = draft_path(t, d, m, s)
                    seen[path] = {"stage": "finetune", "model": d, "target": "original" if m == "sparse_sft" else t, "draft": d, "method": m, "sparsity": s}
    return seen


def model_resources():
    res = config["resources"]
    return dict(mem_mb=res["mem_mb"], runtime=res["runtime_min"], gpu=res["gpu"])


def wandb_arg():
    return as_arg({**config["wandb"], "dir": f"{W}/wandb", "group": config["run_name"]})


def figure_paths():
    return [f"{R}/figures/{name}.{ext}" for name in FIGURES for ext in ("png", "pdf")]


def training_curves():
    curves = {f"{W}/models/{m}": {"stage": "pretrain", "model": m} for m in SCRATCH}
    curves.update(tuned_drafts())
    return curves


def finetune_init(w):
    if w.method == "dense_sd":
        return model_input(w.draft)
    if w.method == "layer_pruned":
        return [f"{W}/layer_pruned/{w.draft}/s{w.sparsity}"]
    return [f"{W}/pruned/{w.data}/{w.draft}/s{w.sparsity}"]


def finetune_init_path(w):
    return finetune_init(w)[0] if finetune_init(w) else model_path(w.draft)


def teacher(w):
    """Distillation losses other than cross-entropy need the target's logits."""
    if config["finetune"]["loss"] == "ce" or w.data == "original":
        return ""
    return f"--teacher {model_path(w.data)} {trust(w.data)}"


def all_targets():
    model_table = [f"{R}/tables/models.csv"] if SCRATCH else []
    return [f"{R}/data/manifest.json", *model_table, *figure_paths()]

