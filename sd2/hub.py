"""Hub models fetched once, on the submit host, so that every model job can run offline.

`download` is what the workflow's download_model rule runs (a local rule: compute nodes often
have no internet). It checks access first, so a gated model the token cannot read fails with a
message that says what to do, then fetches only what loading needs into the configured cache and
writes a marker file. Model jobs depend on that marker and run with `job_env`: HF_HUB_OFFLINE=1
and the same cache.
"""

import os
from pathlib import Path

from sd2.checkpoint import write_json
from sd2.provenance import provenance

# What from_pretrained needs for a causal LM and its tokenizer; a repository's other files
# (Llama's original/*.pth consolidated weights, *.bin duplicates, ONNX, GGUF) are left out.
PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja"]


# The published shapes of the paper's smaller drafts (config.json of meta-llama/Llama-3.2-1B and -3B; the
# Instruct models are the same), for the benchmarks that build random models of that size offline.
LLAMA_3_2 = {
    "Llama-3.2-1B": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        num_hidden_layers=16,
    ),
    "Llama-3.2-3B": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        num_hidden_layers=28,
    ),
}
LLAMA_3_2_VOCAB = 128256


def is_local(hub: str) -> bool:
    """A `hub:` value that names an existing directory is used in place; anything else is a hub id."""
    return Path(hub).expanduser().is_dir()


def job_env(hub_cfg: dict) -> dict[str, str]:
    """Environment of every workflow job: the configured cache, and offline hub access.

    HF_HUB_CACHE is set beside HF_HOME because a user's own HF_HUB_CACHE would otherwise win over
    HF_HOME/hub, and jobs would look in another cache than the one download_model filled.
    HF_TOKEN_PATH keeps the login that `hf auth login` saved under the user's own HF_HOME visible
    (to download_model and to gated datasets) once HF_HOME points at the cache.
    """
    from huggingface_hub import constants

    env = {}
    if hub_cfg["cache_dir"]:
        home = str(Path(hub_cfg["cache_dir"]).expanduser().absolute())
        env.update(HF_HOME=home, HF_HUB_CACHE=os.path.join(home, "hub"), HF_TOKEN_PATH=constants.HF_TOKEN_PATH)
    if hub_cfg["offline_jobs"]:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def _token(token_env: str):
    """The token in $token_env; None lets huggingface_hub use HF_TOKEN or a saved `hf auth login`."""
    return os.environ.get(token_env) or None


def _who(token_env: str) -> str:
    from huggingface_hub import get_token

    if os.environ.get(token_env):
        return f"the token in ${token_env}"
    if get_token():
        return f"the token saved by `hf auth login` (${token_env} is not set)"
    return f"no token (${token_env} is not set and there is no saved `hf auth login`)"


def check_access(repo: str, token_env: str) -> None:
    """Raise a ValueError that names the model, the token variable and the access page if `repo` cannot be read."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    url = f"https://huggingface.co/{repo}"
    fix = (
        f"set {token_env} to a read token of an account that has access (https://huggingface.co/settings/tokens), "
        "or run `hf auth login` on this host, and rerun"
    )
    try:
        HfApi().auth_check(repo, token=_token(token_env))
    except GatedRepoError as e:
        raise ValueError(
            f"{repo} is a gated model and {_who(token_env)} has no access to it: "
            f"request access at {url} (with the account the token belongs to), then {fix}"
        ) from e
    except RepositoryNotFoundError as e:
        raise ValueError(
            f"{repo} was not found on the Hugging Face Hub with {_who(token_env)}: check the model's `hub:` value "
            f"(a hub id like org/name, or an existing local directory); if {url} is private, {fix}"
        ) from e
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code in (401, 403):
            raise ValueError(f"{repo}: the hub refused {_who(token_env)} ({e.response.status_code}): {fix}") from e
        raise


def download(name: str, repo: str, out, *, hub_cfg: dict, trust_remote_code: bool = False) -> dict:
    """Check access to `repo`, fetch what loading needs into the cache, write the marker `out` (JSON)."""
    from huggingface_hub import snapshot_download

    if is_local(repo):
        raise ValueError(f"models.{name}.hub = {repo} is a local directory: it is used in place, not downloaded")
    if repo.startswith((".", "/", "~")) or repo.count("/") > 1:
        raise ValueError(f"models.{name}.hub = {repo} looks like a local path but is not a directory")
    check_access(repo, hub_cfg["token_env"])
    env = job_env(hub_cfg)
    # Custom modelling code is fetched only for a model allowed to run it.
    patterns = PATTERNS + (["*.py"] if trust_remote_code else [])
    snapshot = Path(
        snapshot_download(
            repo, cache_dir=env.get("HF_HUB_CACHE"), token=_token(hub_cfg["token_env"]), allow_patterns=patterns
        )
    )
    files = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
    if not any(f.endswith(".safetensors") for f in files):
        raise ValueError(f"{repo} has no *.safetensors weights; only safetensors checkpoints are loaded here")
    marker = {
        "model": name,
        "hub": repo,
        "revision": snapshot.name,
        "snapshot": str(snapshot),
        "files": files,
        "job_env": env,
        "provenance": provenance(patterns=patterns, token_env=hub_cfg["token_env"]),
    }
    write_json(out, marker)
    return marker
