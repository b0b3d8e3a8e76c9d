"""bf16 autocast only where the device runs it natively; training records its precision and speed."""

import json

import pytest
import torch
from conftest import REPO

from sd2 import precision, sweep_time, training
from sd2.config import load
from sd2.models import load_model


@pytest.fixture
def native(monkeypatch):
    """Set what the capability check reports."""

    def set_native(value):
        monkeypatch.setattr(precision, "native_bf16", lambda device_type: value)

    return set_native


@pytest.mark.parametrize("has_bf16,expected", [(False, False), (True, True)])
def test_auto_follows_the_hardware(native, has_bf16, expected):
    native(has_bf16)
    use, why = precision.resolve_bf16("auto", "cpu")
    assert use is expected
    assert ("fp32" if not expected else "bf16") in why and ("has no" in why) == (not has_bf16)


def test_true_is_honoured_with_a_warning_where_emulated(native):
    native(False)
    with pytest.warns(UserWarning, match="emulated"):
        assert precision.resolve_bf16(True, "cpu")[0] is True
    assert precision.resolve_bf16(False, "cpu")[0] is False


def test_true_where_native_does_not_warn(native, recwarn):
    native(True)
    assert precision.resolve_bf16(True, "cpu")[0] is True
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_bad_setting_is_an_error():
    with pytest.raises(ValueError, match="'fp16'"):
        precision.resolve_bf16("fp16", "cpu")


def test_real_capability_check_answers():
    assert isinstance(precision.native_bf16("cpu"), bool)


def _batches(vocab, n=4):
    gen = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(0, vocab, (n, 32), generator=gen)
        yield {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("has_bf16,name", [(False, "fp32"), (True, "bf16-autocast")])
def test_training_log_records_precision_and_speed(native, tiny_llama_dir, has_bf16, name):
    native(has_bf16)
    model = load_model(tiny_llama_dir)
    vocab = model.config.vocab_size
    val = [next(_batches(vocab))]
    history = training.train(
        model,
        _batches(vocab),
        val,
        steps=4,
        lr=1e-3,
        warmup_steps=1,
        weight_decay=0.0,
        eval_every=2,
        bf16="auto",
        micro_batch_size=None,
    )
    assert [r["precision"] for r in history] == [name] * 3
    assert history[0]["tokens_per_s"] != history[0]["tokens_per_s"]  # nothing trained before step 0
    assert all(r["tokens_per_s"] > 0 for r in history[1:])
    assert history[-1]["tokens"] == 4 * 4 * 32 and 0 < history[-1]["train_seconds"] <= history[-1]["seconds"]
    assert training.throughput(history) == pytest.approx(history[-1]["tokens"] / history[-1]["train_seconds"], rel=1e-2)


def test_estimate_then_record_then_scaled_estimate(tmp_path, native):
    native(False)
    cfg = load(REPO / "config" / "test.yaml")
    first = sweep_time.estimate(cfg, previous=None)
    assert set(first["models"]) == {"tiny-llama", "tiny-qwen", "tiny-draft"}
    llama = first["models"]["tiny-llama"]
    assert llama["precision"] == "fp32" and llama["steps"] == 40000 // (8 * 64) and llama["step_seconds"] > 0
    assert first["sweep_seconds"] is None and "not estimated" in sweep_time.describe(first)
    assert 0 < first["cpu_share"] and "busy" not in sweep_time.describe({**first, "cpu_share": 0.9})
    assert "busy: the probe got 40% of its threads' time" in sweep_time.describe({**first, "cpu_share": 0.4})

    rec = sweep_time.record(600, first, tmp_path / "run_time.json")
    on_disk = json.loads((tmp_path / "run_time.json").read_text())
    assert on_disk["seconds"] == 600 and on_disk["machine"]["cpu"] and on_disk["machine"]["cores"] >= 1
    assert on_disk["provenance"]["versions"]["torch"] and rec["config_digest"] == first["config_digest"]

    second = sweep_time.estimate(cfg, previous=on_disk)
    slowdown = second["pretrain_seconds"] / first["pretrain_seconds"] if first["pretrain_seconds"] else None
    assert second["scaled_from"]["seconds"] == 600
    if slowdown:
        assert second["sweep_seconds"] == round(600 * slowdown)
    assert "Whole sweep: ~" in sweep_time.describe(second)

    assert second["scaled_from"]["same_config"]
    other = sweep_time.estimate({**cfg, "seed": 1}, previous=on_disk)
    assert not other["scaled_from"]["same_config"] and "rough guide" in sweep_time.describe(other)


def test_make_run_from_nothing_resumed_then_recorded(tmp_path, monkeypatch):
    """A fresh clone: outputs deleted first; a killed run keeps adding up its time; the completed one records it."""
    cfg = {"workdir": str(tmp_path / "work"), "results_dir": str(tmp_path / "results")}
    calls = []
    outcomes = iter([0, 1, 0])  # delete-all-output, a run that dies, the resumed run

    def fake_run(cmd, check=False):
        calls.append(cmd)
        return type("Done", (), {"returncode": next(outcomes)})()

    monkeypatch.setattr("sd2.config.load", lambda path: cfg)
    monkeypatch.setattr(
        sweep_time,
        "estimate",
        lambda config, previous: {
            "machine": sweep_time.machine(),
            "config_digest": "x",
            "models": {},
            "pretrain_seconds": 0,
            "sweep_seconds": None,
        },
    )
    monkeypatch.setattr("subprocess.run", fake_run)
    monkeypatch.chdir(tmp_path)
    assert sweep_time.run_sweep("config.yaml", cores=2) == 1
    assert "--delete-all-output" in calls[0] and calls[1][-2:] == ["--cores", "2"]
    marker = json.loads((tmp_path / "work" / ".run-from-nothing.json").read_text())
    assert marker["invocations"] == 1 and not (tmp_path / "results" / "run_time.json").exists()
    assert sweep_time.run_sweep("config.yaml", cores=2) == 0
    assert len(calls) == 3 and "--delete-all-output" not in calls[2]  # resumed, nothing deleted
    rec = json.loads((tmp_path / "results" / "run_time.json").read_text())
    assert rec["invocations"] == 2 and rec["seconds"] >= 0 and rec["machine"]["cpu"]
    assert not (tmp_path / "work" / ".run-from-nothing.json").exists()
    # a third run in a finished tree is incremental: no record rewritten
    outcomes = iter([0])
    (tmp_path / "results" / "run_time.json").write_text("{}")
    assert sweep_time.run_sweep("config.yaml", cores=2) == 0
    assert (tmp_path / "results" / "run_time.json").read_text() == "{}"


def test_on_top_run_adds_up_cut_invocations(tmp_path, monkeypatch):
    """make families: a cut invocation's time counts towards the one that completes; a run resumed
    from records made before any timing says its time is not the whole config's."""
    results = tmp_path / "results" / "families"
    cfg = {"workdir": str(tmp_path / "work"), "results_dir": str(results)}
    (tmp_path / "work" / "data").mkdir(parents=True)
    outcomes = iter([1, 0])
    monkeypatch.setattr("sd2.config.load", lambda path: cfg)
    monkeypatch.setattr("subprocess.run", lambda cmd: type("Done", (), {"returncode": next(outcomes)})())
    monkeypatch.setattr(sweep_time, "config_digest", lambda config: "x")
    monkeypatch.chdir(tmp_path)
    assert sweep_time.run_on_top("families.yaml", cores=2) == 1
    assert json.loads((results / ".on-top-run.json").read_text())["invocations"] == 1
    assert not (results / "run_time.json").exists()
    (results / "records").mkdir(parents=True)
    (results / "records" / "r.json").write_text("{}")  # what the cut invocation wrote
    assert sweep_time.run_on_top("families.yaml", cores=2) == 0
    rec = json.loads((results / "run_time.json").read_text())
    assert rec["invocations"] == 2 and rec["whole_config"] and not (results / ".on-top-run.json").exists()
    # A completed record and nothing new to run: the record stays as it was.
    outcomes = iter([0])
    assert sweep_time.run_on_top("families.yaml", cores=2) == 0
    assert json.loads((results / "run_time.json").read_text()) == rec
    # The config gained a job since: the new record holds the earlier one.
    (tmp_path / "logs" / "benchmarks" / "measure").mkdir(parents=True)
    outcomes = iter([0])
    real_run = sweep_time.job_times
    monkeypatch.setattr(
        sweep_time, "job_times", lambda root, since=None: real_run(root, since=0).assign(seconds=5.0).head(1)
    )
    (tmp_path / "logs" / "benchmarks" / "measure" / "new.tsv").write_text("s\tmax_rss\n5.0\t1.0\n")
    assert sweep_time.run_on_top("families.yaml", cores=2) == 0
    new = json.loads((results / "run_time.json").read_text())
    assert not new["whole_config"] and new["jobs"] == 1 and new["earlier"] == rec
