"""Speculative decoding measurements on tiny random models.

Random tiny models stop at EOS at random points, so these runs set `ignore_eos`
(min_new_tokens = max_new_tokens): every generation has the same length and every
step count below is deterministic. Lengths are short (12-16 new tokens) because a
transformers assisted-generation step costs tens of milliseconds on 2 shared cores.
"""

import copy
import json
import types

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from sd2 import speculative as sp
from sd2.models import build_model, load_model, load_tokenizer
from sd2.tokenization import train_tokenizer

PROMPTS = [
    {"id": "add", "prompt": "def add(a, b):\n    return"},
    {"id": "loop", "prompt": "for i in range(10):\n    print("},
    {"id": "cls", "prompt": "import os\n\nclass Path:\n    def"},
]
SETTINGS = {"k": [3], "temperatures": [0.0], "max_new_tokens": 16, "n_prompts": 2, "warmup_prompts": 1, "ignore_eos": True}
LABELS = {"target": "tiny", "draft": "tiny", "method": "dense", "sparsity": 0, "eval_set": "toy"}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls on 2 shared cores: a second thread only adds contention (10x slower here).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    Dataset.from_list(PROMPTS).save_to_disk(str(out))
    return out


def check_consistent(record, k):
    assert record["mal"] * record["n_steps"] == pytest.approx(record["accepted_tokens"])
    assert sum(record["accepted_length_histogram"]) == record["n_steps"]
    assert len(record["accepted_length_histogram"]) >= k + 1
    assert len(record["acceptance_by_position"]) >= k
    assert record["truncated_steps"] == record["n_prompts"]
    assert 1 <= record["mal"]
    assert record["accepted_draft_tokens"] == record["accepted_tokens"] - record["n_steps"]
    # position i accepted implies position i-1 accepted
    shares = record["acceptance_by_position"]
    assert all(a >= b for a, b in zip(shares, shares[1:]))


def test_step_stats_by_hand():
    # two generations; each last step (cut short) is excluded
    generations = [[(4, 3), (1, 3), (2, 3), (1, 1)], [(3, 3), (2, 0)]]
    got = sp.step_stats(generations, k=3)
    assert got["n_steps"] == 4 and got["truncated_steps"] == 2
    assert got["accepted_tokens"] == 10 and got["mal"] == 2.5
    assert got["acceptance_rate"] == 6 / 12
    assert got["accepted_length_histogram"] == [1, 1, 1, 1]
    assert got["acceptance_by_position"] == [3 / 4, 2 / 4, 1 / 4]


def test_identical_draft_greedy_measure(tmp_path, tiny_llama_dir, eval_dir):
    logged = []
    run = types.SimpleNamespace(log=logged.append)
    out = tmp_path / "record.json"
    result = sp.measure(tiny_llama_dir, tiny_llama_dir, eval_dir, out, settings=SETTINGS, labels=LABELS, seed=0, run=run)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))
    assert "mal" in result["definitions"] and "improvement_factor" in result["definitions"]
    (record,) = result["records"]
    check_consistent(record, 3)
    # every counted (non-final) step commits all k draft tokens plus the bonus token
    assert record["mal"] == 4.0 and record["acceptance_rate"] == 1.0
    assert record["accepted_length_histogram"] == [0, 0, 0, record["n_steps"]]
    assert record["n_steps"] == 2 * 3  # 16 tokens = 3 full steps of 4 + a final step of 4, per prompt
    assert record["lossless_checked"] == 2 and record["same_tokenizer"] and record["decoding_path"] == "assisted"
    assert record["improvement_factor"] == pytest.approx(4.0 / (1 + 3 * 1.0))
    assert record["draft_macs_per_token"] == record["target_macs_per_token"]
    assert record["speedup"] == pytest.approx(record["sd_tokens_per_s"] / record["ar_tokens_per_s"])
    assert record["provenance"]["seed"] == 0 and record["method"] == "dense"
    assert logged and logged[0]["mal"] == 4.0


def _reinit_layers(model, std: float, seed: int):
    """A random model whose layers matter: at init scale a tied random model just repeats its last token."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, std)
    return model


def test_perturbed_draft_partial_acceptance(tiny_llama_dir):
    target = _reinit_layers(load_model(tiny_llama_dir), std=0.2, seed=0)
    tok = load_tokenizer(tiny_llama_dir)
    draft = copy.deepcopy(target)
    torch.manual_seed(5)
    with torch.no_grad():
        for module in draft.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(0.02 * torch.randn_like(module.weight))  # 10% of the weights' scale
    # greedy: run_setting raises if the output differs from the target's own greedy output
    record = sp.run_setting(target, draft, tok, tok, PROMPTS[:2], k=3, temperature=0.0, max_new_tokens=16,
                            seed=0, warmup_prompts=1, ignore_eos=True)
    check_consistent(record, 3)
    assert 1.0 < record["mal"] < 4.0, record["accepted_length_histogram"]
    assert 0.0 < record["acceptance_rate"] < 1.0
    assert record["lossless_checked"] == 2
    # sampled: near-uniform random distributions accept almost everything, so only consistency is checked here;
    # the distribution test below covers acceptance and rejection under sampling
    record = sp.run_setting(target, draft, tok, tok, PROMPTS[:2], k=3, temperature=1.0, max_new_tokens=16,
                            seed=0, warmup_prompts=1, ignore_eos=True)
    check_consistent(record, 3)
    assert record["lossless_checked"] == 0


def test_lossless_mismatch_names_prompt(monkeypatch, tiny_llama_dir):
    target = load_model(tiny_llama_dir)
    tok = load_tokenizer(tiny_llama_dir)
    real = sp.sd_generate

    def corrupted(*args, **kwargs):
        tokens, steps = real(*args, **kwargs)
        return (tokens + 1) % 100, steps

    monkeypatch.setattr(sp, "sd_generate", corrupted)
    with pytest.raises(AssertionError, match="'loop'"):
        sp.run_setting(target, target, tok, tok, PROMPTS[1:2], k=2, temperature=0.0, max_new_tokens=4, seed=0,
                       warmup_prompts=0, ignore_eos=True)


def test_different_tokenizers_greedy_and_sampling(tiny_qwen_dir, tiny_llama_draft_dir):
    target, draft = load_model(tiny_qwen_dir), load_model(tiny_llama_draft_dir)
    target_tok, draft_tok = load_tokenizer(tiny_qwen_dir), load_tokenizer(tiny_llama_draft_dir)
    for temperature in (0.0, 1.0):
        record = sp.run_setting(target, draft, target_tok, draft_tok, PROMPTS[:2], k=3, temperature=temperature,
                                max_new_tokens=12, seed=0, warmup_prompts=1, ignore_eos=True)
        check_consistent(record, 3)
        assert record["decoding_path"] == "uag"
        assert record["lossless_checked"] == (2 if temperature == 0 else 0)
    # sampling across tokenizers must not have replaced the draft's lm_head (transformers' default does)
    assert isinstance(draft.get_output_embeddings(), torch.nn.Linear)
    assert draft.get_output_embeddings().weight.shape[0] == draft.config.vocab_size


def test_sampling_when_draft_vocab_is_subset(tmp_path, stdlib_texts, tiny_llama_dir):
    """The case the GUIDE warns about: a smaller byte-level BPE on the same corpus is a subset of the target's."""
    small = train_tokenizer("byte_bpe", 300, stdlib_texts, tmp_path / "tok300")
    target_tok = load_tokenizer(tiny_llama_dir)
    assert set(small.get_vocab()) < set(target_tok.get_vocab())
    draft = build_model({"arch": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                         "num_attention_heads": 2}, small, seed=3)
    draft_tok = AutoTokenizer.from_pretrained(tmp_path / "tok300")
    record = sp.run_setting(load_model(tiny_llama_dir), draft.eval(), target_tok, draft_tok, PROMPTS[:1], k=3,
                            temperature=1.0, max_new_tokens=12, seed=0, warmup_prompts=0, ignore_eos=True)
    check_consistent(record, 3)
    assert record["decoding_path"] == "uag"


def test_equal_vocab_different_tokenizers_refused(byte_tokenizer_dir, meta_tokenizer_dir):
    model = types.SimpleNamespace(config=LlamaConfig(vocab_size=512))
    byte_tok, meta_tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir), AutoTokenizer.from_pretrained(meta_tokenizer_dir)
    with pytest.raises(ValueError, match="same vocab_size"):
        sp.decoding_path(model, model, byte_tok, meta_tok)
    assert sp.decoding_path(model, model, byte_tok, byte_tok) == "assisted"


def _tiny_vocab_model(seed: int, scale: float):
    config = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)  # random init gives near-uniform logits; spread them out
    return model


# Pearson chi-square critical values at p = 0.001 by degrees of freedom
CHI2_CRIT_0001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def _chi2(counts, probs):
    """Pearson statistic and degrees of freedom, pooling cells with expected count < 5."""
    n = counts.sum()
    order = torch.argsort(probs, descending=True)
    cells, pooled_obs, pooled_exp = [], 0.0, 0.0
    for i in order.tolist():
        if n * probs[i] >= 5:
            cells.append((float(counts[i]), float(n * probs[i])))
        else:
            pooled_obs, pooled_exp = pooled_obs + float(counts[i]), pooled_exp + float(n * probs[i])
    if pooled_exp > 0:
        cells.append((pooled_obs, pooled_exp))
    return sum((o - e) ** 2 / e for o, e in cells), len(cells) - 1


def test_speculative_sampling_matches_target_distribution():
    """First generated token over 400 seeds vs the target's exact distribution p (not the draft's q)."""
    target, draft = _tiny_vocab_model(0, 15.0), _tiny_vocab_model(1, 15.0)
    prompt = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        p = target(prompt).logits[0, -1].softmax(-1)
        q = draft(prompt).logits[0, -1].softmax(-1)
    assert 0.5 * (p - q).abs().sum() > 0.3  # the draft really differs, so rejections happen
    sp.pin_draft(draft, 1)
    gen_kwargs = sp.decoding_kwargs(1.0, max_new_tokens=2, pad_token_id=0)
    n = 400
    counts = torch.zeros(8)
    first_step = []
    for i in range(n):
        torch.manual_seed(1000 + i)
        tokens, steps = sp.sd_generate(target, draft, prompt, gen_kwargs)
        counts[tokens[0]] += 1
        first_step.append(steps[0])
    assert {c for c, _ in first_step} == {1, 2}  # both accepted and rejected draft tokens occurred
    assert all(d == 1 for _, d in first_step)
    stat, dof = _chi2(counts, p)
    assert stat < CHI2_CRIT_0001[dof], (stat, dof, counts.tolist(), p.tolist())
    # the same test rejects the draft's own distribution, so it has the power to catch a wrong sampler
    wrong, dof_q = _chi2(q * n, p)
    assert wrong > CHI2_CRIT_0001[dof_q]
