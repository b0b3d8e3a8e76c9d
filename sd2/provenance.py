"""Provenance attached to every artifact: seed, package versions, settings, command."""

import datetime
import json
import platform
import sys
from importlib import metadata

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
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path, obj, indent: int | None = 2) -> None:
    """Write JSON atomically: a killed job never leaves a half-written record (indent None: compact)."""
    from sd2.checkpoint import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, sort_keys=False, default=str)
            f.write("\n")
