"""Weights & Biases tracking: one run per job, grouped by sweep, configured by the wildcards."""

import os
from pathlib import Path


class _NoRun:
    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def start_run(wandb_cfg: dict, dir, group: str, job_type: str, name: str, config: dict):
    """Start a W&B run in the configured mode; disabled returns a no-op run."""
    mode = wandb_cfg["mode"]
    if mode == "disabled":
        return _NoRun()
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise ValueError(
            "wandb.mode is 'online' but WANDB_API_KEY is not set: set it, "
            "or use wandb.mode offline (sync later with `wandb sync`) or disabled"
        )
    import wandb

    Path(dir).mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=wandb_cfg["project"],
        entity=wandb_cfg.get("entity"),
        mode=mode,
        group=group,
        job_type=job_type,
        name=name,
        config=config,
        dir=str(dir),
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, x_disable_stats=True),
    )
