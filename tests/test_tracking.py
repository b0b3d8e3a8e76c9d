"""W&B online mode accepts every login wandb accepts, and names the three fixes when there is none."""

import pytest

from sd2 import tracking
from sd2.tracking import start_run, tracked_run, wandb_logged_in

KEY = "k" * 40  # wandb checks only the format of a key here (no verification request)
CFG = {"mode": "online", "project": "sd2-test", "entity": None}


@pytest.fixture
def bare_home(tmp_path, monkeypatch):
    """A home with no wandb login at all: no key in the environment, no .netrc."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_netrc_from_wandb_login_is_a_login(bare_home):
    (bare_home / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {KEY}\n")
    (bare_home / ".netrc").chmod(0o600)
    assert wandb_logged_in()


def test_api_key_in_the_environment_is_a_login(bare_home, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert wandb_logged_in()


def test_netrc_for_another_host_is_not_a_login(bare_home):
    (bare_home / ".netrc").write_text(f"machine example.org\n  login user\n  password {KEY}\n")
    (bare_home / ".netrc").chmod(0o600)
    assert not wandb_logged_in()


def test_no_login_names_the_three_fixes(bare_home):
    with pytest.raises(ValueError) as err:
        start_run(CFG, bare_home / "wandb", "g", "measure", "n", {})
    message = str(err.value)
    for fix in ("wandb login", "WANDB_API_KEY", "wandb.mode: offline", "wandb sync"):
        assert fix in message
    assert not (bare_home / "wandb").exists()  # failed before anything was started


class Run:
    def __init__(self):
        self.finished = []

    def finish(self, exit_code=None):
        self.finished.append(exit_code)


def test_tracked_run_finishes_the_run_and_marks_a_failed_job(monkeypatch):
    runs = []
    monkeypatch.setattr(tracking, "start_run", lambda *args: runs.append(Run()) or runs[-1])
    with tracked_run(CFG, "dir", "g", "measure", "n", {}) as run:
        assert run is runs[0] and not run.finished
    assert runs[0].finished == [None]
    with pytest.raises(RuntimeError, match="boom"), tracked_run(CFG, "dir", "g", "measure", "n", {}):
        raise RuntimeError("boom")
    assert runs[1].finished == [1]  # W&B shows the run as failed, not as still running


def test_disabled_tracking_is_a_no_op_run(tmp_path):
    with tracked_run({"mode": "disabled"}, tmp_path / "wandb", "g", "measure", "n", {}) as run:
        run.log({"mal": 2.0})
    assert not (tmp_path / "wandb").exists()
