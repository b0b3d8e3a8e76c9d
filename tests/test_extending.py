"""Extensions (docs/extending.md): a module registers a loss and a head family through sd2.methods'
public API, the config names it under `extensions`, and the workflow plans their jobs."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import REPO, snakemake_cmd

from sd2 import config as sd2_config
from sd2 import methods, variants
from sd2.errors import ConfigError

# Registration only (imported by config validation, no torch): the loss's objective and the head's
# module are "module:attribute" references resolved in the jobs.
TOY_EXTENSION = """
from sd2 import methods

methods.register_loss(
    methods.Loss("toy", None, "half the response cross-entropy", "toy_impl:half_ce", shade=0.3)
)
methods.register_head(
    methods.HeadFamily(
        "toyhead",
        "toy_impl:ToyHead",
        beams=False,
        size={"layers": {"type": "integer", "minimum": 1, "description": "Linear layers."}},
        default_sizes={"small": {"layers": 1}},
        description="Toy head sizes: layers of its MLP.",
    ),
    method=methods.Method("toyhead", "ToyHead", "head", None, "target", False, None, "#123456"),
)
"""
TOY_IMPLEMENTATION = """
from torch import nn

from sd2.chunked_loss import chunked_causal_lm_loss
from sd2.drafters.base import DraftHead


def half_ce(model, teacher, batch, chunk_tokens):
    return 0.5 * chunked_causal_lm_loss(model, batch, chunk_tokens)


class ToyHead(DraftHead):
    method = "toyhead"

    def __init__(self, target, layers: int = 1):
        super().__init__(target)
        self.mlp = nn.Sequential(*(nn.Linear(self.target_hidden, self.target_hidden) for _ in range(layers)))

    def features(self, hidden_states):
        return hidden_states[-1]

    def begin(self, feats, item, ctx_len, last):
        return {"h": feats[item, ctx_len - 1]}

    def logits(self, state):
        return self.lm_head(self.mlp(state["h"]))

    def advance(self, state, tokens):
        return {"h": state["h"] + self.embed(tokens)}

    def index(self, state, idx):
        return {"h": state["h"][idx]}
"""


@pytest.fixture
def extension_dir(tmp_path):
    (tmp_path / "toy_ext.py").write_text(TOY_EXTENSION)
    (tmp_path / "toy_impl.py").write_text(TOY_IMPLEMENTATION)
    return tmp_path


@pytest.fixture
def registry(monkeypatch):
    """Registrations made in a test go to copies of the registry's tables, dropped afterwards."""
    for name in ("LOSSES", "HEAD_FAMILIES", "BY_NAME"):
        monkeypatch.setattr(methods, name, dict(getattr(methods, name)))
    for name in ("METHODS", "NAMES"):
        monkeypatch.setattr(methods, name, list(getattr(methods, name)))


def base_config() -> dict:
    return yaml.safe_load((REPO / "config" / "test.yaml").read_text())


def toy_config(tmp_path):
    raw = base_config()
    raw.update(
        extensions=["toy_ext"],
        losses=["ce", "toy"],
        methods=["dense", "sd2", "toyhead"],
        heads={"methods": ["toyhead"]},
    )
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def with_path(directory) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(directory), os.environ.get("PYTHONPATH", "")])}


def test_the_dag_plans_an_extensions_loss_and_head(extension_dir, tmp_path):
    """A real dry run: the toy loss is a sweep entry (sd2+toy fine-tuned with loss toy), the toy head
    family is trained and measured per target at its default size."""
    proc = subprocess.run(
        snakemake_cmd(tmp_path / "run", "-n", "-p", configfile=toy_config(tmp_path)),
        capture_output=True,
        text=True,
        env=with_path(extension_dir),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    targets = base_config()["targets"]
    finetuned = {}
    for line in text.splitlines():
        if "sd2 finetune " in line:
            settings, labels = (json.loads(v) for v in re.findall(r"--(?:settings|labels) '(\{[^']*\})'", line))
            finetuned[(labels["target"], labels["method"])] = settings["loss"]
    assert {finetuned[(t, "sd2+toy")] for t in targets} == {"toy"} and finetuned[(targets[0], "sd2")] == "ce"
    assert set(re.findall(r"sd2 train-head .*--head (\S+)", text)) == {"toyhead-small"}
    assert len(re.findall(r"^rule train_head:", text, re.M)) == len(targets)
    for t in targets:
        assert f"work/heads/{t}/toyhead-small" in text
        assert f"results/records/humaneval/{t}/toyhead-small/toyhead-s0.json" in text
        assert f"results/records/humaneval/{t}/tiny-draft/sd2+toy-s50.json" in text


def test_a_job_finds_what_the_extensions_registered(extension_dir):
    """Jobs get the config's extensions in SD2_EXTENSIONS (common.smk) and import them on a lookup."""
    code = textwrap.dedent(
        """
        from sd2 import methods
        from sd2.drafters.base import DraftHead
        loss = methods.resolve(methods.loss("toy").objective)
        head = methods.resolve(methods.head_family("toyhead").module)
        print(loss.__name__, issubclass(head, DraftHead))
        """
    )
    env = {**with_path(extension_dir), methods.EXTENSIONS_ENV: "toy_ext"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["half_ce", "True"]


def test_an_unknown_loss_names_the_known_ones():
    raw = {**base_config(), "losses": ["ce", "toy"]}
    with pytest.raises(ConfigError, match=r"config error at losses.1: unknown loss 'toy' \(known: ce, kl, tvdpp"):
        sd2_config.validate(raw)
    with pytest.raises(ConfigError, match=r"unknown loss 'toy' \(known: ce, kl, tvdpp, squarehead, skd, pard\)"):
        methods.loss("toy")


def test_registered_names_join_the_derived_schema_and_patterns(registry):
    methods.register_loss(methods.Loss("toy", "target", "toy", "toy_impl:half_ce"))
    methods.register_method(
        methods.Method("pruned_sd", "pruned_sd", "draft", "pruned", "target", True, None, "#000001")
    )
    cfg = sd2_config.validate({**base_config(), "losses": ["ce", "toy"], "methods": ["sd2", "pruned_sd"]})
    names = {v.name for v in variants.variants(cfg, "tiny-llama", "tiny-draft")}
    assert names == {"sd2", "sd2+toy", "pruned_sd", "pruned_sd+toy"}
    assert re.fullmatch(variants.finetuned_pattern(), "pruned_sd+toy@w4a16-qat")
    assert methods.NAMES[-1] == "pruned_sd" and methods.rank("pruned_sd") == len(methods.NAMES) - 1
    # kl-like: a target teacher across tokenizer families is skipped, not an error.
    assert "do not share a tokenizer" in variants.skip_reason(cfg, "tiny-qwen", "tiny-draft", "sd2", "toy")


def test_a_registered_head_family_gets_its_sizes_and_pattern(registry):
    size = {"layers": {"type": "integer", "minimum": 1}}
    family = methods.HeadFamily("toyhead", "toy_impl:ToyHead", True, size, {"one": {"layers": 1}})
    methods.register_head(family, methods.Method("toyhead", "Toy", "head", None, "target", False, None, "#000002"))
    cfg = sd2_config.validate({**base_config(), "heads": {"methods": ["toyhead"]}})
    assert cfg["heads"]["sizes"]["toyhead"] == {"one": {"layers": 1}}
    assert re.fullmatch(methods.head_pattern(), "toyhead-one") and not re.fullmatch(methods.head_pattern(), "toy-one")
    with pytest.raises(ConfigError, match="heads.sizes.toyhead.big: 'layers' is a required property"):
        sd2_config.validate({**base_config(), "heads": {"methods": ["toyhead"], "sizes": {"toyhead": {"big": {}}}}})


def test_registrations_are_checked(registry):
    toy = methods.Loss("toy", None, "toy", "toy_impl:half_ce")
    assert methods.register_loss(toy) is toy and methods.register_loss(toy) is toy  # a re-imported module
    with pytest.raises(ConfigError, match="loss 'toy' is already registered"):
        methods.register_loss(methods.Loss("toy", "target", "another", "toy_impl:other"))
    with pytest.raises(ConfigError, match="letters, digits and _ only"):
        methods.register_loss(methods.Loss("to+y", None, "toy", "toy_impl:half_ce"))
    with pytest.raises(ConfigError, match=r"unknown start point 'sliced' \(known: dense, pruned, layer_pruned\)"):
        methods.register_method(methods.Method("m", "m", "draft", "sliced", None, True, None, "#000003"))
    with pytest.raises(ConfigError, match="a head: register_head"):
        methods.register_method(methods.Method("m", "m", "head", None, "target", False, None, "#000003"))
    with pytest.raises(ConfigError, match="teacher must be"):
        methods.register_loss(methods.Loss("teach", "oracle", "toy", "toy_impl:half_ce"))
