"""The vLLM engine's glue (sd2.generation), against a FAKE `vllm` module: vLLM is not installed here.

The fake records what sd2 passes to LLM, SamplingParams and TokensPrompt, and answers like
vLLM's RequestOutput / CompletionOutput (.outputs[0].token_ids, .text, .finish_reason,
.stop_reason), generating the token ids with the tiny real model one prompt at a time, so the
rows sd2 writes from them can be compared with the transformers path's. Nothing here runs vLLM.
"""

import json
import shutil
import sys
import types

import pytest
import torch
from datasets import Dataset, load_from_disk

from sd2 import chat, generation
from sd2.drafts.distill import partial_dir, self_distill
from sd2.measure import continuations
from sd2.models import load_model, load_tokenizer

PROMPTS = [
    'def add(a, b):\n    """Return a + b."""\n',
    "import os\n",
    "class Stack:\n    def push(self, item):\n",
    "def f(x):\n    return x ** 2  # ünïcode\n",
    "x",
]
VLLM = {"name": "vllm", "gpu_memory_utilization": 0.8, "max_model_len": None}
TRANSFORMERS = {"name": "transformers", "gpu_memory_utilization": 0.9, "max_model_len": None}
DISTILL = dict(max_prompts=None, max_prompt_tokens=None, shard_batches=20, chat=None, engine=TRANSFORMERS)


class FakeVLLM(types.ModuleType):
    """vllm's LLM, SamplingParams and TokensPrompt as sd2 calls them; every LLM built and generate call recorded."""

    def __init__(self):
        super().__init__("vllm")
        self.llms, self.calls, self.fail_on_call = [], [], None
        fake = self

        class LLM:
            def __init__(self, **kwargs):
                self.kwargs = kwargs
                self.model = load_model(kwargs["model"])
                fake.llms.append(self)

            def generate(self, prompts, sampling_params):
                fake.calls.append((prompts, sampling_params))
                if fake.fail_on_call == len(fake.calls):
                    raise RuntimeError("killed")
                return [self._one(p["prompt_token_ids"], sp) for p, sp in zip(prompts, sampling_params, strict=True)]

            def _one(self, ids, sp):
                # One prompt, no padding: what vLLM computes, up to kernel numerics.
                if sp.temperature > 0:
                    torch.manual_seed(sp.seed)
                with torch.no_grad():
                    out = self.model.generate(
                        torch.tensor([ids]),
                        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        max_new_tokens=sp.max_tokens,
                        do_sample=sp.temperature > 0,
                        temperature=sp.temperature or None,
                        top_k=0 if sp.temperature > 0 else None,
                        top_p=None,
                        repetition_penalty=1.0,
                        eos_token_id=sp.stop_token_ids,
                        pad_token_id=0,
                    )
                new = out[0, len(ids) :].tolist()
                stopped = bool(new) and new[-1] in sp.stop_token_ids
                completion = types.SimpleNamespace(
                    index=0,
                    text="(vLLM's own detokenization, unused)",
                    token_ids=new,  # vLLM keeps the stop token id in token_ids
                    finish_reason="stop" if stopped else "length",
                    stop_reason=new[-1] if stopped else None,
                )
                return types.SimpleNamespace(prompt_token_ids=ids, outputs=[completion])

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs
                self.__dict__.update(kwargs)

        self.LLM, self.SamplingParams = LLM, SamplingParams
        self.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}  # a TypedDict in vLLM


@pytest.fixture
def fake_vllm(monkeypatch):
    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    return fake


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prompts")
    Dataset.from_list([{"id": f"p{i}", "prompt": p, "response": f"o{i}"} for i, p in enumerate(PROMPTS)]).save_to_disk(
        str(out)
    )
    return out


def pure(temperature, max_tokens, eos, seed):
    return {
        "temperature": temperature,
        "top_p": 1.0,
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": max_tokens,
        "stop_token_ids": eos,
        "ignore_eos": False,
        "seed": seed,
    }


@pytest.mark.parametrize("target", ["tiny_llama_dir", "hub_llama_dir"])
def test_self_distill_with_vllm_writes_what_transformers_writes(
    request, target, prompts_dir, tmp_path, fake_vllm, one_thread
):
    target_dir = request.getfixturevalue(target)
    settings = dict(DISTILL, max_new_tokens=10, temperature=0.0, batch_size=2, shard_batches=2)
    self_distill(target_dir, prompts_dir, tmp_path / "hf", settings=settings, seed=0)
    self_distill(target_dir, prompts_dir, tmp_path / "vllm", settings={**settings, "engine": VLLM}, seed=0, gpus=2)
    assert load_from_disk(str(tmp_path / "vllm")).to_dict() == load_from_disk(str(tmp_path / "hf")).to_dict()

    (llm,) = fake_vllm.llms
    assert llm.kwargs == {
        "model": str(target_dir),
        "dtype": "auto",
        "tensor_parallel_size": 2,  # the job's --gpus
        "seed": 0,
        "trust_remote_code": False,
        "gpu_memory_utilization": 0.8,
        "max_model_len": max(len(chat.prompt_ids(load_tokenizer(target_dir), p, None)) for p in PROMPTS) + 10,
        "generation_config": "vllm",  # the checkpoint's generation_config.json stays out
    }
    # 5 prompts in batches of 2, 2 batches a shard: one generate call per shard, 4 + 1 prompts.
    assert [len(prompts) for prompts, _ in fake_vllm.calls] == [4, 1]
    tok = load_tokenizer(target_dir)
    sent = [p["prompt_token_ids"] for prompts, _ in fake_vllm.calls for p in prompts]
    assert sorted(sent) == sorted(chat.prompt_ids(tok, p, None) for p in PROMPTS)  # sd2.chat's ids, as transformers
    eos = load_model(target_dir).generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    for _, params in fake_vllm.calls:
        assert all(sp.kwargs == pure(0.0, 10, eos, None) for sp in params)
    info = json.loads((tmp_path / "vllm" / "settings.json").read_text())["settings"]
    assert info["engine"] == VLLM and info["padding"] is None


def test_sampling_is_pure_and_seeded_per_prompt(tiny_llama_dir, prompts_dir, tmp_path, fake_vllm, one_thread):
    settings = dict(DISTILL, max_new_tokens=6, temperature=0.7, batch_size=5, engine=VLLM)
    self_distill(tiny_llama_dir, prompts_dir, tmp_path / "a", settings=settings, seed=7)
    assert fake_vllm.llms[0].kwargs["tensor_parallel_size"] == 1  # no --gpus: one GPU
    ((prompts, params),) = fake_vllm.calls
    tok = load_tokenizer(tiny_llama_dir)
    longest = max(len(chat.prompt_ids(tok, p, None)) for p in PROMPTS)
    assert fake_vllm.llms[0].kwargs["max_model_len"] == longest + 6  # the longest prompt + max_new_tokens
    order = sorted(range(len(PROMPTS)), key=lambda i: len(PROMPTS[i]))
    assert [p["prompt_token_ids"] for p in prompts] == [chat.prompt_ids(tok, PROMPTS[i], None) for i in order]
    assert [sp.kwargs for sp in params] == [pure(0.7, 6, [tok.eos_token_id], 7 + i) for i in order]


def test_killed_vllm_run_resumes_from_its_shards(tiny_llama_dir, prompts_dir, tmp_path, fake_vllm, capsys, one_thread):
    settings = dict(DISTILL, max_new_tokens=6, temperature=1.0, batch_size=2, shard_batches=1, engine=VLLM)
    self_distill(tiny_llama_dir, prompts_dir, tmp_path / "whole", settings=settings, seed=3)
    whole = load_from_disk(str(tmp_path / "whole")).to_dict()
    out = tmp_path / "killed"
    fake_vllm.calls, fake_vllm.fail_on_call = [], 2
    with pytest.raises(RuntimeError, match="killed"):
        self_distill(tiny_llama_dir, prompts_dir, out, settings=settings, seed=3)
    assert [p.name for p in partial_dir(out).glob("shard-*.json")] == ["shard-00000.json"]
    fake_vllm.calls, fake_vllm.fail_on_call = [], None
    self_distill(tiny_llama_dir, prompts_dir, out, settings=settings, seed=3)
    assert "resuming from 1 shard(s)" in capsys.readouterr().out
    assert len(fake_vllm.calls) == 2  # only the two shards not written before
    assert load_from_disk(str(out)).to_dict() == whole


def test_rows_from_each_kind_of_vllm_ending(byte_tokenizer_dir, monkeypatch):
    tok = load_tokenizer(byte_tokenizer_dir)
    eos, other = tok.eos_token_id, tok("ab", add_special_tokens=False)["input_ids"]
    endings = [
        (other + [eos], "stop", None),  # the model's EOS, kept in token_ids (vLLM v1)
        (other, "stop", eos),  # a stop token id vLLM left out of token_ids
        (other, "length", None),  # max_tokens reached
    ]

    class LLM:
        def generate(self, prompts, params):
            return [
                types.SimpleNamespace(
                    outputs=[types.SimpleNamespace(token_ids=ids, text="", finish_reason=why, stop_reason=reason)]
                )
                for ids, why, reason in endings
            ]

    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    rows = generation.generate_vllm(LLM(), tok, ["x"] * 3, max_new_tokens=8, temperature=0.0, eos=[eos], seeds=[0] * 3)
    head = chat.prompt_ids(tok, "x", None)
    assert [r["new_ids"] for r in rows] == [other + [eos], other + [eos], other]
    assert [r["finished"] for r in rows] == [True, True, False]
    assert [r["new_tokens"] for r in rows] == [len(other) + 1, len(other) + 1, len(other)]
    assert all(r["prompt_ids"] == head and r["response"] == generation.decode_response(tok, head, other) for r in rows)


def test_target_outputs_with_vllm(tiny_llama_dir, prompts_dir, tmp_path, fake_vllm, one_thread):
    settings = {
        "max_new_tokens": 8,
        "n_prompts": None,
        "n_check": 3,
        "warmup_prompts": 1,
        "batch_size": 2,
        "chat": None,
        "engine": TRANSFORMERS,
    }
    hf = continuations.target_outputs(tiny_llama_dir, prompts_dir, tmp_path / "hf.json", settings=settings, seed=0)
    vl = continuations.target_outputs(
        tiny_llama_dir, prompts_dir, tmp_path / "vllm.json", settings={**settings, "engine": VLLM}, seed=0, gpus=4
    )
    assert vl["items"] == hf["items"]
    assert fake_vllm.llms[0].kwargs["tensor_parallel_size"] == 4
    assert fake_vllm.llms[0].kwargs["max_model_len"] == max(len(i["prompt_ids"]) for i in hf["items"]) + 8
    ((prompts, params),) = fake_vllm.calls
    # One call, the prompts in the batches' order (by length), as transformers batches them.
    order = sorted(range(len(PROMPTS)), key=lambda i: len(PROMPTS[i]))
    assert [p["prompt_token_ids"] for p in prompts] == [hf["items"][i]["prompt_ids"] for i in order]
    assert all(sp.kwargs == pure(0.0, 8, params[0].kwargs["stop_token_ids"], None) for sp in params)
    # The batch-1 timing of the target alone ran on transformers, on the same prompts.
    assert vl["timing"]["timed_prompts"] == 2 and vl["timing"]["ar_tokens"] > 0
    assert vl["timing"]["batch1_differs"] == hf["timing"]["batch1_differs"] == []
    assert vl["provenance"]["settings"]["engine"] == VLLM


def test_engine_max_model_len_overrides_the_longest_prompt(tiny_llama_dir, fake_vllm):
    generation.load_llm(
        tiny_llama_dir,
        {**VLLM, "max_model_len": 4096},
        dtype="bfloat16",
        gpus=8,
        seed=1,
        trust_remote_code=True,
        max_model_len=100,
    )
    kwargs = fake_vllm.llms[0].kwargs
    assert (kwargs["max_model_len"], kwargs["dtype"], kwargs["tensor_parallel_size"]) == (4096, "bfloat16", 8)
    assert kwargs["seed"] == 1 and kwargs["trust_remote_code"] is True


def test_missing_vllm_names_the_setting_and_the_install(monkeypatch, tiny_llama_dir, prompts_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets where it is not installed
    settings = dict(DISTILL, max_new_tokens=4, temperature=0.0, batch_size=2, engine=VLLM)
    with pytest.raises(ImportError, match=r"engine.name: vllm .*`pip install vllm`"):
        self_distill(tiny_llama_dir, prompts_dir, tmp_path / "out", settings=settings, seed=0)


def test_eos_ids_are_those_transformers_stops_at(hub_llama_dir, tiny_qwen_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_qwen_dir, bare)
    (bare / "generation_config.json").unlink(missing_ok=True)
    for target in (hub_llama_dir, bare):  # a generation_config.json with a list of ids, and none at all
        eos = load_model(target).generation_config.eos_token_id
        assert generation.eos_ids(target) == (eos if isinstance(eos, list) else [eos])
