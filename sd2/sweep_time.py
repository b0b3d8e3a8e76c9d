"""How long the sweep takes here: a throughput probe before `make run`, the run time after it.

The probe times a few training steps of every from-scratch model, in the precision its
pretraining will use, and multiplies by the steps its budget asks for. The rest of the
sweep (distillation, pruning, fine-tuning, measurement) is estimated by scaling the last
recorded run of the same config by the ratio of the two machines' probe times.
"""

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from sd2.checkpoint import write_json
from sd2.models import build_model, count_parameters
from sd2.precision import native_bf16, precision_name, resolve_bf16
from sd2.provenance import provenance
from sd2.shapes import model_shape


def config_digest(config: dict) -> str:
    """sha256 of the validated config (defaults filled), to tell whether a record applies."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "native_bf16": native_bf16("cpu"),
        "torch_threads": torch.get_num_threads(),
    }


class _Vocabulary:
    """Stands in for a tokenizer where only the vocabulary size matters (random token ids)."""

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 1

    def __init__(self, size: int):
        self.size = size

    def __len__(self):
        return self.size


def step_seconds(spec: dict, vocab_size: int, bf16: bool, steps: int = 2, seed: int = 0) -> float:
    """Seconds per pretraining step (forward, backward, AdamW) of `spec`, after one warm-up step."""
    train = spec["train"]
    model = build_model(spec, _Vocabulary(vocab_size), seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(
        0, vocab_size, (train["batch_size"], train["seq_len"]), generator=torch.Generator().manual_seed(seed)
    )
    times = []
    for _ in range(steps + 1):
        tick = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - tick)
    return sum(times[1:]) / steps


# Below this share of its threads' time the probe was competing with other work: its times are too long.
BUSY_CPU_SHARE = 0.75


def probe(config: dict) -> dict:
    """Per from-scratch model: parameters, precision, seconds per step, and its pretraining estimate; and
    cpu_share, the CPU time the probe got over its wall time on all its threads (near 1 on an idle machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    models = {}
    for name, spec in config["models"].items():
        if "hub" in spec or "layers_of" in spec:
            continue
        train = spec["train"]
        bf16, _ = resolve_bf16(train["bf16"], "cpu")
        vocab = model_shape(name, config).vocab_size
        if not models:
            # The process's first training steps also pay one-time costs (thread pools, kernel choice): without
            # a throwaway step, the first model measured came out up to 3x slower than an identical second one.
            step_seconds(spec, vocab, bf16, steps=1)
        seconds = step_seconds(spec, vocab, bf16)
        steps = max(1, train["tokens"] // (train["batch_size"] * train["seq_len"]))
        models[name] = {
            "parameters": count_parameters(build_model(spec, _Vocabulary(vocab), 0)),
            "precision": precision_name(bf16),
            "step_seconds": round(seconds, 3),
            "tokens_per_s": round(train["batch_size"] * train["seq_len"] / seconds, 1),
            "steps": steps,
            "pretrain_seconds": round(steps * seconds),
        }
    share = (time.process_time() - cpu) / ((time.perf_counter() - wall) * torch.get_num_threads())
    return {
        "machine": machine(),
        "models": models,
        "pretrain_seconds": sum(m["pretrain_seconds"] for m in models.values()),
        "cpu_share": round(share, 2),
    }


def estimate(config: dict, previous: dict | None) -> dict:
    """The probe, plus a whole-sweep estimate scaled from a recorded run (flagged when its config differs)."""
    found = probe(config)
    found["config_digest"] = config_digest(config)
    found["sweep_seconds"] = None
    if previous and previous["probe"]["pretrain_seconds"]:
        speed = found["pretrain_seconds"] / previous["probe"]["pretrain_seconds"]
        found["sweep_seconds"] = round(previous["seconds"] * speed)
        found["scaled_from"] = {
            "seconds": previous["seconds"],
            "cpu": previous["machine"]["cpu"],
            "slowdown": round(speed, 2),
            "same_config": previous.get("config_digest") == found["config_digest"],
        }
    return found


def describe(found: dict) -> str:
    lines = [
        f"Throughput probe on {found['machine']['cpu']} ({found['machine']['cores']} cores, "
        f"native bf16: {'yes' if found['machine']['native_bf16'] else 'no'}):"
    ]
    for name, m in found["models"].items():
        lines.append(
            f"  {name}: {m['parameters'] / 1e6:.2f}M parameters, {m['precision']}, {m['tokens_per_s']:,.0f} tokens/s"
            f" -> pretraining ~{m['pretrain_seconds'] / 60:.0f} min ({m['steps']} steps)"
        )
    lines.append(f"Pretraining alone: ~{found['pretrain_seconds'] / 60:.0f} min.")
    share = found.get("cpu_share")
    if share is not None and share < BUSY_CPU_SHARE:
        lines.append(
            f"This machine is busy: the probe got {share:.0%} of its threads' time, so these times are too long "
            "by about as much, and a run now would be slowed the same way."
        )
    if found["sweep_seconds"] is not None:
        ref = found["scaled_from"]
        which = (
            "this config" if ref["same_config"] else "another config (this one has changed since: a rough guide only)"
        )
        lines.append(
            f"Whole sweep: ~{found['sweep_seconds'] / 60:.0f} min (the recorded run of {which} took "
            f"{ref['seconds'] / 60:.0f} min on {ref['cpu']}; this machine probes {ref['slowdown']}x its time)."
        )
    else:
        lines.append("Whole sweep: not estimated (no recorded run to scale from).")
    return "\n".join(lines)


def record(seconds: int, found: dict, out, invocations: int = 1) -> dict:
    """The run-time record of a `make run` that built everything from nothing (over `invocations` if it was resumed)."""
    rec = {
        "seconds": seconds,
        "invocations": invocations,
        "machine": found["machine"],
        "config_digest": found["config_digest"],
        "probe": {k: found.get(k) for k in ("models", "pretrain_seconds", "cpu_share")},
        "estimated_seconds": found["sweep_seconds"],
        "provenance": provenance(),
    }
    write_json(out, rec)
    return rec


def job_times(benchmark_dir, since: float | None = None) -> pd.DataFrame:
    """One row per job from Snakemake's benchmark files: rule, job (its wildcards' path), wall seconds, peak RSS.

    `since` (a time.time()): only the jobs whose benchmark file was written after it.
    """

    rows = []
    root = Path(benchmark_dir)
    for tsv in sorted(root.rglob("*.tsv")):
        if since is not None and tsv.stat().st_mtime < since:
            continue
        table = pd.read_csv(tsv, sep="\t")
        rel = tsv.relative_to(root).with_suffix("")
        rows.append(
            {
                "rule": rel.parts[0],
                "job": "/".join(rel.parts[1:]),
                "seconds": float(table["s"].iloc[-1]),
                "max_rss_mb": float(table["max_rss"].iloc[-1]) if "max_rss" in table else float("nan"),
            }
        )
    return pd.DataFrame(rows, columns=["rule", "job", "seconds", "max_rss_mb"])


def _on_top_marker(results: Path) -> tuple[Path, dict | None]:
    """(the marker path, the timing state of this config's run; None where an untimed earlier invocation was cut).

    A marker written when none of this config's records exist yet adds up the wall time of every
    invocation until one completes; records without it mean an untimed earlier invocation was cut.
    """
    marker = results / ".on-top-run.json"
    if marker.exists():
        return marker, json.loads(marker.read_text())
    if not any((results / "records").rglob("*.json")):
        state = {"seconds": 0, "invocations": 0, "since": time.time()}
        write_json(marker, state)
        return marker, state
    return marker, None


def _snakemake_on_top(config_path, cores: int) -> int:
    """Snakemake on the tables and figures of `config_path`, reusing what exists (`--rerun-triggers mtime`)."""
    import subprocess
    import sys

    # The tables and figures, not `all`: its data manifest and model table belong to the default
    # run, and making them here would prepare the data again and so rebuild everything after it.
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "collect",
        "figures",
        "--rerun-triggers",
        "mtime",
        "--cores",
        str(cores),
    ]
    return subprocess.run([*command, "--configfile", str(config_path)]).returncode


def run_on_top(config_path, *, cores: int) -> int:
    """A second config that shares the default run's workdir (config/families.yaml): run only its own jobs.

    The default run's checkpoints, self-distilled data and target continuations are reused as they
    are (`--rerun-triggers mtime`: a later change of code or settings elsewhere does not rebuild them),
    and the wall time of the invocations that made this config's results (added up over cut ones),
    with the jobs they ran, is recorded in <results_dir>/run_time.json and <results_dir>/tables/job_times.csv.
    """
    from sd2.config import load

    config = load(config_path)
    work, results = Path(config["workdir"]), Path(config["results_dir"])
    if not (work / "data").is_dir():
        raise SystemExit(
            f"{config_path} runs on top of the default run, but {work}/data does not exist: run `make run` first"
        )
    marker, state = _on_top_marker(results)
    # Resuming over a completed record (the config gained jobs since): that record is kept inside the new one.
    record_path = results / "run_time.json"
    earlier = json.loads(record_path.read_text()) if state is None and record_path.exists() else None
    # Under `--rerun-triggers mtime` Snakemake takes an existing measurements table as up to date even
    # where the config has gained records it lacks (a resumed or extended run): remove it, so that
    # collect runs and its missing records are planned. It is rebuilt from the records.
    (results / "tables" / "measurements.csv").unlink(missing_ok=True)
    start_wall, start = time.time(), time.monotonic()
    try:
        status = _snakemake_on_top(config_path, cores)
    finally:
        if state is not None:
            state["seconds"] += round(time.monotonic() - start)
            state["invocations"] += 1
            write_json(marker, state)
    if status == 0:
        seconds = state["seconds"] if state else round(time.monotonic() - start)
        jobs = job_times("logs/benchmarks", since=state["since"] if state else start_wall)
        if earlier and not len(jobs):
            print(f"{config_path}: nothing to run; {record_path} kept")
            return status
        _record_on_top(config_path, config, cores, state, seconds, jobs, earlier, record_path)
        marker.unlink(missing_ok=True)
        print(f"{config_path}: {seconds} s on top of {work}/ ({len(jobs)} jobs) -> {record_path}")
    return status


def _record_on_top(config_path, config: dict, cores: int, state, seconds: int, jobs, earlier, record_path) -> None:
    """The job table and run-time record of a completed run on top of the default run."""
    from sd2.report.collect import write_table

    write_table(jobs, Path(config["results_dir"]) / "tables" / "job_times.csv")
    write_json(
        record_path,
        {
            "seconds": seconds,
            "invocations": state["invocations"] if state else 1,
            "whole_config": state is not None,
            "on_top_of": str(Path(config["workdir"])),
            "jobs": len(jobs),
            "job_seconds": round(float(jobs["seconds"].sum())),
            "machine": machine(),
            "config_digest": config_digest(config),
            "provenance": provenance(settings={"config": str(config_path), "cores": cores}),
            "earlier": earlier,
        },
    )


def _prepare_from_nothing(base: list[str], work: Path, results: Path, marker: Path, found: dict) -> None:
    """Without work/, delete the sweep's outputs and start the marker that times a run from nothing."""
    import subprocess

    if not work.exists():
        print(
            f"make run: no {work}/ here, so {results}/ is not from this machine's models: rebuilding it from nothing",
            flush=True,
        )
        subprocess.run([*base, "--delete-all-output", "--cores", "1", "--quiet", "all"], check=True)
        work.mkdir(parents=True)
        write_json(marker, {"seconds": 0, "invocations": 0, "estimate": found, "started": time.time()})
    elif marker.exists():
        print(f"make run: resuming a run from nothing ({marker}); its wall time keeps adding up", flush=True)
    else:
        print(
            f"make run: {work}/ exists: running what is out of date "
            "(only a run from nothing records its time; make clean first)",
            flush=True,
        )


def _timed_snakemake(base: list[str], cores: int, marker: Path) -> int:
    """Snakemake's exit status; its wall time is added to the marker's (a SIGTERM included)."""
    import signal
    import subprocess

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous_handler = signal.signal(signal.SIGTERM, stop)
    start, status = time.monotonic(), 1
    try:
        status = subprocess.run([*base, "--cores", str(cores)]).returncode
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if marker.exists():
            state = json.loads(marker.read_text())
            state["seconds"] += round(time.monotonic() - start)
            state["invocations"] += 1
            write_json(marker, state)
    return status


def run_sweep(config_path, *, cores: int) -> int:
    """`make run`: probe, start from nothing where work/ is missing, run Snakemake, record the time.

    Without work/ (a fresh clone) the committed results came from another machine's
    models and Snakemake would keep them (they are newer than their missing inputs), so
    the sweep's outputs are deleted first and everything is rebuilt. Such a run from
    nothing leaves a marker in work/ that adds up the wall time of every invocation
    until the sweep completes (a killed run resumes), and only then writes the run-time
    record. Returns Snakemake's exit status.
    """
    import sys

    from sd2.config import load
    from sd2.report.collect import write_table

    config = load(config_path)
    work, results = Path(config["workdir"]), Path(config["results_dir"])
    record_path = results / "run_time.json"
    previous = json.loads(record_path.read_text()) if record_path.exists() else None
    found = estimate(config, previous)
    print(describe(found), flush=True)
    marker = work / ".run-from-nothing.json"
    base = [sys.executable, "-m", "snakemake", "--configfile", str(config_path)]
    _prepare_from_nothing(base, work, results, marker, found)
    status = _timed_snakemake(base, cores, marker)
    if status == 0:
        state = json.loads(marker.read_text()) if marker.exists() else {}
        # Only this run's jobs: logs/benchmarks is shared by every config run from this checkout.
        write_table(job_times("logs/benchmarks", since=state.get("started")), results / "tables" / "job_times.csv")
        if state:
            # The first invocation's probe; the config is the one that completed the sweep.
            rec = record(
                state["seconds"],
                {**state["estimate"], "config_digest": found["config_digest"]},
                record_path,
                invocations=state["invocations"],
            )
            marker.unlink()
            print(
                f"make run: {rec['seconds']} s on {rec['machine']['cpu']} "
                f"({state['invocations']} invocation(s)) -> {record_path}"
            )
    return status
