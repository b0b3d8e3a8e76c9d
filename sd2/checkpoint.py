"""Atomic writes: outputs appear under their final name only once complete."""

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling of `path`; rename it onto `path` if the block succeeds.

    Works for files and directories. On error the temporary is removed, so an
    interrupted job never leaves something that looks like a finished output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def save_checkpoint(model, tokenizer, path, provenance: dict, extra_files: dict | None = None) -> None:
    """save_pretrained (safetensors) + tokenizer + provenance.json, atomically."""
    with atomic_path(path) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "provenance.json", provenance)
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)


def write_json(path, obj, indent: int | None = 2) -> None:
    """Write JSON atomically: a killed job never leaves a half-written record (indent None: compact)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, sort_keys=False, default=str)
            f.write("\n")
