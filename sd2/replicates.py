"""`make replicates`: the default sweep retrained with other seeds (config/replicates.yaml).

Each replicate is the base config with its seed, its own workdir and results, run on top of the
default run's prepared data (and, for the `finetune` kind, its pretrained models, self-distilled
answers and target continuations), hard-linked into the replicate's workdir with their times kept
so that Snakemake (`--rerun-triggers mtime`, as for every run on top) takes them as made. What the
replicates say is in sd2.report.replicates (`make replicates` writes its table after the runs).
"""

import os
import shutil
from pathlib import Path

import yaml

from sd2 import config
from sd2.errors import ConfigError

# What a replicate of each kind takes from the default run's workdir, in the order the sweep makes it.
KINDS = {
    "full": ("data", "tokenizers"),
    "finetune": ("data", "tokenizers", "models", "distill", "target_outputs"),
}
STUDY_KEYS = {"base", "seeds", "kinds", "methods", "results_dir"}


def read_study(path) -> dict:
    """config/replicates.yaml, checked: every key known, seeds other than the base run's, known kinds."""
    study = config.read(path)
    unknown = set(study) - STUDY_KEYS
    missing = STUDY_KEYS - set(study)
    if unknown or missing:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    base_seed = config.load(study["base"])["seed"]
    seeds = study["seeds"]
    if not seeds or any(not isinstance(s, int) or s == base_seed for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(
            f"{path}: seeds must be distinct integers other than the base run's seed {base_seed}: {seeds}"
        )
    bad = [k for k in study["kinds"] if k not in KINDS]
    if bad or not study["kinds"]:
        raise ConfigError(f"{path}: kinds must be some of {sorted(KINDS)}, not {study['kinds']}")
    return study


def name(kind: str, seed: int) -> str:
    return f"{kind}-seed{seed}"


def replicate_config(study: dict, kind: str, seed: int) -> dict:
    """The base config as one replicate runs it: its seed, workdir and results, the compared methods, greedy."""
    cfg = config.read(study["base"])
    base = config.load(study["base"])
    label = name(kind, seed)
    cfg.update(
        seed=seed,
        run_name=f"{base['run_name']}-{label}",
        workdir=str(Path(base["workdir"]) / "replicates" / label),
        results_dir=str(Path(study["results_dir"]) / label),
        methods=list(study["methods"]),
    )
    measure = dict(cfg.get("measure") or {})
    measure.update(temperatures=[0.0], check_every_k=None)
    cfg["measure"] = measure
    config.validate(yaml.safe_load(yaml.safe_dump(cfg)))
    return cfg


def link_default_run(base: dict, cfg: dict, kind: str) -> list[str]:
    """Hard-link what a replicate of `kind` takes from the default run (config `base`) into its workdir and
    results (the data manifest), times kept."""
    manifest = Path(base["results_dir"]) / "data" / "manifest.json"
    copy = Path(cfg["results_dir"]) / "data" / "manifest.json"
    if manifest.exists() and not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(manifest, copy)
    base_work, work, linked = Path(base["workdir"]), Path(cfg["workdir"]), []
    for part in KINDS[kind]:
        source, target = base_work / part, work / part
        if not source.exists():
            raise SystemExit(f"the replicate study runs on top of `make run`, but {source} does not exist")
        if not target.exists():
            work.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source, target, copy_function=os.link)
        linked.append(part)
    return linked


def run(study_path, *, cores: int) -> int:
    """Every replicate of the study in turn (a finished one is kept)."""
    from sd2.sweep_time import run_on_top

    study = read_study(study_path)
    base = config.load(study["base"])
    for kind in study["kinds"]:
        for seed in study["seeds"]:
            cfg = replicate_config(study, kind, seed)
            link_default_run(base, cfg, kind)
            path = Path(cfg["workdir"]) / "config.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            print(f"replicate {name(kind, seed)}: {path}", flush=True)
            status = run_on_top(path, cores=cores)
            if status:
                return status
    return 0
