"""Hub models: fetched once with only what loading needs; gated models fail up front with what to do; jobs offline."""

import fnmatch
import json
import re
import subprocess

import httpx
import huggingface_hub
import pytest
import yaml
from conftest import REPO, snakemake_cmd
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

from sd2.hub import PATTERNS, download, is_local, job_env

GATED = "meta-llama/Llama-3.2-1B-Instruct"
HUB = {"cache_dir": None, "token_env": "HF_TOKEN", "offline_jobs": True}
# The files of the real meta-llama/Llama-3.2-1B-Instruct repository.
LLAMA_FILES = [
    ".gitattributes",
    "LICENSE.txt",
    "README.md",
    "USE_POLICY.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "original/consolidated.00.pth",
    "original/params.json",
    "original/tokenizer.model",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


def http_error(cls, status, repo):
    url = f"https://huggingface.co/api/models/{repo}/auth-check"
    return cls(f"{status} Client Error", response=httpx.Response(status, request=httpx.Request("GET", url)))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub with its network calls replaced: records what was asked, serves a fake snapshot."""
    calls = {"auth_check": [], "snapshot_download": []}
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)

    def auth_check(self, repo, token=None):
        calls["auth_check"].append((repo, token))
        if calls.get("refuse"):
            raise calls["refuse"]

    def snapshot_download(repo, cache_dir=None, token=None, allow_patterns=None):
        calls["snapshot_download"].append({"repo": repo, "cache_dir": cache_dir, "token": token})
        snapshot = tmp_path / "cache" / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
        for name in calls.get("files", LLAMA_FILES):
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                (snapshot / name).write_text("{}")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub.HfApi, "auth_check", auth_check)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_gated_model_without_access_names_model_token_and_access_page(hub, tmp_path):
    hub["refuse"] = http_error(GatedRepoError, 401, GATED)
    with pytest.raises(ValueError) as err:
        download("llama-3.2-1b-instruct", GATED, tmp_path / "marker.json", hub_cfg=HUB)
    message = str(err.value)
    assert f"{GATED} is a gated model" in message
    assert "$HF_TOKEN is not set" in message and "set HF_TOKEN to a read token" in message
    assert f"request access at https://huggingface.co/{GATED}" in message
    assert not hub["snapshot_download"] and not (tmp_path / "marker.json").exists()


def test_token_comes_from_the_configured_variable(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_HF_TOKEN", "hf_secret")
    hub["refuse"] = http_error(GatedRepoError, 403, GATED)
    with pytest.raises(ValueError, match=r"the token in \$LAB_HF_TOKEN has no access"):
        download("m", GATED, tmp_path / "marker.json", hub_cfg={**HUB, "token_env": "LAB_HF_TOKEN"})
    assert hub["auth_check"] == [(GATED, "hf_secret")]


def test_unknown_repository_is_named(hub, tmp_path):
    hub["refuse"] = http_error(RepositoryNotFoundError, 404, "org/typo")
    with pytest.raises(ValueError, match=r"org/typo was not found on the Hugging Face Hub"):
        download("m", "org/typo", tmp_path / "marker.json", hub_cfg=HUB)


def test_download_fetches_only_what_loading_needs_and_writes_the_marker(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    marker = download(
        "llama-1b", GATED, tmp_path / "hub" / "llama-1b.json", hub_cfg={**HUB, "cache_dir": str(tmp_path)}
    )
    assert hub["snapshot_download"] == [{"repo": GATED, "cache_dir": str(tmp_path / "hub"), "token": "hf_secret"}]
    # Llama's original/ folder holds the same weights again as a .pth (2.5 GB for 1B): left out.
    assert "original/consolidated.00.pth" not in marker["files"]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(marker["files"])
    saved = json.loads((tmp_path / "hub" / "llama-1b.json").read_text())
    assert (saved["hub"], saved["revision"]) == (GATED, "abc123")
    assert saved["job_env"]["HF_HUB_OFFLINE"] == "1" and saved["job_env"]["HF_HOME"] == str(tmp_path)


def test_patterns_keep_every_tokenizer_layout():
    # Llama 3 (tokenizer.json), Qwen2.5 (vocab.json + merges.txt), SentencePiece (tokenizer.model),
    # a separate chat template: what AutoTokenizer may need; weights only as safetensors.
    needed = ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja"]
    needed += ["model-00001-of-00004.safetensors", "model.safetensors.index.json", "tokenizer_config.json"]
    for name in needed:
        assert any(fnmatch.fnmatch(name, p) for p in PATTERNS), name
    for name in ("pytorch_model.bin", "original/consolidated.00.pth", "model.onnx", "modeling_custom.py"):
        assert not any(fnmatch.fnmatch(name, p) for p in PATTERNS), name


def test_checkpoint_without_safetensors_is_refused(hub, tmp_path):
    hub["files"] = ["config.json", "pytorch_model.bin", "tokenizer.json"]
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        download("m", "org/old", tmp_path / "marker.json", hub_cfg=HUB)
    assert not (tmp_path / "marker.json").exists()


def test_local_paths_are_not_downloaded(hub, tmp_path):
    assert is_local(str(tmp_path)) and not is_local(GATED)
    with pytest.raises(ValueError, match="used in place"):
        download("m", str(tmp_path), tmp_path / "marker.json", hub_cfg=HUB)
    with pytest.raises(ValueError, match="looks like a local path"):
        download("m", str(tmp_path / "missing"), tmp_path / "marker.json", hub_cfg=HUB)
    assert not hub["auth_check"]


def test_job_env():
    assert job_env(HUB) == {"HF_HUB_OFFLINE": "1"}
    assert job_env({**HUB, "offline_jobs": False}) == {}
    env = job_env({**HUB, "cache_dir": "/shared/hf"})
    assert (env["HF_HOME"], env["HF_HUB_CACHE"], env["HF_HUB_OFFLINE"]) == ("/shared/hf", "/shared/hf/hub", "1")
    # A login saved with `hf auth login` under the user's own HF_HOME stays visible.
    assert env["HF_TOKEN_PATH"] == huggingface_hub.constants.HF_TOKEN_PATH


def test_workflow_downloads_hub_models_once_and_jobs_wait_for_them(tmp_path, tiny_llama_dir):
    """Dry run: a hub id gets one download_model job that its model jobs depend on; a local directory gets none."""
    raw = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    raw["models"]["tiny-llama"] = {"hub": "org/tiny-llama"}
    raw["models"]["tiny-qwen"] = {"hub": str(tiny_llama_dir)}
    config = tmp_path / "hub.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(snakemake_cmd(tmp_path, "-n", "-p", configfile=config), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert re.search(r"^download_model\s+1$", out, re.M)
    assert "--repo org/tiny-llama" in out and f"--repo {tiny_llama_dir}" not in out
    jobs = [block for block in out.split("\nrule ")[1:] if "target=tiny-llama" in block]
    loading = [b for b in jobs if b.startswith(("self_distill:", "target_outputs:", "measure:"))]
    assert loading and all("work/hub/tiny-llama.json" in b.split("\n")[1] for b in loading)
