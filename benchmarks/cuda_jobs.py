"""Every job of a config's DAG, run one by one on this machine's GPU: which jobs use it, how long, how much memory.

For a GPU machine without Snakemake installed: the jobs' shell commands come from a dry
run made elsewhere (`snakemake -n -p --cores 1 --configfile CONFIG > dry.txt`), which
prints them in an order that respects their dependencies. Each command runs as printed,
from the repository root; nvidia-smi is sampled while it runs. Writes one row per job:
rule, exit status, seconds, peak GPU memory in use (MiB, above what was in use before),
and the tail of the job's log when it failed.

    python benchmarks/cuda_jobs.py dry.txt --out cuda_jobs.csv
"""

import argparse
import csv
import re
import shlex
import subprocess
import threading
import time
from pathlib import Path


def gpu_memory_mib() -> int:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True
    ).stdout
    return sum(int(x) for x in out.split())


def commands(dry_run: str) -> list[tuple[str, str]]:
    """(rule, shell command) of every job, in the dry run's order."""
    jobs, rule = [], None
    for line in dry_run.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            rule = m[1]
        elif line.startswith("Shell command: ") and rule and line != "Shell command: None":
            jobs.append((rule, line.removeprefix("Shell command: ")))
    return jobs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dry_run", help="the output of `snakemake -n -p --cores 1 --configfile CONFIG`")
    parser.add_argument("--out", required=True, help="CSV, one row per job")
    parser.add_argument("--python", default="python", help="interpreter for the jobs' `python -m sd2`")
    args = parser.parse_args()
    base = gpu_memory_mib()
    out = open(args.out, "w", newline="")  # a row per job as it ends: a run cut short keeps what it measured
    writer = csv.DictWriter(out, fieldnames=["rule", "status", "seconds", "peak_gpu_mib", "log", "failure"])
    writer.writeheader()
    for rule, cmd in commands(Path(args.dry_run).read_text()):
        cmd = re.sub(r"^python ", f"{args.python} ", cmd)
        log = re.search(r"> (\S+) 2>&1$", cmd)
        for path in shlex.split(cmd):
            if path.startswith(("logs/", "work/", "results/")):
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        peak, done = [base], threading.Event()

        def sample(peak=peak, done=done):
            while not done.wait(0.1):
                peak[0] = max(peak[0], gpu_memory_mib())

        sampler = threading.Thread(target=sample)
        sampler.start()
        tick = time.perf_counter()
        status = subprocess.run(cmd, shell=True).returncode
        seconds = time.perf_counter() - tick
        done.set()
        sampler.join()
        tail = ""
        if status and log and Path(log[1]).exists():
            tail = " | ".join(Path(log[1]).read_text(errors="replace").splitlines()[-4:])[-600:]
        writer.writerow(
            {
                "rule": rule,
                "status": status,
                "seconds": round(seconds, 1),
                "peak_gpu_mib": peak[0] - base,
                "log": log[1] if log else "",
                "failure": tail,
            }
        )
        out.flush()
        print(f"{rule:16s} status {status} {seconds:7.1f} s  GPU +{peak[0] - base} MiB", flush=True)
    out.close()


if __name__ == "__main__":
    main()
