"""Weights & Biases tracking: one run per job, grouped by sweep, configured by the wildcards."""

import contextlib
from pathlib import Path

NO_LOGIN = (
    "wandb.mode is 'online' but wandb finds no credentials (no WANDB_API_KEY, no entry for the W&B host "
    "in ~/.netrc or $NETRC, no api_key in a wandb settings file, no WANDB_IDENTITY_TOKEN_FILE). "
    "Fix it one of three ways: run `wandb login` once on a machine that shares this home directory "
    "(it writes ~/.netrc); or export WANDB_API_KEY=<key from https://wandb.ai/authorize> before starting "
    "Snakemake; or set wandb.mode: offline in the config and upload the runs later with "
    "`wandb sync <workdir>/wandb/wandb/offline-run-*`"
)


class _NoRun:
    def log(self, *args, **kwargs):
        pass

    def finish(self, exit_code: int | None = None):
        pass


def wandb_logged_in() -> bool:
    """Whether wandb itself finds credentials for its host, in the order `wandb.init` uses.

    That order (wandb 0.31, wandb.sdk.lib.wbauth.authenticate_session): WANDB_API_KEY or
    WANDB_IDENTITY_TOKEN_FILE, then the .netrc entry `wandb login` writes ($NETRC, ~/.netrc or
    ~/_netrc), then an api_key in a wandb settings file. Asked without a prompt and without
    changing the login state, so a job on a node without a terminal gets an answer, not a hang.
    wandb.login(prompt=False) would answer too, but says False whenever WANDB_MODE is offline or
    disabled in the environment, and starts wandb's service (seconds).
    """
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    host = wandb_setup.singleton().settings.base_url
    return wbauth.authenticate_session(host=host, source="sd2", prompt=False, update_session=False) is not None


def start_run(wandb_cfg: dict, dir, group: str, job_type: str, name: str, config: dict):
    """Start a W&B run in the configured mode; disabled returns a no-op run."""
    mode = wandb_cfg["mode"]
    if mode == "disabled":
        return _NoRun()
    if mode == "online" and not wandb_logged_in():
        raise ValueError(NO_LOGIN)
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


@contextlib.contextmanager
def tracked_run(wandb_cfg: dict, dir, group: str, job_type: str, name: str, config: dict):
    """start_run for the length of a job: the run is finished when the block ends, marked failed
    (exit code 1) when it raises, so a crashed job does not leave W&B showing it as still running."""
    run = start_run(wandb_cfg, dir, group, job_type, name, config)
    try:
        yield run
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
