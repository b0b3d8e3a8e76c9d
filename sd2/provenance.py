"""Provenance attached to every artifact: seed, package versions, settings, command."""

import datetime
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
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
