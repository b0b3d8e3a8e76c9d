"""Rule `measure`: Mean Accepted Length, acceptance, lossless check and tokens/s of a draft-target pair.

The engine is transformers' assisted generation (batch size 1), not a copy of its loop.
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
from transformers.generation.streamers import BaseStreamer

DEFINITIONS = {
    "mal": "Mean Accepted Length (tau, block efficiency): mean number of target tokens committed per target "
    "verification step, including the target's bonus/correction token (= mean(n_matches) + 1), range 1..k+1 "
    "for a same-tokenizer pair. The last step of every generation (the one that ends it by max_new_tokens "
    "or EOS) is excluded from MAL and counted in truncated_steps; mal * n_steps == accepted_tokens.",
    "acceptance_rate": "accepted draft tokens / drafted tokens over the counted steps (Leviathan et al. 2023 "
    "acceptance rule; greedy decoding accepts while the draft token equals the target's argmax).",
    "acceptance_by_position": "share of counted steps in which draft position i (0-based) was accepted.",
    "accepted_length_histogram": "number of counted steps that committed 1, 2, ... tokens (index 0 = 1 token).",
    "different_tokenizers": "for a draft with a different tokenizer (Universal Assisted Generation), drafted "
    "tokens, positions, MAL and the histogram are counted in TARGET tokens: the draft's k tokens are "
    "re-tokenized for the target, so in greedy mode a step may propose more (or fewer) than k target tokens "
    "and the position/histogram lists are then longer than k / k+1.",
    "macs_per_token": "per-token multiply-accumulates of the linear layers (q, k, v, o, MLP, lm_head) counted "
    "from the non-zero weights of the checkpoint (sd2.macs.model_macs); embedding lookups cost 0; "
    "attention-score MACs grow with context and are not included (see `python -m sd2 macs`).",
    "improvement_factor": "theoretical improvement factor MAL / (1 + k * c), c = draft MACs / target MACs "
    "per token (Leviathan's wall-time formula with the cost ratio taken from MACs).",
    "tokens_per_s": "new tokens / wall-clock seconds of generate(), batch size 1, same prompts and token count "
    "for the target alone (ar) and with the draft (sd); the first warmup_prompts prompts are run but not "
    "timed; speedup = sd_tokens_per_s / ar_tokens_per_s.",
    "lossless_checked": "number of prompts whose greedy speculative output was checked to equal the target's "
    "own greedy output token for token (0 for sampled decoding).",
    "sampling": "temperature 0 is greedy; temperature T > 0 is pure sampling (top_k=0, top_p=1) at T, "
    "seeded with torch.manual_seed(seed + prompt index) before each generate().",
    "prompts": "the eval prompt is tokenized as raw text by the target tokenizer (no chat template).",
}


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


def pin_draft(draft, k: int) -> None:
    """Exactly k draft tokens per step: transformers reads these from the draft's generation_config."""
    draft.generation_config.num_assistant_tokens = k
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0


def decoding_kwargs(temperature: float, max_new_tokens: int, pad_token_id, ignore_eos: bool = False) -> dict:
    """generate() keywords shared by the target alone and the speculative run."""
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_token_id)
    if temperature == 0:
        kwargs.update(do_sample=False)
    else:
        # Override whatever top-k/top-p a checkpoint ships: we measure pure sampling at T.
        kwargs.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
    if ignore_eos:
        # Fixed-length generations: random tiny models otherwise stop early at EOS.
        kwargs.update(min_new_tokens=max_new_tokens)
    return kwargs


def decoding_path(target, draft, target_tok, draft_tok) -> str:
    """'assisted' (shared vocabulary) or 'uag' (transformers' different-tokenizer path).

    transformers picks the path by comparing config vocab sizes; tokenizers that differ
    with equal vocab sizes cannot run in transformers 5.17, so that fails here, loudly.
    """
    from sd2.models import same_tokenizer

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
    from transformers.generation.candidate_generator import AssistantVocabTranslatorCache

    AssistantVocabTranslatorCache.get_translator(
        target_tok,
        draft_tok,
        target.config.get_text_config().vocab_size,
        assistant_model=draft,
        assistant_prune_lm_head=False,
    )


def load_checkpoint(name_or_path, trust_remote_code: bool = False, device: str | None = None):
    """(model, tokenizer) on `device` (default: cuda when available, else cpu), in float32."""
    from sd2.models import load_model, load_tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(name_or_path, trust_remote_code=trust_remote_code).to(device)
    return model, load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)


def _timed(fn, device):
    """(result, seconds); waits for queued GPU work so the clock covers all of it."""
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def ar_generate(target, input_ids, gen_kwargs: dict) -> torch.Tensor:
    """New tokens of the target alone."""
    with torch.no_grad():
        out = target.generate(input_ids, attention_mask=torch.ones_like(input_ids), **gen_kwargs)
    return out[0, input_ids.shape[1]:]


def sd_generate(target, draft, input_ids, gen_kwargs: dict, tokenizers: tuple | None = None):
    """New tokens with the draft, plus per-step (committed, drafted) target-token counts.

    `tokenizers` = (target_tok, draft_tok) selects the different-tokenizer path.
    """
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
    new_tokens = out[0, input_ids.shape[1]:]
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
        "acceptance_by_position": [sum(c - 1 > i for c in committed) / n_steps if n_steps else None for i in range(positions)],
        "accepted_length_histogram": [committed.count(n) for n in range(1, longest + 1)],
    }


def load_prompts(eval_dir, n_prompts: int | None) -> list[dict]:
    from datasets import load_from_disk

    ds = load_from_disk(str(eval_dir))
    missing = {"id", "prompt"} - set(ds.column_names)
    if missing:
        raise ValueError(f"eval set {eval_dir} lacks columns {sorted(missing)}")
    rows = [{"id": r["id"], "prompt": r["prompt"]} for r in ds]
    return rows if n_prompts is None else rows[:n_prompts]


def run_setting(target, draft, target_tok, draft_tok, prompts: list[dict], *, k: int, temperature: float,
                max_new_tokens: int, seed: int, warmup_prompts: int, ignore_eos: bool = False, desc: str = "") -> dict:
    """Target alone and target + draft on the same prompts, interleaved per prompt so both see the same machine state."""
    from tqdm import tqdm

    path = decoding_path(target, draft, target_tok, draft_tok)
    tokenizers = (target_tok, draft_tok) if path == "uag" else None
    if path == "uag" and temperature > 0:
        register_unpruned_translator(target, draft, target_tok, draft_tok)
    pin_draft(draft, k)
    gen_kwargs = decoding_kwargs(temperature, max_new_tokens, target_tok.pad_token_id, ignore_eos)
    generations = []
    timing = {"ar_seconds": 0.0, "sd_seconds": 0.0, "ar_tokens": 0, "sd_tokens": 0}
    for index, row in enumerate(tqdm(prompts, desc=desc or f"k={k} T={temperature}")):
        input_ids = target_tok(row["prompt"], return_tensors="pt")["input_ids"].to(target.device)
        if input_ids.shape[1] == 0:
            raise ValueError(f"prompt id {row['id']!r} is empty after tokenization")
        torch.manual_seed(seed + index)
        ar_tokens, ar_seconds = _timed(lambda: ar_generate(target, input_ids, gen_kwargs), target.device)
        torch.manual_seed(seed + index)
        (sd_tokens, steps), sd_seconds = _timed(
            lambda: sd_generate(target, draft, input_ids, gen_kwargs, tokenizers), target.device
        )
        if temperature == 0 and not torch.equal(ar_tokens, sd_tokens):
            raise AssertionError(
                f"speculative greedy output differs from the target's greedy output for prompt id {row['id']!r} "
                f"(k={k}): {sd_tokens.tolist()} vs {ar_tokens.tolist()}"
            )
        generations.append(steps)
        if index >= warmup_prompts:
            timing["ar_seconds"] += ar_seconds
            timing["sd_seconds"] += sd_seconds
            timing["ar_tokens"] += ar_tokens.numel()
            timing["sd_tokens"] += sd_tokens.numel()
    ar_rate = timing["ar_tokens"] / timing["ar_seconds"] if timing["ar_seconds"] else None
    sd_rate = timing["sd_tokens"] / timing["sd_seconds"] if timing["sd_seconds"] else None
    return {
        "k": k,
        "temperature": temperature,
        "n_prompts": len(prompts),
        "timed_prompts": max(0, len(prompts) - warmup_prompts),
        **step_stats(generations, k),
        "ar_tokens_per_s": ar_rate,
        "sd_tokens_per_s": sd_rate,
        "speedup": sd_rate / ar_rate if ar_rate and sd_rate else None,
        **timing,
        "decoding_path": path,
        "lossless_checked": len(prompts) if temperature == 0 else 0,
    }


def measure(target_dir, draft_dir, eval_dir, out_path, *, settings: dict, labels: dict, seed: int, run=None,
            trust_remote_code: bool = False, device: str | None = None) -> dict:
    """One record per (k, temperature) in settings; written as one JSON file at out_path.

    Optional settings beyond k/temperatures/max_new_tokens/n_prompts/warmup_prompts:
    `ignore_eos` (default False) forces every generation to max_new_tokens.
    """
    from sd2.macs import model_macs
    from sd2.models import same_tokenizer
    from sd2.provenance import provenance, write_json

    target, target_tok = load_checkpoint(target_dir, trust_remote_code, device)
    draft, draft_tok = load_checkpoint(draft_dir, trust_remote_code, device)
    prompts = load_prompts(eval_dir, settings.get("n_prompts"))
    target_macs = model_macs(target)["macs_per_token"]
    draft_macs = model_macs(draft)["macs_per_token"]
    cost_ratio = draft_macs / target_macs
    shared = same_tokenizer(target_tok, draft_tok)
    records = []
    for temperature in settings["temperatures"]:
        for k in settings["k"]:
            result = run_setting(
                target, draft, target_tok, draft_tok, prompts,
                k=k, temperature=temperature, max_new_tokens=settings["max_new_tokens"], seed=seed,
                warmup_prompts=settings["warmup_prompts"], ignore_eos=settings["ignore_eos"],
            )
            mal = result["mal"]
            record = {
                **{key: labels.get(key) for key in ("target", "draft", "method", "sparsity", "eval_set")},
                **result,
                "draft_macs_per_token": draft_macs,
                "target_macs_per_token": target_macs,
                "macs_ratio": cost_ratio,
                "improvement_factor": mal / (1 + k * cost_ratio) if mal is not None else None,
                "same_tokenizer": shared,
                "device": str(target.device),
                "provenance": provenance(seed=seed, settings=settings, k=k, temperature=temperature),
            }
            records.append(record)
            if run is not None:
                run.log({key: value for key, value in record.items() if isinstance(value, (int, float)) and not isinstance(value, bool)})
    output = {"definitions": DEFINITIONS, "records": records}
    write_json(out_path, output)
    return output
