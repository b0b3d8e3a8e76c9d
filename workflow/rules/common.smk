import json
import os
import shlex
import sys

from snakemake.settings.types import DeploymentMethod

from sd2 import memory
from sd2.config import validate
from sd2.hub import is_local, job_env
from sd2.plots import FIGURES

# Fills defaults in place; an unknown key, wrong type or bad value stops here, before any job.
validate(config)

W = config["workdir"]
R = config["results_dir"]
MODELS = config["models"]
SCRATCH = sorted(name for name, spec in MODELS.items() if "hub" not in spec)
# Hub models that download_model fetches; a `hub:` that is an existing directory is used in place.
DOWNLOADED = sorted(name for name, spec in MODELS.items() if "hub" in spec and not is_local(spec["hub"]))
# Every job runs `python -m sd2` (passed on as params.sd2, so the command text is the same
# wherever the repository and its virtualenv live: a moved checkout reruns nothing). Under
# `--sdm conda` the job's environment (workflow/envs/sd2.yaml) provides `python`; otherwise the
# interpreter that runs Snakemake does (the project's virtualenv), put first on PATH.
SD2 = "python -m sd2"
# Every job also sees the configured hub cache and, with hub.offline_jobs, runs offline: the models
# it loads were fetched by download_model (the rules that need the network turn it back on).
PREFIX = "".join(f"export {k}={shlex.quote(v)}; " for k, v in job_env(config["hub"]).items())
if DeploymentMethod.CONDA not in getattr(workflow.deployment_settings, "deployment_method", ()):
    PREFIX += f"export PATH={shlex.quote(os.path.dirname(sys.executable))}:\"$PATH\"; "
shell.prefix(PREFIX)
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
    """What a job that loads `name` depends on: its checkpoint if trained here, its download if from the hub."""
    if name in SCRATCH:
        return [f"{W}/models/{name}"]
    return [f"{W}/hub/{name}.json"] if name in DOWNLOADED else []


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


# resources.gpu > 0: every model job is sized by its memory plan (sd2.memory); 0: a CPU run.
GPU_RUN = config["resources"]["gpu"] > 0
PLANS = {}


def job_models(rule_name, w):
    """The models a job of `rule_name` loads, by role (None: not loaded)."""
    if rule_name == "pretrain":
        return {"model": w.model}
    if rule_name == "model_report":
        return {f"model{i}": m for i, m in enumerate(SCRATCH)}
    if rule_name in ("self_distill", "target_outputs"):
        return {"target": w.target}
    if rule_name in ("prune", "layer_prune"):
        return {"draft": w.draft}
    if rule_name == "finetune":
        return {"draft": w.draft, "teacher": w.data if teacher(w) else None}
    return {"target": w.target, "draft": w.draft}


def job_plan(rule_name, w):
    """The memory plan of one job; a job that needs more GPUs than resources.gpu stops the DAG here."""
    models = job_models(rule_name, w)
    key = (rule_name, tuple(models.items()))
    if key not in PLANS:
        PLANS[key] = memory.plan_job(rule_name, models, config)
        memory.check_fits(PLANS[key], config)
    return PLANS[key]


def model_resources(rule_name):
    """Slurm resources of a job of `rule_name`: the config's in a CPU run, its memory plan's in a GPU run."""
    res = config["resources"]
    if not GPU_RUN:
        return dict(mem_mb=res["mem_mb"], runtime=res["runtime_min"], gpu=0)
    return dict(
        mem_mb=lambda wildcards: max(res["mem_mb"], job_plan(rule_name, wildcards).mem_mb),
        runtime=res["runtime_min"],
        gpu=lambda wildcards: job_plan(rule_name, wildcards).gpus,
    )


def model_threads(cpu_run=None):
    """CPU threads of a model job: resources.threads, or `cpu_run` in a CPU run where a rule sets fewer."""
    return config["resources"]["threads"] if GPU_RUN or cpu_run is None else cpu_run


def placement(rule_name, w):
    """--dtype (--draft-dtype for measure's draft) where a model's dtype is not auto; in a GPU run
    --gpus (the job stops at once without CUDA) and --device-map auto for a model spread over them."""
    models = job_models(rule_name, w)
    flags = []
    for role, name in models.items():
        # Fine-tuning always loads fp32 master weights; pretrain and model_report load from-scratch models.
        if role in ("target", "draft") and rule_name != "finetune" and MODELS[name]["dtype"] != "auto":
            flag = "--draft-dtype" if rule_name == "measure" and role == "draft" else "--dtype"
            flags.append(f"{flag} {MODELS[name]['dtype']}")
    if GPU_RUN:
        plan = job_plan(rule_name, w)
        if plan.gpus:
            flags.append(f"--gpus {plan.gpus}")
        if plan.spread.get("target"):
            flags.append("--device-map auto")
    return " ".join(flags)


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


def export_paths():
    """A servable export of every draft checkpoint the sweep makes (a dense hub draft is served from the hub)."""
    return [
        f"{W}/export/{t}/{d}/{m}-s{s}"
        for t in config["targets"]
        for d in config["drafts"]
        if d != t
        for m, s in draft_variants()
        if m != "dense" or d in SCRATCH
    ]


def all_targets():
    model_table = [f"{R}/tables/models.csv"] if SCRATCH else []
    # Exports by default: their weights are hard links to the drafts (no extra disk, even for the
    # paper sweep's 78 drafts of 2.5-6.5 GB in bf16), and servable drafts are what the sweep is for.
    exports = export_paths() if config["export"]["enabled"] else []
    return [f"{R}/data/manifest.json", *model_table, *figure_paths(), *exports]

