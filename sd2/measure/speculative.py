"""transformers' assisted generation as a measuring instrument (batch size 1), not a copy of its loop.

sd2.measure.drafts uses it where the teacher-forced walk does not apply (sampling, different
tokenizers) and to cross-check the walk step by step.
Two small observers read what it does:
- `StepStreamer` (a BaseStreamer): `generate()` puts the prompt once, then
  `_assisted_decoding` puts `valid_tokens` once per verification step, i.e. the
  n_matches + 1 target tokens committed by that step (both the same-tokenizer and the
  different-tokenizer paths run that same loop, so these are always target tokens).
- `count_drafted`: wraps the candidate generator's `get_candidates` to record how many
  target tokens the draft proposed per step, which the streamer cannot tell (the draft
  may be capped near max_new_tokens, stop at EOS, or, across tokenizers, re-tokenize
  its k tokens into a different number of target tokens).
"""

import contextlib
import time

import torch
from datasets import load_from_disk
from tqdm.auto import tqdm
from transformers.generation.candidate_generator import (
    AssistantVocabTranslatorCache,
    AssistedCandidateGeneratorDifferentTokenizers,
)
from transformers.generation.streamers import BaseStreamer

from sd2.generation import check_shipped_generation, decoding_kwargs
from sd2.models import same_tokenizer


class StepStreamer(BaseStreamer):
    """Tokens committed per verification step; the first put() is the prompt and is skipped."""

    def __init__(self):
        self.prompt_seen = False
        self.committed = []

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.committed.append(int(value.numel()))  # batch size 1

    def end(self):
        pass


@contextlib.contextmanager
def count_drafted(target, drafted: list):
    """Append, per verification step, the number of target tokens the draft proposed."""
    make_generator = target._get_candidate_generator

    def make_counting_generator(*args, **kwargs):
        generator = make_generator(*args, **kwargs)
        propose = generator.get_candidates

        def get_candidates(input_ids, **kw):
            candidates, logits = propose(input_ids, **kw)
            drafted.append(candidates.shape[1] - input_ids.shape[1])
            return candidates, logits

        generator.get_candidates = get_candidates
        return generator

    # An instance attribute shadows the method for this generate() call only.
    target._get_candidate_generator = make_counting_generator
    try:
        yield
    finally:
        del target._get_candidate_generator


@contextlib.contextmanager
def draft_cache_dropped():
    """Universal assisted generation with the draft re-reading its whole input every step.

    transformers 5.17's re-encoding can replace draft tokens it already cached, and when it also
    appends more than one new token its crop keeps the replaced tokens' keys and values, so the
    draft's proposal then depends on tokens that are no longer its input. Dropping the cache makes
    the loop propose from exactly the ids its re-encoding gives, the rule sd2.measure.cross_tokenizer
    walks; the outputs stay the target's greedy ones either way.
    """
    generator = AssistedCandidateGeneratorDifferentTokenizers
    update = generator._update_past_and_masks

    def without_cache(self, *args, **kwargs):
        self.assistant_kwargs.pop("past_key_values", None)
        return update(self, *args, **kwargs)

    generator._update_past_and_masks = without_cache
    try:
        yield
    finally:
        generator._update_past_and_masks = update


def pin_draft(draft, k: int) -> None:
    """Exactly k draft tokens per step: transformers reads these from the draft's generation_config."""
    draft.generation_config.num_assistant_tokens = k
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0


def decoding_path(target, draft, target_tok, draft_tok) -> str:
    """'assisted' (shared vocabulary) or 'uag' (transformers' different-tokenizer path).

    transformers picks the path by comparing config vocab sizes; tokenizers that differ
    with equal vocab sizes cannot run in transformers 5.17, so that fails here, loudly.
    """
    sizes_differ = target.config.get_text_config().vocab_size != draft.config.get_text_config().vocab_size
    if sizes_differ:
        return "uag"
    if not same_tokenizer(target_tok, draft_tok):
        raise ValueError(
            "draft and target tokenizers differ but their models have the same vocab_size: transformers "
            "assisted generation would mix up token ids and refuses the different-tokenizer path for equal "
            "vocab sizes"
        )
    return "assisted"


def register_unpruned_translator(target, draft, target_tok, draft_tok) -> None:
    """Put a translator that does not prune the draft's lm_head into transformers' cache.

    For UAG sampling transformers builds, by default, a translator that replaces the
    draft's lm_head and input embeddings in place (the draft is then unusable for greedy
    UAG or MACs counting) and that crashes when the draft vocabulary is a subset of the
    target's (no `assistant_overlap_token_ids`). The unpruned translator suppresses the
    draft tokens that have no target counterpart with a logits processor instead: the
    same draft distribution, the model untouched, and the subset case simply has nothing
    to suppress. The cache is keyed by the tokenizer objects, so this must be done per
    (target_tok, draft_tok) pair before the first sampled generate().
    """
    AssistantVocabTranslatorCache.get_translator(
        target_tok,
        draft_tok,
        target.config.get_text_config().vocab_size,
        assistant_model=draft,
        assistant_prune_lm_head=False,
    )


def _timed(fn, device):
    """(result, seconds); waits for queued GPU work so the clock covers all of it."""
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def ar_generate(target, input_ids, gen_kwargs: dict) -> torch.Tensor:
    """New tokens of the target alone."""
    check_shipped_generation(target)
    with torch.no_grad():
        out = target.generate(input_ids, attention_mask=torch.ones_like(input_ids), **gen_kwargs)
    return out[0, input_ids.shape[1] :]


def sd_generate(target, draft, input_ids, gen_kwargs: dict, tokenizers: tuple | None = None):
    """New tokens with the draft, plus per-step (committed, drafted) target-token counts.

    `tokenizers` = (target_tok, draft_tok) selects the different-tokenizer path.
    """
    check_shipped_generation(target)
    check_shipped_generation(draft)
    streamer = StepStreamer()
    drafted = []
    extra = {} if tokenizers is None else {"tokenizer": tokenizers[0], "assistant_tokenizer": tokenizers[1]}
    with torch.no_grad(), count_drafted(target, drafted):
        out = target.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            assistant_model=draft,
            streamer=streamer,
            **extra,
            **gen_kwargs,
        )
    new_tokens = out[0, input_ids.shape[1] :]
    # Guards the counting claims against a transformers upgrade that changes what the streamer sees.
    if len(drafted) != len(streamer.committed) or sum(streamer.committed) != new_tokens.numel():
        raise RuntimeError(
            f"step counting broke: {len(streamer.committed)} streamed steps with {sum(streamer.committed)} tokens, "
            f"{len(drafted)} drafts, {new_tokens.numel()} new tokens"
        )
    return new_tokens, list(zip(streamer.committed, drafted))


def step_stats(generations: list, k: int) -> dict:
    """MAL and acceptance statistics from per-generation lists of (committed, drafted) steps."""
    counted = [step for steps in generations for step in steps[:-1]]
    truncated = sum(1 for steps in generations if steps)
    n_steps = len(counted)
    committed = [c for c, _ in counted]
    accepted_tokens = sum(committed)
    accepted_draft = sum(c - 1 for c in committed)
    drafted = sum(d for _, d in counted)
    # Across tokenizers a step can accept more than k target tokens; the lists grow to fit.
    positions = max([k] + [c - 1 for c in committed])
    longest = max([k + 1] + committed)
    return {
        "n_steps": n_steps,
        "truncated_steps": truncated,
        "accepted_tokens": accepted_tokens,
        "mal": accepted_tokens / n_steps if n_steps else None,
        "drafted_tokens": drafted,
        "accepted_draft_tokens": accepted_draft,
        "acceptance_rate": accepted_draft / drafted if drafted else None,
        "acceptance_by_position": [
            sum(c - 1 > i for c in committed) / n_steps if n_steps else None for i in range(positions)
        ],
        "accepted_length_histogram": [committed.count(n) for n in range(1, longest + 1)],
    }


def load_prompts(eval_dir, n_prompts: int | None) -> list[dict]:
    ds = load_from_disk(str(eval_dir))
    missing = {"id", "prompt"} - set(ds.column_names)
    if missing:
        raise ValueError(f"eval set {eval_dir} lacks columns {sorted(missing)}")
    rows = [{"id": r["id"], "prompt": r["prompt"]} for r in ds]
    return rows if n_prompts is None else rows[:n_prompts]


def assisted_runs(
    target,
    draft,
    target_tok,
    draft_tok,
    prompts: list[list[int]],
    *,
    k: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    desc: str = "",
) -> list[dict]:
    """transformers assisted generation of each prompt (target token ids), batch size 1.

    Per prompt: the new tokens, the per-step (committed, drafted) counts and the wall
    seconds. Sampling is seeded with seed + prompt index before each generate().
    """
    path = decoding_path(target, draft, target_tok, draft_tok)
    tokenizers = (target_tok, draft_tok) if path == "uag" else None
    if path == "uag" and temperature > 0:
        register_unpruned_translator(target, draft, target_tok, draft_tok)
    pin_draft(draft, k)
    gen_kwargs = decoding_kwargs(temperature, max_new_tokens, target_tok.pad_token_id)
    runs = []
    for index, prompt_ids in enumerate(tqdm(prompts, desc=desc or f"assisted k={k} T={temperature:g}", mininterval=5)):
        input_ids = torch.tensor([prompt_ids], device=target.device)
        torch.manual_seed(seed + index)
        (tokens, steps), seconds = _timed(
            lambda input_ids=input_ids: sd_generate(target, draft, input_ids, gen_kwargs, tokenizers), target.device
        )
        runs.append({"tokens": tokens.tolist(), "steps": steps, "seconds": seconds})
    return runs
