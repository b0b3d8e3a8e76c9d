"""The different-tokenizer walks against decoding loops that run both models, step by step.

The pair: a Qwen2 target with the metaspace tokenizer and a Llama draft with the byte-level one,
both fitted to the same stdlib snippets, so the draft's proposals are often right and re-encoding
has multi-token steps to merge across.
"""

import pytest
import torch
from transformers import AutoTokenizer
from transformers.generation.candidate_generator import AssistedCandidateGeneratorDifferentTokenizers

from sd2.generation import decoding_kwargs, model_eos_ids
from sd2.measure import acceptance
from sd2.measure import cross_tokenizer as ct
from sd2.measure.drafts import rollout_steps_agree
from sd2.measure.speculative import assisted_runs, draft_cache_dropped
from sd2.models import build_model

MAX_NEW = 48


def _fit(arch, tokenizer, texts, seed, steps):
    torch.manual_seed(seed)
    model = build_model(
        {
            "arch": arch,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        tokenizer,
        seed,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = [torch.tensor([tokenizer(t)["input_ids"]]) for t in texts]
    for _ in range(steps):
        for ids in batches:
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def fitted_pair(meta_tokenizer_dir, byte_tokenizer_dir, stdlib_texts):
    """(target, draft, target tokenizer, draft tokenizer, items): continuations are the target's greedy ones."""
    target_tok = AutoTokenizer.from_pretrained(meta_tokenizer_dir)
    draft_tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    texts = [t[2000:2400] for t in stdlib_texts if len(t) > 2400][:6]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds contention
    target = _fit("qwen2", target_tok, texts, 0, 40)
    draft = _fit("llama", draft_tok, texts, 1, 40)
    torch.set_num_threads(threads)
    items = []
    for n, text in enumerate(texts):
        prompt = target_tok(text[:100])["input_ids"]
        with torch.no_grad():
            out = target.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                **decoding_kwargs(0.0, MAX_NEW, target_tok.pad_token_id),
            )
        items.append({"id": f"p{n}", "prompt_ids": prompt, "continuation_ids": out[0, len(prompt) :].tolist()})
    return target, draft, target_tok, draft_tok, items


def _transformers_loop(pair, k):
    target, draft, target_tok, draft_tok, items = pair
    prompts = [it["prompt_ids"] for it in items]
    return assisted_runs(
        target, draft, target_tok, draft_tok, prompts, k=k, temperature=0.0, max_new_tokens=MAX_NEW, seed=0
    )


@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_uag_walk_takes_transformers_steps(fitted_pair, k, monkeypatch, one_thread):
    target, draft, target_tok, draft_tok, items = fitted_pair
    merges = []
    prepare = AssistedCandidateGeneratorDifferentTokenizers._prepare_assistant_input_ids

    def counting(self, input_ids):
        ids, replaced = prepare(self, input_ids)
        merges.append(replaced)
        return ids, replaced

    monkeypatch.setattr(AssistedCandidateGeneratorDifferentTokenizers, "_prepare_assistant_input_ids", counting)
    walked, gaps = ct.uag_walk(
        draft, target_tok, draft_tok, items, k=k, max_new_tokens=MAX_NEW, eos_ids=model_eos_ids(target), batch_size=3
    )
    with draft_cache_dropped():
        runs = _transformers_loop(fitted_pair, k)
    for item, run, steps, gap in zip(items, runs, walked, gaps):
        assert run["tokens"] == item["continuation_ids"]
        assert rollout_steps_agree(item, run["steps"], steps, gap, k, "uag")
        assert sum(c for c, _ in steps) == len(item["continuation_ids"])
    committed = [c for steps in walked for c, _ in steps]
    assert max(committed) >= min(k + 1, 3), "the fitted draft should get several tokens right in one step"
    # Re-encoding replaced draft tokens across a step boundary (transformers' discrepancy) somewhere.
    assert any(n > 0 for n in merges)


def test_uag_walk_prefills_admitted_prompts_apart_with_the_same_steps(fitted_pair, monkeypatch, one_thread):
    """A prompt admitted into a running batch is cached by a forward of its own row (DraftRows._prefill): the
    walk takes the same steps as when it is fed through the shared forward of every row."""
    target, draft, target_tok, draft_tok, items = fitted_pair

    def walk():
        eos = model_eos_ids(target)
        walked, _ = ct.uag_walk(
            draft, target_tok, draft_tok, items, k=3, max_new_tokens=MAX_NEW, eos_ids=eos, batch_size=2
        )
        return walked

    monkeypatch.setattr(ct, "PREFILL_MIN", 10**6)
    shared = walk()
    prefills = []
    original = ct.DraftRows._prefill

    def counted(self, rows, feeds):
        prefills.append(rows)
        original(self, rows, feeds)

    monkeypatch.setattr(ct.DraftRows, "_prefill", counted)
    monkeypatch.setattr(ct, "PREFILL_MIN", 0)
    assert walk() == shared
    assert len(prefills) >= len(items) - 2, "every prompt admitted after the first round is prefilled apart"


def test_uag_loop_with_its_cache_kept_is_lossless_too(fitted_pair, one_thread):
    """transformers' own loop (the draft's cache kept, as users run it, and timed by measure) outputs the target's
    greedy continuation; where its steps differ from the walk's, measure counts it in engine_same_steps."""
    runs = _transformers_loop(fitted_pair, 8)
    assert [r["tokens"] for r in runs] == [it["continuation_ids"] for it in fitted_pair[-1]]


class _ListedVocab:
    """A tokenizer whose get_vocab() lists its tokens in a given order, as a fast tokenizer's hash map may."""

    def __init__(self, tokens: list[tuple[str, int]]):
        self.tokens = tokens

    def get_vocab(self) -> dict:
        return dict(self.tokens)

    def encode(self, text, add_special_tokens=False):
        return [dict(self.tokens)["▁" + text.strip()]]

    def convert_ids_to_tokens(self, ids):
        return [{i: t for t, i in self.tokens}[i] for i in ids]


def test_tokens_that_normalize_alike_map_from_the_lowest_id_in_any_order():
    """A metaspace vocabulary holds both "▁" and a literal " ": which one the map keeps must not depend on the
    order get_vocab() lists them in (it changes from process to process)."""
    tokens = [("▁", 6), (" ", 313), ("▁a", 9)]
    for order in (tokens, tokens[::-1]):
        assert ct._normalized_vocab(_ListedVocab(order), 400) == {" ": 6, " a": 9}


def test_vocab_map_matches_space_markers(meta_tokenizer_dir, byte_tokenizer_dir):
    target_tok = AutoTokenizer.from_pretrained(meta_tokenizer_dir)
    draft_tok = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    mapping = ct.vocab_map(target_tok, draft_tok, len(target_tok), len(draft_tok))
    assert 0 < mapping["shared"] < len(target_tok)
    spaced = sorted(
        t for t in target_tok.get_vocab() if t.startswith("▁") and len(t) > 2 and "Ġ" + t[1:] in draft_tok.get_vocab()
    )
    assert spaced, "both tokenizers learn some word with a leading space"
    target_id, draft_id = (
        target_tok.convert_tokens_to_ids(spaced[0]),
        draft_tok.convert_tokens_to_ids("Ġ" + spaced[0][1:]),
    )
    assert int(mapping["target_to_draft"][target_id]) == draft_id and bool(mapping["draft_allowed"][draft_id])
    absent = int((mapping["target_to_draft"] < 0).nonzero()[0])
    assert ct.to_draft_ids(mapping, [absent, target_id]) == [mapping["draft_fallback"], draft_id]


@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_tli_walk_takes_its_loops_steps(fitted_pair, k, one_thread):
    target, draft, target_tok, draft_tok, items = fitted_pair
    mapping = ct.vocab_map(target_tok, draft_tok, target.config.vocab_size, draft.config.vocab_size)
    forced = ct.tli_matches(draft, mapping, items, pad_id=draft_tok.pad_token_id, batch_size=3)
    eos = model_eos_ids(target)
    accepted = 0
    for item, f in zip(items, forced):
        walked = ct.vllm_steps(acceptance.match_runs(f["matches"]), k)
        tokens, real, gaps = ct.tli_generate(
            target, draft, mapping, item["prompt_ids"], k=k, max_new_tokens=MAX_NEW, eos_ids=eos
        )
        assert tokens == item["continuation_ids"]
        assert rollout_steps_agree(item, real, walked, gaps, k, "intersection")
        accepted += sum(c - 1 for c, _ in walked)
    assert accepted > 0


def test_vllm_steps_and_counts_by_hand():
    # y has 8 tokens; the draft gets y[1..3] right from 1, y[5] from 5, nothing else.
    runs = acceptance.match_runs([True, True, True, True, False, True, False, False])
    assert runs == [4, 3, 2, 1, 0, 1, 0, 0]
    # From 1 (y[0] is the prefill's): k = 2 accepts 2 and commits 3; from 4 nothing, 1; from 5 one, 2; from 7, 1.
    assert ct.vllm_steps(runs, 2) == [(3, 2), (1, 2), (2, 2), (1, 2)]
    assert ct.engine_counts(runs, 2) == (3, 4)
    # At k = 8 the last step from 5 matches y[5] and then y[6] fails: 2 committed, 1 accepted.
    assert ct.vllm_steps(runs, 8) == [(4, 8), (2, 8), (1, 8)]
    assert ct.engine_counts(runs, 8) == (4, 3)


def test_verify_gives_the_last_token_back():
    y = [5, 6, 7, 2]
    assert ct.verify([5, 6], y, 0, length_left=4, eos_ids={2}) == 3
    assert ct.verify([5, 9], y, 0, length_left=4, eos_ids={2}) == 2
    # A candidate that reaches the length limit and matches throughout leaves its last token to the target.
    assert ct.verify([6, 7], y, 1, length_left=2, eos_ids={2}) == 2
    assert ct.verify([7, 2], y, 2, length_left=9, eos_ids={2}) == 2
