"""Provenance attached to every artifact: seed, package versions, settings, command."""

import datetime
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("sd2", "torch", "transformers", "tokenizers", "datasets", "llmcompressor", "snakemake")


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def provenance(seed: int | None = None, **settings) -> dict:
    return {
        "seed": seed,
        "versions": versions(),
        "settings": settings,
        "command": " ".join(sys.argv),
        "host": platform.node(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def training_precision(model_dir) -> str | None:
    """The precisions a model was trained in, base first ("fp32", or "bf16+fp32" for a bf16 pretraining under
    fp32 fine-tuning), from the provenance.json of it and of every checkpoint it was made from; None for a
    model that no training here made (a hub checkpoint)."""
    seen, found, here = set(), [], Path(model_dir)
    while here not in seen and (here / "provenance.json").exists():
        seen.add(here)
        info = json.loads((here / "provenance.json").read_text())
        if info.get("precision"):
            found.insert(0, info["precision"])
        settings = info.get("settings") or {}
        parent = settings.get("init") or settings.get("model") or settings.get("draft")
        if not isinstance(parent, str):
            break
        here = Path(parent)
    return "+".join(dict.fromkeys(found)) or None
