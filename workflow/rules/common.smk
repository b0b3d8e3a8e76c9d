import json
import os
import shlex
import sys

from snakemake.settings.types import DeploymentMethod

from sd2 import memory, methods, variants
from sd2.config import read, validate
from sd2.hub import is_local, job_env
from sd2.report.figures import FIGURES

# Snakemake has parsed the config files already, keeping the last of a key given twice: read
# them again to refuse that. Then an unknown key, wrong type or bad value stops here, before any
# job, and the rules see the defaults.
for _configfile in workflow.configfiles:
    read(_configfile)
config.update(validate(config))

W = config["workdir"]
R = config["results_dir"]
EVAL_SETS = list(config["data"]["eval_sets"])
MODELS = config["models"]
SCRATCH = sorted(name for name, spec in MODELS.items() if "hub" not in spec and "layers_of" not in spec)
# Drafts made of some of another model's layers (layer_subset).
SUBSETS = sorted(name for name, spec in MODELS.items() if "layers_of" in spec)
# Hub models with a GGUF fallback: fetch_model writes them to {W}/hub/<name> from either source.
FETCHED = sorted(name for name, spec in MODELS.items() if "gguf" in spec)
# Hub models that download_model fetches; a `hub:` that is an existing directory is used in place.
DOWNLOADED = sorted(
    name for name, spec in MODELS.items() if "hub" in spec and name not in FETCHED and not is_local(spec["hub"])
)
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
# Every job imports the config's extensions too: they register the methods, losses and heads it runs.
if config["extensions"]:
    PREFIX += f"export {methods.EXTENSIONS_ENV}={shlex.quote(','.join(config['extensions']))}; "
shell.prefix(PREFIX)
NAME = r"[A-Za-z0-9_.-]+"
# A draft variant: a draft-kind method of the registry (sd2.methods), `+<loss>` for a loss other than its own.
VARIANT = variants.variant_pattern(quantized=True)
# The finetune rule's outputs are the tuned variants and their quantization-aware fine-tunings (<variant>@<scheme>-qat).
TUNED_VARIANT = variants.finetuned_pattern()
QUANTIZED_VARIANT = variants.quantized_pattern()
# Variants a config asks for but a pair cannot make (e.g. kl across tokenizer families): said by the
# main process (not again in every job), not an error.
if workflow.is_main_process:
    for _skip in variants.skipped(config):
        print(f"sd2: not made for {_skip['draft']} -> {_skip['target']}: {_skip['method']} with loss {_skip['loss']}: {_skip['reason']}", file=sys.stderr)


# With wandb.mode online, a missing login stops the run once, before any job is submitted, rather
# than failing every tracked job (sd2.tracking checks again in each). Not in a dry run.
onstart:
    if workflow.is_main_process and config["wandb"]["mode"] == "online":
        from sd2.tracking import NO_LOGIN, wandb_logged_in

        if not wandb_logged_in():
            raise ValueError(NO_LOGIN)


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
    """Local checkpoint of a model made here or fetched with its GGUF fallback, or the hub id / path of a real one."""
    if name in SCRATCH or name in SUBSETS:
        return f"{W}/models/{name}"
    return f"{W}/hub/{name}" if name in FETCHED else MODELS[name]["hub"]


def model_input(name):
    """What a job that loads `name` depends on: its checkpoint if made here or fetched, its download if from the hub."""
    if name in SCRATCH or name in SUBSETS or name in FETCHED:
        return [model_path(name)]
    return [f"{W}/hub/{name}.json"] if name in DOWNLOADED else []


def trust(*names):
    """The flag that lets a job run custom model code: only if one of the models it loads asks for it."""
    return "--trust-remote-code" if any(MODELS[n].get("trust_remote_code") for n in names if n in MODELS) else ""


def tokenizer_source(family):
    """The model a from_model tokenizer family is copied from (None for a trained family)."""
    return config["tokenizers"][family].get("model")


def data_path(data):
    """Fine-tuning data: a target's self-distilled answers, or the original responses."""
    return f"{W}/data/finetune" if data == "original" else f"{W}/distill/{data}"


def data_dir(target, name):
    """What a tuned method's paths call its data: the target, or 'original' for the original responses."""
    return "original" if methods.BY_NAME[name].data == "original" else target


def start_path(init, draft, data, sparsity):
    """The checkpoint of a start point (sd2.methods.START_POINTS) made from `draft` on `data`."""
    point = methods.start_point(init)
    if point.path is None:
        return model_path(draft)
    return f"{W}/{point.path.format(draft=draft, data=data, sparsity=sparsity)}"


def draft_path(target, draft, variant, sparsity):
    """The checkpoint a (target, draft, variant, sparsity) measurement uses."""
    if variants.split_quantization(variant)[1] != variants.NO_QUANTIZATION:
        # Quantized on the target's self-distilled data, so per target even where the draft is not.
        return f"{W}/quantized/{target}/{draft}/{variant}-s{sparsity}"
    m = methods.method(variants.parse_variant(variant)[0])
    if m.tuned:
        return f"{W}/drafts/{data_dir(target, m.name)}/{draft}/{variant}-s{sparsity}"
    # An untuned draft is its start point, one made from data calibrated on the target's.
    return start_path(m.init, draft, target, sparsity)


def quantize_source(target, draft, variant, sparsity):
    """The checkpoint the quantize rule reads for a quantized variant (the unquantized variant's, or
    for <variant>@<scheme>-qat its quantization-aware fine-tuning, the finetune rule's, under drafts/)."""
    base, scheme = variants.split_quantization(variant)
    if variants.quantization_aware(scheme):
        name = variants.parse_variant(base)[0]
        return f"{W}/drafts/{data_dir(target, name)}/{draft}/{variant}-s{sparsity}"
    return draft_path(target, draft, base, sparsity)


def draft_input(target, draft, variant, sparsity):
    """What a job that loads this draft depends on (the dense draft: its checkpoint or download)."""
    path = draft_path(target, draft, variant, sparsity)
    return model_input(draft) if path == model_path(draft) else [path]


def quantize_input(target, draft, variant, sparsity):
    """The quantize rule's input, quantize_source's checkpoint (the dense draft: its checkpoint or download)."""
    path = quantize_source(target, draft, variant, sparsity)
    return model_input(draft) if path == model_path(draft) else [path]


def draft_variants(target, draft, quantized=False):
    """(variant, sparsity) of the pair's drafts (sd2.variants.variants: methods, losses, sparsity levels;
    `quantized`: each also per scheme of `quantization`)."""
    return [(v.name, v.sparsity) for v in variants.variants(config, target, draft, quantized)]


def record_paths():
    return [
        f"{R}/records/{e}/{t}/{d}/{m}-s{s}.json"
        for e in config["data"]["eval_sets"]
        for t in config["targets"]
        for d in config["drafts"]
        if d != t
        for m, s in draft_variants(t, d, quantized=True)
    ]


def tuned_drafts():
    """Every fine-tuned draft checkpoint of the sweep, labelled for the training table."""
    seen = {}
    for t in config["targets"]:
        for d in config["drafts"]:
            for m, s in draft_variants(t, d):
                name = variants.parse_variant(m)[0]
                if methods.BY_NAME[name].tuned:
                    path = draft_path(t, d, m, s)
                    seen[path] = {"stage": "finetune", "model": d, "target": data_dir(t, name), "draft": d, "method": m, "sparsity": s}
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
    if rule_name in ("self_distill", "target_outputs", "train_head"):
        return {"target": w.target}
    if rule_name == "layer_subset":
        return {"draft": MODELS[w.model]["layers_of"]["model"]}
    if rule_name in ("prune", "layer_prune", "quantize"):
        return {"draft": w.draft}
    if rule_name == "finetune":
        return {"draft": w.draft, "teacher": teacher_model(w)}
    return {"target": w.target, "draft": w.draft}


def drafts_in_parallel(rule_name, w):
    """Whether a finetune or measure job's draft is a parallel one (a loss such as pard)."""
    if rule_name not in ("finetune", "measure"):
        return False
    loss = variants.parse_variant(w.method)[1]
    return bool(loss) and methods.LOSSES[loss].parallel


def job_plan(rule_name, w):
    """The memory plan of one job; a job that needs more GPUs than resources.gpu stops the DAG here."""
    models = job_models(rule_name, w)
    parallel = drafts_in_parallel(rule_name, w)
    key = (rule_name, tuple(models.items()), parallel)
    if key not in PLANS:
        PLANS[key] = memory.plan_job(rule_name, models, config, parallel=parallel)
        memory.check_fits(PLANS[key], config)
    return PLANS[key]


def is_check_cell(w):
    """The measure job of measure.check_every_k's draft: its walks are checked against the loops at every k."""
    cell = config["measure"]["check_every_k"]
    return bool(cell) and (w.draft, w.method, int(w.sparsity)) == (cell["draft"], cell["method"], cell["sparsity"])


def model_resources(rule_name):
    """Slurm resources of a job of `rule_name`: the config's in a CPU run, its memory plan's in a GPU run."""
    res = config["resources"]
    if not GPU_RUN:
        return dict(mem_mb=res["mem_mb"], runtime=memory.runtime_min(rule_name, config), gpu=0)
    return dict(
        mem_mb=lambda wildcards: max(res["mem_mb"], job_plan(rule_name, wildcards).mem_mb),
        runtime=memory.runtime_min(rule_name, config),
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


def finetune_method(w):
    """The registry entry and the loss of a finetune job's variant (the `method` wildcard)."""
    name, loss = variants.parse_variant(w.method)
    return methods.method(name), loss


def finetune_init_path(w):
    """The checkpoint fine-tuning starts from: the method's start point, made on the job's data."""
    return start_path(finetune_method(w)[0].init, w.draft, w.data, w.sparsity)


def finetune_init(w):
    """What finetune_init_path depends on (the dense draft: its checkpoint or download)."""
    path = finetune_init_path(w)
    return model_input(w.draft) if path == model_path(w.draft) else [path]


def finetune_settings(w):
    """config.finetune with the variant's loss (the job reads it as settings["loss"]), for a
    <variant>@<scheme>-qat the scheme its forward is fake-quantised to (settings["quantization_aware"]),
    and for a parallel-drafting loss the config's `parallel` (settings["parallel"])."""
    settings = {**config["finetune"], "loss": finetune_method(w)[1], "chat": config["chat"]}
    if methods.LOSSES[settings["loss"]].parallel:
        settings["parallel"] = config["parallel"]
    scheme = variants.split_quantization(w.method)[1]
    if variants.quantization_aware(scheme):
        settings["quantization_aware"] = variants.base_scheme(scheme)
    return as_arg(settings)


def teacher_model(w):
    """The model whose outputs the variant's loss reads: the target (kl, tvdpp, skd), the dense draft
    itself (squarehead), or None (ce)."""
    role = methods.LOSSES[finetune_method(w)[1]].teacher
    return {"target": w.data, "draft": w.draft}.get(role)


def teacher(w):
    """--teacher for a loss that reads another model's outputs."""
    name = teacher_model(w)
    return f"--teacher {model_path(name)} {trust(name)}" if name else ""


def export_paths():
    """A servable export of every draft checkpoint the sweep makes (a dense hub draft is served from the hub)."""
    return [
        f"{W}/export/{t}/{d}/{m}-s{s}"
        for t in config["targets"]
        for d in config["drafts"]
        if d != t
        for m, s in draft_variants(t, d)
        if draft_path(t, d, m, s) != model_path(d) or d in SCRATCH or d in SUBSETS
    ]


def all_targets():
    model_table = [f"{R}/tables/models.csv"] if SCRATCH else []
    # Exports by default: their weights are hard links to the drafts (no extra disk, even for the
    # paper sweep's 78 drafts of 2.5-6.5 GB in bf16), and servable drafts are what the sweep is for.
    exports = export_paths() if config["export"]["enabled"] else []
    return [f"{R}/data/manifest.json", *model_table, *figure_paths(), *exports]


# Target-dependent draft heads (workflow/rules/heads.smk).
HEADS = config["heads"]
# <family>-<size> of a registered head family (sd2.methods.HEAD_FAMILIES).
HEAD = methods.head_pattern()
HEAD_FAMILY = "|".join(methods.HEAD_FAMILIES)


def head_names():
    return [f"{m}-{size}" for m in HEADS["methods"] for size in HEADS["sizes"][m]]


def head_record_paths():
    """Every head's records on every eval set, target and sparsity (empty when heads.methods is [])."""
    return [
        f"{R}/records/{e}/{t}/{h}/{h.split('-', 1)[0]}-s{s}.json"
        for e in config["data"]["eval_sets"]
        for t in config["targets"]
        for h in head_names()
        for s in [0, *HEADS["sparsities"]]
    ]


def head_size(head):
    method, _, size = head.partition("-")
    if size not in HEADS["sizes"][method]:
        raise ValueError(f"head {head}: no size {size!r} in heads.sizes.{method}")
    return HEADS["sizes"][method][size]


def head_dir(w):
    """The trained head a record of (target, head, method, sparsity) reads; the method must be the head's."""
    if not w.head.startswith(f"{w.method}-"):
        raise ValueError(f"record {w.head}/{w.method}-s{w.sparsity}.json: head {w.head} is not a {w.method} head")
    return f"{W}/heads/{w.target}/{w.head}" + (f"-s{w.sparsity}" if int(w.sparsity) else "")


def head_beams(head):
    """heads.beam_width beams for a family that proposes beams (ReDrafter), else a chain."""
    return HEADS["beam_width"] if methods.head_family(head.partition("-")[0]).beams else 1
