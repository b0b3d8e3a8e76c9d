"""The slurm profile on a real single-node Slurm (started here by tests/slurm_cluster.sh).

One workflow run through `snakemake --profile slurm --configfile config/test.yaml`, in two
phases, on a copy of the working tree whose test config keeps one target, one draft and three
of the six methods (every model rule still runs):

1. with `--retries 0`, a model job is cancelled with `scancel` while its `python -m sd2`
   step runs: Snakemake must fail, leave none of that job's outputs, and a dry run must
   list the job again;
2. the same command again, which must finish.

Then: every job the dry run puts on the cluster (everything but the local rules) ran as a
Slurm batch job that COMPLETED, proven by Slurm's own completion log (jobcomp/filetxt,
keyed by job id and working directory) joined with the per-job log the plugin names by
the Slurm job id (its jobstep output names the rule and outputs it ran); the local rules
never went to Slurm; and every row of the results tables is a row of the local run of
the full test config (`tiny_run`, `snakemake --cores 2`), timing columns aside: the
reduced config's jobs are a subset of the full config's, with the same inputs and seeds.

Skipped, loudly (printed, warned and in the skip reason), where it cannot run: not root,
or Slurm cannot be installed. Run it alone with `pytest -m slurm -rs`.
"""

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm_cluster.sh"
CONFIG = "config/test.yaml"
LOCAL_RULES = {"all", "prepare_data", "train_tokenizer", "download_model", "collect", "figures", "export_draft"}
STATE = Path(os.environ.get("SD2_SLURM_DIR", "/var/tmp/sd2-slurm"))
# Columns whose values depend on the machine's speed, not on the computation.
TIMING = re.compile(r"(tokens_per_s|per_second|seconds|speedup|elapsed|wall|_time$|^time)")
RUN_TIMEOUT = 900
REDUCED_METHODS = ("dense", "layer_pruned", "sd2")


def skip_loudly(request, reason: str):
    """Skip, saying why on the terminal (past pytest's capture), in the warnings summary
    (shown by default) and as the skip reason (shown with -rs)."""
    msg = f"SLURM TEST SKIPPED: {reason}"
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n*** {msg} ***", flush=True)
    warnings.warn(msg, stacklevel=2)
    pytest.skip(msg)


def venv_env() -> dict:
    """This interpreter's bin first on PATH: sbatch exports the environment, so the jobs'
    `python -m sd2` and the jobstep's snakemake find the same interpreter."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.prefix) / 'bin'}:{env.get('PATH', '')}"
    env.setdefault("WANDB_MODE", "disabled")
    for key in [k for k in env if k.startswith("SLURM_")]:
        del env[key]
    return env


def snakemake(root: Path, *args, env=None, check=True, popen=False):
    cmd = ["timeout", "-k", "10", str(RUN_TIMEOUT), "snakemake", "--configfile", CONFIG, *args]
    log = open(root / f"snakemake-{int(time.time() * 1000)}.log", "w")
    kwargs = dict(cwd=root, env=env or venv_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    if popen:
        return subprocess.Popen(cmd, **kwargs), Path(log.name)
    proc = subprocess.run(cmd, **kwargs)
    log.close()
    out = Path(log.name).read_text()
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}) in {root}:\n{out[-6000:]}")
    return proc.returncode, out


def copy_tree(dest: Path) -> Path:
    """Tracked and untracked-but-not-ignored files of the working tree, without the test
    config's workdir and results_dir (committed results must not count as done)."""
    cfg = yaml.safe_load((REPO / CONFIG).read_text()) or {}
    skip = tuple(
        f"{cfg.get(key, default).strip('/')}/" for key, default in (("workdir", "work"), ("results_dir", "results"))
    )
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() and not rel.startswith(skip):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def dry_run_jobs(root: Path, *extra) -> list[dict]:
    """Jobs a dry run with the slurm profile would run: rule, local or not, outputs."""
    _, out = snakemake(root, "--profile", "slurm", "-n", *extra)
    jobs, job = [], None
    for line in out.splitlines():
        m = re.match(r"^rule (\w+):$", line)  # a dry run prints local rules as `rule` too
        if m:
            job = {"rule": m[1], "local": m[1] in LOCAL_RULES, "output": ()}
            jobs.append(job)
        elif job is not None and (m := re.match(r"^\s+output: (.*)$", line)):
            job["output"] = tuple(sorted(o.strip() for o in m[1].split(", ")))
    assert jobs, f"dry run listed no jobs:\n{out[-3000:]}"
    return jobs


def jobcomp(workdir: Path) -> dict[str, dict]:
    """Slurm's completion records (slurm_cluster.sh sets JobCompType=jobcomp/filetxt) of jobs run in `workdir`."""
    records = {}
    path = STATE / "jobcomp.log"
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = dict(re.findall(r"(\w+)=(\S*)", line))
        if rec.get("WorkDir") == str(workdir):
            records[rec["JobId"]] = rec
    return records


def slurm_request(rec: dict) -> tuple:
    """(time limit in minutes, CPUs, memory in MB, GPUs) of a jobcomp record."""
    tres = dict(kv.split("=", 1) for kv in rec.get("Tres", "").split(",") if "=" in kv)
    m = re.fullmatch(r"([\d.]+)([KMGT]?)", tres.get("mem", "0M"))
    mem = float(m[1]) * {"K": 1 / 1024, "M": 1, "": 1, "G": 1024, "T": 1024**2}[m[2]]
    return rec.get("TimeLimit"), int(tres.get("cpu", 0)), round(mem), int(tres.get("gres/gpu", 0))


def slurm_job_logs(root: Path) -> dict[str, dict]:
    """The plugin's per-job logs, logs/slurm/rule_<rule>/<wildcards>/<slurm job id>.log,
    with the rule and outputs that the jobstep inside the Slurm job reports."""
    logs = {}
    for path in (root / "logs" / "slurm").rglob("*.log"):
        text = path.read_text(errors="replace")
        rule = re.search(r"^(?:local)?rule (\w+):$", text, re.M)
        output = re.search(r"^\s+output: (.*)$", text, re.M)
        rule_log = re.search(r"^\s+log: (.*)$", text, re.M)
        logs[path.stem] = {
            "dir_rule": path.relative_to(root / "logs" / "slurm").parts[0].removeprefix("rule_"),
            "rule": rule and rule[1],
            "output": tuple(sorted(o.strip() for o in output[1].split(", "))) if output else (),
            "log": [o.strip() for o in rule_log[1].split(", ")] if rule_log else [],
            # the jobstep that srun starts inside the allocation prints `localrule <rule>:`
            # right before it runs the rule's command
            "started": re.search(r"^localrule \w+:$", text, re.M) is not None,
            "path": path,
        }
    return logs


def normalise(df: pd.DataFrame, root: Path) -> pd.DataFrame:
    df = df.drop(columns=[c for c in df.columns if TIMING.search(c)])
    return df.map(lambda v: v.replace(str(root), "<root>") if isinstance(v, str) else v)


@pytest.fixture(scope="module")
def slurm_cluster(request):
    if os.geteuid() != 0:
        skip_loudly(request, "needs root to install and start a single-node Slurm (tests/slurm_cluster.sh)")
    if shutil.which("timeout") is None:
        skip_loudly(request, "needs coreutils `timeout`")
    STATE.parent.mkdir(parents=True, exist_ok=True)
    lock = open(STATE.parent / "sd2-slurm-test.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # one test at a time on this machine's cluster
    try:
        inst = subprocess.run([str(CLUSTER), "install"], capture_output=True, text=True, timeout=600)
        if inst.returncode != 0:
            skip_loudly(request, f"Slurm could not be installed: {inst.stderr.strip()[-500:]}")
        was_running = subprocess.run([str(CLUSTER), "status"], capture_output=True).returncode == 0
        t0 = time.time()
        start = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=120)
        print(f"slurm cluster start: {time.time() - t0:.1f} s ({start.stderr.strip()})")
        if start.returncode == 3:
            skip_loudly(request, f"a Slurm configuration this test did not write exists: {start.stderr.strip()}")
        try:
            assert start.returncode == 0, f"slurm_cluster.sh start failed:\n{start.stderr}"
            yield STATE
        finally:
            if not was_running:
                t0 = time.time()
                subprocess.run([str(CLUSTER), "stop"], capture_output=True, timeout=120)
                print(f"slurm cluster stop: {time.time() - t0:.1f} s")
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def squeue(root: Path) -> list[dict]:
    out = subprocess.run(
        ["squeue", "--noheader", "--states=all", "--format=%i|%T|%k|%Z"], capture_output=True, text=True
    ).stdout
    jobs = [dict(zip(("id", "state", "comment", "workdir"), line.split("|"))) for line in out.splitlines() if line]
    return [j for j in jobs if j["workdir"] == str(root)]


def cancel_one_model_job(root: Path, proc) -> dict:
    """scancel the first model job caught mid-way through its `python -m sd2` step (its rule
    log has begun: the step is computing); return its squeue line."""
    deadline = time.time() + RUN_TIMEOUT
    while proc.poll() is None and time.time() < deadline:
        logs = slurm_job_logs(root)
        for job in squeue(root):
            log = logs.get(job["id"], {})
            if job["state"] != "RUNNING" or not log.get("started"):
                continue
            if any((root / p).exists() and (root / p).stat().st_size > 0 for p in log["log"]) or not log["log"]:
                subprocess.run(["scancel", job["id"]], check=True)
                return job
        time.sleep(0.2)
    pytest.fail("the workflow ended before a model job could be cancelled mid-way")


def kill_leftovers(root: Path):
    """SIGKILL, by pid, every process still running in or on `root` (this test's copies):
    a jobstep that outlived its cancelled job, or the local run after a failure."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(str(root)) or str(root) in cmd:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                print(f"killed leftover process {proc.name}: {cmd[:200]!r}")
            except ProcessLookupError:
                pass


@pytest.fixture
def workdirs(tmp_path):
    yield tmp_path.resolve()
    kill_leftovers(tmp_path.resolve())


def reduced_tree(dest: Path) -> Path:
    """A copy of the working tree whose test config keeps one target, one draft and the methods
    layer_pruned and sd2, which between them run every model rule (pretrain, model_report,
    self_distill, target_outputs, prune, layer_prune, finetune, measure), and dense, the
    reference of every draft's MAC reduction; no exports: each job through Slurm costs its own
    interpreter start and scheduling, and more jobs of the same rules prove nothing more."""
    root = copy_tree(dest).resolve()
    cfg = yaml.safe_load((root / CONFIG).read_text())
    target, draft = cfg["targets"][0], cfg["drafts"][0]
    models = {name: cfg["models"][name] for name in (target, draft)}
    families = {spec["tokenizer"] for spec in models.values()}
    cfg.update(
        targets=[target],
        drafts=[draft],
        models=models,
        tokenizers={name: spec for name, spec in cfg["tokenizers"].items() if name in families},
        methods=list(REDUCED_METHODS),
        export={"enabled": False},
    )
    (root / CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root


# Columns that depend on which methods or targets a config has, not on a row's own jobs:
# the comparison with dense_sd (left out of the reduced config), the loss variants' comparison with
# their ce variant (the full config's direct_align; empty, so read back as floats, in the reduced one)
# and a model's role.
CONFIG_DEPENDENT = {
    "comparisons.csv": re.compile(r"^(dense_sd_|macs_reduction_pct|mal_change_pct|change_|ce_|mal_ratio_vs_ce|vs_ce_)"),
    "models.csv": re.compile(r"^role$"),
}


def assert_rows_of(reduced: Path, full: Path, rel: Path):
    """Every row of the reduced run's table `rel` is a row of the full run's, timing and
    config-dependent columns aside."""
    drop = CONFIG_DEPENDENT.get(rel.name)
    a, b = normalise(pd.read_csv(full / rel), full), normalise(pd.read_csv(reduced / rel), reduced)
    if drop is not None:
        a, b = (df.drop(columns=[c for c in df.columns if drop.search(c)]) for df in (a, b))
    assert list(a.columns) == list(b.columns), (rel, list(a.columns), list(b.columns))
    merged = b.merge(a.drop_duplicates(), how="left", indicator=True)
    missing = b[(merged["_merge"] != "both").to_numpy()]
    assert missing.empty, f"{rel}: rows of the Slurm run that the local run does not have:\n{missing.T}"


def test_profile_runs_model_jobs_through_sbatch(tiny_run, slurm_cluster, workdirs):
    tmp_path = workdirs
    t_start = time.time()
    env = venv_env()
    if not (REPO / CONFIG).exists() or not (REPO / "workflow" / "Snakefile").exists():
        pytest.fail(f"{CONFIG} or workflow/Snakefile missing")
    slurm_root = reduced_tree(tmp_path / "slurm")

    expected = dry_run_jobs(slurm_root)
    on_cluster = [j for j in expected if not j["local"]]
    assert on_cluster, "the test config puts no job on the cluster"

    # Phase 1: cancel a model job mid-way, no retries.
    t0 = time.time()
    proc, log1 = snakemake(slurm_root, "--profile", "slurm", "--retries", "0", env=env, popen=True)
    try:
        cancelled = cancel_one_model_job(slurm_root, proc)
        rc = proc.wait(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    t_phase1 = time.time() - t0
    assert rc != 0, f"Snakemake succeeded although job {cancelled} was cancelled:\n{log1.read_text()[-3000:]}"
    time.sleep(1)  # jobcomp is written when slurmctld has finished the job
    assert jobcomp(slurm_root)[cancelled["id"]]["JobState"] == "CANCELLED"
    killed = slurm_job_logs(slurm_root)[cancelled["id"]]
    assert killed["output"], f"no outputs in the log of the cancelled job: {killed}"
    left = [o for o in killed["output"] if (slurm_root / o).exists()]
    assert not left, f"cancelled job {cancelled['id']} ({killed['rule']}) left outputs {left}"
    again = dry_run_jobs(slurm_root)
    assert (killed["rule"], killed["output"]) in {(j["rule"], j["output"]) for j in again}, (
        f"a dry run after the cancel does not rerun {killed['rule']} {killed['output']}"
    )

    # Phase 2: the same command finishes the workflow.
    t0 = time.time()
    _, log2 = snakemake(slurm_root, "--profile", "slurm", env=env)
    t_phase2 = time.time() - t0
    _, out = snakemake(slurm_root, "--profile", "slurm", "-n", env=env)
    assert "Nothing to be done" in out, out[-2000:]

    # Every cluster job of the DAG ran as a Slurm batch job that completed; no local rule did.
    comp = jobcomp(slurm_root)
    logs = slurm_job_logs(slurm_root)
    assert set(logs) <= set(comp), f"job logs without a Slurm completion record: {set(logs) - set(comp)}"
    completed = {
        (logs[i]["rule"], logs[i]["output"]) for i, rec in comp.items() if rec["JobState"] == "COMPLETED" and i in logs
    }
    missing = [j for j in on_cluster if (j["rule"], j["output"]) not in completed]
    assert not missing, f"cluster jobs with no COMPLETED Slurm job: {missing}"
    n_completed = sum(rec["JobState"] == "COMPLETED" for rec in comp.values())
    assert n_completed == len(on_cluster), f"{n_completed} Slurm jobs completed for {len(on_cluster)} cluster jobs"
    # each asked Slurm for the config's resources (runtime_min -> -t, threads -> CPUs, mem_mb -> --mem, gpu -> --gpus)
    res = {
        "gpu": 0,
        "threads": 2,
        "mem_mb": 8000,
        "runtime_min": 120,
        **(yaml.safe_load((slurm_root / CONFIG).read_text()).get("resources") or {}),
    }
    wanted = (str(res["runtime_min"]), res["threads"], res["mem_mb"], res["gpu"])
    wrong = {
        f"{logs[i]['rule']} (Slurm job {i})": slurm_request(rec)
        for i, rec in comp.items()
        if i in logs and slurm_request(rec) != wanted
    }
    assert not wrong, (
        f"jobs that did not ask Slurm for the config's resources {wanted} (minutes, CPUs, MB, GPUs): {wrong}"
    )
    assert all(log["dir_rule"] == log["rule"] for log in logs.values())
    assert not {log["rule"] for log in logs.values()} & LOCAL_RULES
    # and Snakemake itself ran exactly the local rules on this host (`localrule` in its log)
    # (show-failed-logs copies the cancelled job's log, with its inner `localrule`, in between =====)
    main_logs = re.sub(r"^Logfile .*:\n={80}\n.*?^={80}$", "", log1.read_text() + log2, flags=re.M | re.S)
    ran_here = set(re.findall(r"^localrule (\w+):$", main_logs, re.M))
    sent = set(re.findall(r"^rule (\w+):$", main_logs, re.M))
    assert ran_here <= LOCAL_RULES and not sent & LOCAL_RULES, (ran_here, sent)
    assert sent == {j["rule"] for j in on_cluster}, (sent, on_cluster)

    # The rows of a local run of the full test config, timing columns aside.
    results_dir = (yaml.safe_load((slurm_root / CONFIG).read_text()) or {}).get("results_dir", "results")
    tables = sorted(p.relative_to(slurm_root) for p in (slurm_root / results_dir).rglob("tables/*.csv"))
    assert tables, f"the Slurm run wrote no tables under {results_dir}"
    for rel in tables:
        assert_rows_of(slurm_root, tiny_run, rel)
    print(
        f"slurm test: {len(on_cluster)} cluster jobs, {len(expected) - len(on_cluster)} local; "
        f"phase 1 (cancel {killed['rule']}) {t_phase1:.0f} s, phase 2 {t_phase2:.0f} s, "
        f"total {time.time() - t_start:.0f} s"
    )
