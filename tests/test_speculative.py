"""transformers' assisted generation as sd2 drives it, on tiny random models.

Step counting, the different-tokenizer path (greedy and sampling, including a draft
vocabulary that is a subset of the target's) and a chi-square test that speculative
sampling reproduces the target's distribution. The walk is compared with it in
test_measure.py. Lengths are short (12 new tokens) because an assisted-generation
step costs tens of milliseconds on 2 shared cores.
"""

import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from sd2.generation import decoding_kwargs
from sd2.measure import speculative as sp
from sd2.models import build_model, load_model, load_tokenizer
from sd2.tokenization import train_tokenizer

PROMPTS = [
    {"id": "add", "prompt": "def add(a, b):\n    return"},
    {"id": "loop", "prompt": "for i in range(10):\n    print("},
    {"id": "cls", "prompt": "import os\n\nclass Path:\n    def"},
]


pytestmark = pytest.mark.usefixtures("one_thread")


def check_consistent(runs, k, prompts):
    """Per-step counts add up to the new tokens; every step commits 1..k+1 target tokens (same tokenizer)."""
    assert len(runs) == len(prompts)
    for run in runs:
        assert sum(c for c, _ in run["steps"]) == len(run["tokens"])
        assert all(1 <= c for c, _ in run["steps"]) and run["seconds"] > 0


def _ids(tok, prompts):
    return [tok(p["prompt"])["input_ids"] for p in prompts]


def test_step_stats_by_hand():
    # two generations; each last step (cut short) is excluded
    generations = [[(4, 3), (1, 3), (2, 3), (1, 1)], [(3, 3), (2, 0)]]
    got = sp.step_stats(generations, k=3)
    assert got["n_steps"] == 4 and got["truncated_steps"] == 2
    assert got["accepted_tokens"] == 10 and got["mal"] == 2.5
    assert got["acceptance_rate"] == 6 / 12
    assert got["accepted_length_histogram"] == [1, 1, 1, 1]
    assert got["acceptance_by_position"] == [3 / 4, 2 / 4, 1 / 4]


def test_different_tokenizers_greedy_and_sampling(tiny_qwen_dir, tiny_llama_draft_dir):
    target, draft = load_model(tiny_qwen_dir), load_model(tiny_llama_draft_dir)
    target_tok, draft_tok = load_tokenizer(tiny_qwen_dir), load_tokenizer(tiny_llama_draft_dir)
    assert sp.decoding_path(target, draft, target_tok, draft_tok) == "uag"
    with torch.no_grad():
        greedy = [
            target.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
            for ids in _ids(target_tok, PROMPTS[:2])
        ]
    for temperature in (0.0, 1.0):
        runs = sp.assisted_runs(
            target,
            draft,
            target_tok,
            draft_tok,
            _ids(target_tok, PROMPTS[:2]),
            k=3,
            temperature=temperature,
            max_new_tokens=12,
            seed=0,
        )
        check_consistent(runs, 3, PROMPTS[:2])
        if temperature == 0:
            assert [r["tokens"] for r in runs] == greedy  # lossless across tokenizers
    # sampling across tokenizers must not have replaced the draft's lm_head (transformers' default does)
    assert isinstance(draft.get_output_embeddings(), torch.nn.Linear)
    assert draft.get_output_embeddings().weight.shape[0] == draft.config.vocab_size


def test_sampling_when_draft_vocab_is_subset(tmp_path, stdlib_texts, tiny_llama_dir):
    """A smaller byte-level BPE on the same corpus is a subset of the target's: transformers' default translator
    crashes there (no overlap ids), so the unpruned one must handle it."""
    small = train_tokenizer("byte_bpe", 300, stdlib_texts, tmp_path / "tok300")
    target_tok = load_tokenizer(tiny_llama_dir)
    assert set(small.get_vocab()) < set(target_tok.get_vocab())
    draft = build_model(
        {"arch": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        small,
        seed=3,
    )
    draft_tok = AutoTokenizer.from_pretrained(tmp_path / "tok300")
    target = load_model(tiny_llama_dir)
    assert sp.decoding_path(target, draft.eval(), target_tok, draft_tok) == "uag"
    runs = sp.assisted_runs(
        target,
        draft,
        target_tok,
        draft_tok,
        _ids(target_tok, PROMPTS[:1]),
        k=3,
        temperature=1.0,
        max_new_tokens=12,
        seed=0,
    )
    check_consistent(runs, 3, PROMPTS[:1])


def test_equal_vocab_different_tokenizers_refused(byte_tokenizer_dir, meta_tokenizer_dir):
    model = types.SimpleNamespace(config=LlamaConfig(vocab_size=512))
    byte_tok, meta_tok = (
        AutoTokenizer.from_pretrained(byte_tokenizer_dir),
        AutoTokenizer.from_pretrained(meta_tokenizer_dir),
    )
    with pytest.raises(ValueError, match="same vocab_size"):
        sp.decoding_path(model, model, byte_tok, meta_tok)
    assert sp.decoding_path(model, model, byte_tok, byte_tok) == "assisted"


def _tiny_vocab_model(seed: int, scale: float):
    config = LlamaConfig(
        vocab_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
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
    gen_kwargs = decoding_kwargs(1.0, max_new_tokens=2, pad_token_id=0)
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
