"""Workflow standards: `snakemake --lint` is clean; the rules' conda environments pin what requirements.lock pins."""

import re
import subprocess
import sys

import yaml
from conftest import REPO, snakemake_cmd
from packaging.requirements import Requirement
from packaging.version import Version

ENVS = sorted((REPO / "workflow" / "envs").glob("*.yaml"))
# Conda's own packages in an environment file, not PyPI packages of the lock.
NOT_IN_LOCK = {"python", "pip"}
# Packages of one environment only, outside the project's lock: vLLM (workflow/envs/vllm.yaml, engine.name vllm)
# brings its own torch and transformers, which is why it has an environment of its own.
ONLY_IN_ENV = {"vllm.yaml": {"vllm"}}


def normalise(name: str) -> str:
    """PEP 503: names compare case-insensitively, with runs of `-`, `_` and `.` alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_versions() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"requirements.lock: not a `name==version` pin: {line!r}"
            pins[normalise(name)] = version.strip()
    return pins


def env_requirements(path) -> list[tuple[str, str | None, str]]:
    """(name, pinned version or None, the entry as written) of every package an environment file installs."""
    found = []
    for dep in yaml.safe_load(path.read_text())["dependencies"]:
        if isinstance(dep, dict):  # the pip section: requirement lines, options (-e, -c ...) skipped
            for line in dep["pip"]:
                if line.startswith("-"):
                    continue
                req = Requirement(line)
                specs = list(req.specifier)
                exact = specs[0].version if len(specs) == 1 and specs[0].operator == "==" else None
                found.append((req.name, exact, line))
        else:  # a conda match spec: `name`, `name=version` or `name==version`
            name, _, version = re.match(r"([A-Za-z0-9_.-]+)\s*(==?)?\s*(\S*)", dep).groups()
            found.append((name, version or None, dep))
    return found


def same_version(pinned: str, locked: str) -> bool:
    """The pin names the locked version; a pin without a local label (`+cpu`) stands for every build of it."""
    pinned_v, locked_v = Version(pinned), Version(locked)
    return pinned_v == locked_v or (pinned_v.local is None and pinned_v == Version(locked_v.public))


def test_lint_is_clean(tmp_path):
    proc = subprocess.run(
        snakemake_cmd(tmp_path, "--lint", configfile="config/config.yaml"), capture_output=True, text=True
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "Lints for" not in out, out[-5000:]
    assert "Congratulations, your workflow is in a good condition!" in out, out[-5000:]


def test_every_conda_directive_names_an_environment_file():
    rules = sorted((REPO / "workflow" / "rules").glob("*.smk"))
    named = 0
    for smk in rules:
        for env in re.findall(r"^\s+conda:\s*\n\s+\"([^\"]+)\"", smk.read_text(), flags=re.M):
            path = (smk.parent / env).resolve()
            assert path in ENVS, f"{smk.name}: conda: {env!r} is not a file of workflow/envs/"
            named += 1
    assert named, "no rule names a conda environment"


def test_environments_pin_every_package():
    """Every package of an environment carries a version (python) or an exact pin, so the lock check sees it."""
    assert ENVS, "no workflow/envs/*.yaml"
    for env in ENVS:
        for name, version, entry in env_requirements(env):
            assert version or name == "pip", f"{env.name}: {entry!r} is not pinned"


def test_environment_pins_match_requirements_lock():
    lock = lock_versions()
    for env in ENVS:
        checked = 0
        for name, version, entry in env_requirements(env):
            if name in NOT_IN_LOCK or name in ONLY_IN_ENV.get(env.name, ()) or version is None:
                continue
            key = normalise(name)
            assert key in lock, f"{env.name}: {entry!r} is not in requirements.lock"
            assert same_version(version, lock[key]), f"{env.name}: {entry!r}, requirements.lock has {lock[key]}"
            checked += 1
        assert checked, f"{env.name}: no package pinned"


def test_python_is_formatted_and_lint_clean():
    """ruff (configured in pyproject.toml, line length 120) over the package, tests, benchmarks and notebook."""
    paths = ["sd2", "tests", "benchmarks", "notebooks"]
    for args in (["check", *paths], ["format", "--check", *paths]):
        proc = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
