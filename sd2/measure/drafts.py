"""Rule measure: acceptance of one draft against one target on one eval set, with 95% CIs.

Four estimators, each named in its records:
- `teacher_forced_walk` (greedy, shared tokenizer): exact MAL for every k = 1..k_max on
  every prompt from one draft forward pass over the target's cached greedy
  continuations (sd2.measure.acceptance). Cross-checked in the same job against transformers'
  assisted generation on the first n_check prompts, step by step.
- `tree_walk` (greedy, shared tokenizer, measure.tree_budgets): the same pass's ranks give the
  exact MAL of a static draft-token tree per node budget (sd2.measure.trees), cross-checked on the
  first n_check prompts against sd2.measure.trees' own tree decoding loop, step by step.
- `uag_walk` and `tli_walk` (greedy, different tokenizers; sd2.measure.cross_tokenizer): exact MAL
  on every prompt under transformers' universal assisted generation (per headline k) and under
  vLLM's token-level intersection (every k), each cross-checked on the first n_check prompts
  against a decoding loop that runs both models, step by step.
- `parallel_walk` (greedy, shared tokenizer, a draft with a mask token: the `pard` loss): exact MAL
  for every k = 1..k_max from one pass with a chain of k_max - 1 masks on every continuation
  position (sd2.measure.parallel), cross-checked and timed on the first n_check prompts against
  our parallel decoding loop, step by step. Its cost per step is one draft pass: weight bytes
  read once, MACs for every token that pass computes (the new real tokens and k - 1 masks).
- `assisted_generation`: transformers' assisted generation, batch size 1, on the first
  n_assisted prompts: sampling (T > 0), where no walk applies.
- `tvd_estimate` (T > 0, shared tokenizer): alpha = mean over positions of
  sum_x min(p, q) along the target's greedy continuations, and the i.i.d. estimate
  (1 - alpha^(k+1)) / (1 - alpha). An estimate, labelled as one.
"""

import itertools
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from sd2 import parallel, variants
from sd2.checkpoint import write_json
from sd2.generation import model_eos_ids
from sd2.macs import model_macs
from sd2.measure import acceptance, continuations, cross_tokenizer, trees
from sd2.measure.parallel import parallel_generate, parallel_matches
from sd2.measure.speculative import assisted_runs, decoding_path, draft_cache_dropped, step_stats
from sd2.measure.stats import ratio_ci
from sd2.measure.weight_bytes import model_weight_bytes
from sd2.models import load_checkpoint
from sd2.provenance import provenance, training_precision
from sd2.sparse_kernel import kernel_modules, swapped

# A teacher-forced pass and incremental decoding run different kernels (other shapes, other
# summation orders), so their logits differ by rounding: where the top two logits are closer
# than this, their argmaxes may legitimately differ, and a disagreement there is no bug.
NEAR_TIE = 1e-4

DEFINITIONS = {
    "mal": "Mean Accepted Length (tau, block efficiency): mean number of target tokens committed per target "
    "verification step, including the target's bonus/correction token (= mean(n_matches) + 1), range 1..k+1 "
    "for a same-tokenizer pair. The last step of every generation (the one that ends it by max_new_tokens "
    "or EOS) is excluded and counted in truncated_steps; mal * n_steps == accepted_tokens.",
    "mal_vllm": "MAL as vLLM's spec-decode counters give it, 1 + accepted draft tokens / verification steps over "
    "every step (the last, cut-off one included; the prefill's first token is no step), for the rules vLLM runs "
    "(teacher_forced_walk, tli_walk): comparable with what a vLLM server logs as mean acceptance length. A last "
    "step that matched to the end of the cached continuation counts only what it matched within it. "
    "mal_vllm_ci_low/high: the same bootstrap over prompts.",
    "mal_ci": "mal_ci_low/high: 95% percentile bootstrap interval over prompts (prompts resampled with "
    "replacement, each prompt's steps kept together; `bootstrap` resamples, fixed seed).",
    "estimator": "teacher_forced_walk: exact greedy acceptance from one teacher-forced draft pass over the "
    "target's greedy continuation (verified against assisted generation on checked_prompts); "
    "assisted_generation: transformers' assisted generation, batch size 1; tvd_estimate: alpha = mean over "
    "positions of sum_x min(p, q) along the target's greedy continuation, MAL estimated as "
    "(1 - alpha^(k+1)) / (1 - alpha), i.i.d. acceptance assumed; tree_walk: exact greedy acceptance of a static "
    "draft-token tree from the ranks of the same teacher-forced pass (verified against "
    "sd2.measure.trees' tree decoding loop on checked_prompts); uag_walk: exact greedy acceptance under "
    "transformers' universal assisted generation, the engine's re-encoding replayed along the target's greedy "
    "continuation with the draft's rollouts batched (verified against transformers' loop on checked_prompts: as "
    "users run it, the draft's cache kept, and with the cache dropped where that loop's steps differ from the "
    "walk's; engine_same_steps counts the prompts on which the cache-kept loop committed the cached continuation "
    "in the walk's steps); tli_walk: exact greedy acceptance under vLLM's token-level intersection "
    "(use_heterogeneous_vocab: the draft reads target tokens mapped one for one and proposes only the "
    "tli_shared_tokens both vocabularies hold), from one teacher-forced pass, steps as vLLM takes them (the first "
    "token from the prefill, k tokens drafted every step), verified against sd2.measure.cross_tokenizer's loop.",
    "tree_walk": "k = tree_budget, the node budget; the tree (tree_branching: children per node at each depth, "
    "tree_nodes <= tree_budget nodes, root excluded) accepts at a step the longest root path equal to the "
    "target's greedy continuation. drafted_tokens counts tree nodes, acceptance_by_position has one entry per "
    "depth, tree_nodes_expanded = nodes the draft runs a forward on (root and every non-leaf), "
    "tree_verify_width = tokens the target verifies per step (nodes + 1), and the improvement factor is "
    "MAL / (1 + tree_nodes_expanded * c). tree_rule says how the shape was chosen; tree_expected_mal is what "
    "that rule's independence model predicted.",
    "acceptance_rate": "accepted draft tokens / drafted tokens over the counted steps. drafted = min(k, "
    "max_new_tokens - t - 1) per step (transformers' cap near max_new_tokens); for the walk a draft that would "
    "stop early at its own end-of-text after a rejected token still counts as drafting the full proposal.",
    "acceptance_by_position": "share of counted steps in which draft position i (0-based) was accepted.",
    "accepted_length_histogram": "number of counted steps that committed 1, 2, ... tokens (index 0 = 1 token).",
    "different_tokenizers": "for a draft with a different tokenizer, drafted tokens, positions, MAL and the "
    "histogram are counted in TARGET tokens (under the intersection one draft token is one target token).",
    "macs_per_token": "per-token multiply-accumulates of the linear layers (q, k, v, o, MLP, lm_head) counted "
    "from the non-zero weights of the checkpoint (sd2.macs.model_macs); embedding lookups cost 0; "
    "attention-score MACs grow with context and are not included.",
    "improvement_factor": "theoretical improvement factor MAL / (1 + k * c), c = draft MACs / target MACs "
    "per token; its CI is the MAL CI scaled the same way. best_k marks the k with the largest improvement "
    "factor for this draft, estimator and temperature.",
    "weight_bytes_per_token": "bytes of weights read per generated token (sd2.measure.weight_bytes): every "
    "linear layer once, each in its smallest stored layout (dense, bitmask, CSR), 16-bit weights or the draft's "
    "quantization (`quantization`: w8a16, w4a16 and their -qat variants, with 16-bit scales); weight_bytes_ratio = "
    "draft / target. The "
    "tables' improvement_factor_bytes is MAL / (1 + k * weight_bytes_ratio). A quantized draft is measured "
    "with its quantized weights, dequantised in the forward pass.",
    "tokens_per_s": "greedy, batch size 1, the first n_check prompts but the first warmup_prompts: "
    "ar = the target alone (timed once per target and eval set by the target_outputs job), sd = assisted "
    "generation with this draft, its linear layers run as `draft_kernel` says (dense: as stored; csr: "
    "the `draft_kernel_layers` layers of at least 60% zeros as CSR matrices, sd2.sparse_kernel); "
    "speedup = sd_tokens_per_s / ar_tokens_per_s.",
    "checks": "checked_prompts/checked_steps: prompts and verification steps where assisted generation's "
    "committed counts equal the walk's, its output being the target's cached greedy continuation (for uag_walk "
    "transformers' loop, its draft cache dropped where the kept cache changed its steps, for tli_walk "
    "sd2.measure.cross_tokenizer.tli_generate). "
    "draft_near_ties/target_near_ties: prompts left out of that check because the "
    "first disagreement sits where the draft's/target's top two logits differ by less than 1e-4.",
    "training_precision": "target_/draft_training_precision: the precisions the model was trained in, base first "
    "(bf16+fp32: a bf16 stage, then an fp32 one), from the provenance.json of the checkpoint and of those it was "
    "made from; empty for a checkpoint no training here made.",
    "sampling": "temperature T > 0 is pure sampling (top_k=0, top_p=1, no repetition penalty) at T, seeded "
    "with torch.manual_seed(seed + prompt index) before each generate().",
    "prompts": "the eval prompt as the target sees it: a user turn in the target's chat template (with the "
    "generation prompt) where its tokenizer has one and chat.template is auto, else the raw text; the target "
    "outputs' provenance (chat) and every record's prompt_format say which. A different-tokenizer draft "
    "gets that prompt's text from UAG.",
}


def per_prompt(generations: list[list[tuple[int, int]]]) -> dict:
    """Committed tokens and counted steps per prompt (the final step of each excluded, as in MAL)."""
    return {
        "accepted_tokens": [sum(c for c, _ in steps[:-1]) for steps in generations],
        "steps": [len(steps[:-1]) for steps in generations],
    }


def summarize(
    generations: list, k: int, cost_ratio: float, n_boot: int, seed: int, draft_forwards: int | None = None
) -> dict:
    """MAL with its CI, acceptance statistics and improvement factor from per-prompt step lists.

    k: the most draft tokens a step can accept; draft_forwards: the draft forwards per step
    in the cost, k for a chain (a tree's expanded nodes).
    """
    stats = step_stats(generations, k)
    prompts = per_prompt(generations)
    _, low, high = ratio_ci(prompts["accepted_tokens"], prompts["steps"], n_boot=n_boot, seed=seed)
    scale = 1 / (1 + (k if draft_forwards is None else draft_forwards) * cost_ratio)
    mal = stats["mal"]
    return {
        "n_prompts": len(generations),
        **stats,
        "mal_ci_low": low,
        "mal_ci_high": high,
        "improvement_factor": None if mal is None else mal * scale,
        "improvement_factor_ci_low": low * scale,
        "improvement_factor_ci_high": high * scale,
        "per_prompt": prompts,
    }


def vllm_counts(runs: list[list[int]], k: int, n_boot: int, seed: int) -> dict:
    """mal_vllm with its bootstrap CI from each prompt's match runs (sd2.measure.cross_tokenizer.engine_counts)."""
    counts = [cross_tokenizer.engine_counts(r, k) for r in runs]
    mal, low, high = ratio_ci([a + n for a, n in counts], [n for _, n in counts], n_boot=n_boot, seed=seed)
    return {"mal_vllm": mal, "mal_vllm_ci_low": low, "mal_vllm_ci_high": high}


@torch.no_grad()
def top2_gap(model, prompt_ids: list[int], continuation: list[int], position: int) -> float:
    """The model's top-1 minus top-2 logit for continuation token `position`, teacher-forced."""
    ids = torch.tensor([prompt_ids + continuation[:position]], device=model.device)
    top = model(input_ids=ids).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def _first_difference(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_output(target, item: dict, tokens: list[int], k: int) -> bool:
    """True if assisted generation committed the cached continuation; False for a target near-tie; else raise."""
    cached = item["continuation_ids"]
    if tokens == cached:
        return True
    pos = _first_difference(tokens, cached)
    if pos < min(len(tokens), len(cached)) and top2_gap(target, item["prompt_ids"], cached, pos) < NEAR_TIE:
        return False
    raise AssertionError(
        f"speculative greedy output differs from the target's cached greedy continuation for prompt id {item['id']!r} "
        f"(k={k}) at new token {pos}: {tokens[pos : pos + 8]} vs {cached[pos : pos + 8]}"
    )


def steps_agree(item: dict, real: list, walked: list, gap_at, k: int, loop: str) -> bool:
    """True if a decoding loop's steps equal its walk's; False where the draft's top-2 gap at the first difference,
    gap_at(step), is a near-tie; else raise naming the prompt and step."""
    if real == walked:
        return True
    step = _first_difference(real, walked)
    if gap_at(step) < NEAR_TIE:
        return False
    raise AssertionError(
        f"prompt id {item['id']!r}, k={k}: the {loop} loop and its walk disagree at verification step {step}: "
        f"the loop took {real[step : step + 3]}, the walk {walked[step : step + 3]}"
    )


def check_steps(
    item: dict, real: list[tuple[int, int]], walked: list[tuple[int, int]], gaps: list[float], k: int
) -> bool:
    """steps_agree on the committed counts of assisted generation and the teacher-forced walk; gaps: per token."""
    got, want = [c for c, _ in real], [c for c, _ in walked]

    def gap_at(step: int) -> float:
        start = sum(want[:step])
        span = gaps[start : start + max(got[step] if step < len(got) else 1, want[step] if step < len(want) else 1)]
        return min(span, default=float("inf"))

    return steps_agree(item, got, want, gap_at, k, "assisted generation")


def tree_checks(target, draft, items: list[dict], generations: list, branching, budget: int, max_new: int) -> dict:
    """Run sd2.measure.trees' decoding loop on `items`: lossless, and the same committed counts per step as the walk."""
    outputs_ok, steps_ok, steps = [], [], 0
    for item, walked in zip(tqdm(items, desc=f"tree loop, budget {budget}", mininterval=5), generations):
        tokens, real = trees.tree_generate(target, draft, item["prompt_ids"], branching, max_new)
        outputs_ok.append(check_output(target, item, tokens, budget))
        steps_ok.append(
            outputs_ok[-1] and trees.check_steps(draft, item, real, walked, branching, near_tie=NEAR_TIE, budget=budget)
        )
        steps += len(real) if steps_ok[-1] else 0
    return {
        "checked_prompts": sum(steps_ok),
        "checked_steps": steps,
        "target_near_ties": outputs_ok.count(False),
        "draft_near_ties": sum(o and not s for o, s in zip(outputs_ok, steps_ok)),
    }


def tree_records(target, draft, items: list[dict], forced: list[dict], budgets: list[int], settings: dict) -> list:
    """(budget, per-prompt steps, record fields) per tree budget from the teacher-forced ranks, each cross-checked."""
    if not budgets:
        return []
    max_new, n_check = settings["max_new_tokens"], settings["n_check"]
    ranks = [f["rank"] for f in forced]
    cdf = trees.rank_cdf(ranks, max(budgets))
    out = []
    for budget in budgets:
        shape = trees.shape_for_budget(budget, cdf)
        generations = [trees.tree_walk(r, shape, max_new, it["ended_by_eos"]) for r, it in zip(ranks, items)]
        extra = {
            "tree_budget": budget,
            "tree_branching": trees.format_branching(shape),
            "tree_depth": len(shape),
            "tree_nodes": trees.tree_nodes(shape),
            "tree_nodes_expanded": trees.expanded_nodes(shape),
            "tree_verify_width": trees.verify_width(shape),
            "tree_rule": trees.RULE,
            "tree_expected_mal": 1 + trees.expected_accepted(shape, cdf),
            **tree_checks(target, draft, items[:n_check], generations[:n_check], shape, budget, max_new),
        }
        out.append((budget, generations, extra))
    return out


def check_summary(outputs_ok: list[bool], steps_ok: list[bool], runs: list[dict], sd_speed, ar_speed) -> dict:
    """A record's cross-check columns: prompts and steps whose replay agreed, near-ties on either side, speed."""
    return {
        "checked_prompts": sum(steps_ok),
        "checked_steps": sum(len(r["steps"]) for ok, r in zip(steps_ok, runs) if ok),
        "target_near_ties": outputs_ok.count(False),
        "draft_near_ties": sum(o and not s for o, s in zip(outputs_ok, steps_ok)),
        "ar_tokens_per_s": ar_speed,
        "sd_tokens_per_s": sd_speed,
        "speedup": sd_speed / ar_speed if sd_speed and ar_speed else None,
    }


def _speed(runs: list[dict], warmup: int) -> float | None:
    timed = runs[warmup:]
    seconds = sum(r["seconds"] for r in timed)
    return sum(len(r["tokens"]) for r in timed) / seconds if seconds else None


def load_continuations(outputs_path, settings: dict) -> tuple[dict, list[dict]]:
    """(the target_outputs file, its first n_prompts items); raises if it was made for another max_new_tokens."""
    cached = continuations.load(outputs_path)
    items = cached["items"][: settings["n_prompts"]] if settings["n_prompts"] else cached["items"]
    if cached["max_new_tokens"] != settings["max_new_tokens"]:
        raise ValueError(
            f"{outputs_path} holds continuations of {cached['max_new_tokens']} tokens, "
            f"the settings ask for {settings['max_new_tokens']}"
        )
    return cached, items


def costs(target, draft, labels: dict) -> dict:
    """A record's cost columns: MACs and weight bytes per token of both models, and their ratios."""
    target_macs, draft_macs = model_macs(target)["macs_per_token"], model_macs(draft)["macs_per_token"]
    quantization = variants.split_quantization(labels.get("method") or "")[1]
    draft_bytes, target_bytes = model_weight_bytes(draft, quantization), model_weight_bytes(target)
    return {
        "draft_macs_per_token": draft_macs,
        "target_macs_per_token": target_macs,
        "macs_ratio": draft_macs / target_macs,
        "quantization": quantization,
        "draft_weight_bytes_per_token": draft_bytes["weight_bytes_per_token"],
        "target_weight_bytes_per_token": target_bytes["weight_bytes_per_token"],
        "weight_bytes_ratio": draft_bytes["weight_bytes_per_token"] / target_bytes["weight_bytes_per_token"],
        "draft_weight_layouts": draft_bytes["weight_layouts"],
    }


@dataclass
class Job:
    """One measure job: its models, the cached continuations, the settings; `add` collects (and logs) its records."""

    target: object
    draft: object
    target_tok: object
    draft_tok: object
    path: str  # sd2.measure.speculative.decoding_path
    kernel_layers: dict[str, torch.nn.Module]  # the draft's layers the timed runs swap for sd2.sparse_kernel's
    items: list[dict]
    ar_speed: float | None  # the target alone, batch size 1 (target_outputs)
    base: dict  # the columns every record shares
    settings: dict
    seed: int
    checks: dict[int, int]  # k -> prompts the decoding loops check the walks on (check_plan)
    run: object = None
    records: list[dict] = field(default_factory=list)

    def add(self, temperature: float, k: int, estimator: str, result: dict, **extra) -> None:
        record = {
            **self.base,
            "temperature": temperature,
            "k": k,
            "estimator": estimator,
            **result,
            **extra,
            "provenance": provenance(seed=self.seed, **self.settings),
        }
        self.records.append(record)
        if self.run is not None:
            self.run.log(
                {key: v for key, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            )

    def summarize(self, generations: list, k: int, draft_forwards: int | None = None) -> dict:
        cost_ratio = self.base["macs_ratio"]
        return summarize(generations, k, cost_ratio, self.settings["bootstrap"], self.seed, draft_forwards)

    def assisted(self, k: int, temperature: float, items: list[dict]) -> list[dict]:
        """assisted_runs on these items' prompts, the draft's layers as draft_kernel says."""
        with swapped(self.draft, self.kernel_layers):
            return assisted_runs(
                self.target,
                self.draft,
                self.target_tok,
                self.draft_tok,
                [it["prompt_ids"] for it in items],
                k=k,
                temperature=temperature,
                max_new_tokens=self.settings["max_new_tokens"],
                seed=self.seed,
            )


def check_plan(settings: dict, labels: dict) -> dict[int, int]:
    """{k: prompts} on which the decoding loops check this cell's walks: every k on check_every_k's prompts in its
    cell, else the headline k on n_check prompts."""
    deep = settings.get("check_every_k")
    if deep and all(labels.get(key) == deep[key] for key in ("draft", "method", "sparsity", "eval_set")):
        return {k: deep["prompts"] for k in range(1, settings["k_max"] + 1)}
    return {k: settings["n_check"] for k in settings["k"]}


def prepare(target, draft, target_tok, draft_tok, *, settings: dict, labels: dict, seed: int, run) -> Job:
    """The Job of these models, before any eval set: its decoding path, kernel layers and the record columns
    they share (costs included, counted once per draft). Raises on what cannot be measured before anything is.
    """
    path = decoding_path(target, draft, target_tok, draft_tok)
    # Built before the teacher-forced pass, so a draft the kernel cannot run fails at once.
    kernel_layers = kernel_modules(draft, settings["draft_kernel"])
    budgets = settings["tree_budgets"]
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"measure.tree_budgets has repeated budgets: {budgets}")
    base = {
        **{key: labels.get(key) for key in ("target", "draft", "method", "sparsity", "eval_set")},
        **costs(target, draft, labels),
        "draft_kernel": settings["draft_kernel"],
        "draft_kernel_layers": len(kernel_layers),
        "same_tokenizer": path == "assisted",
        "decoding_path": path,
        "device": str(target.device),
        "prompt_format": None,
    }
    return Job(
        target,
        draft,
        target_tok,
        draft_tok,
        path=path,
        kernel_layers=kernel_layers,
        items=[],
        ar_speed=None,
        base=base,
        settings=settings,
        seed=seed,
        checks={},
        run=run,
    )


def on_eval_set(job: Job, name: str, cached: dict, items: list[dict]) -> Job:
    """The draft's Job on one eval set's cached continuations (load_continuations), with no records yet."""
    # The prompt format the cached prompt_ids were made with (sd2.chat.describe).
    base = {**job.base, "eval_set": name, "prompt_format": cached["provenance"]["settings"].get("chat")}
    return replace(
        job,
        items=items,
        ar_speed=cached["timing"]["ar_tokens_per_s"],
        base=base,
        checks=check_plan(job.settings, base),
        records=[],
    )


def teacher_forced(job: Job) -> list[dict]:
    """The draft's one teacher-forced pass over every cached continuation (sd2.measure.acceptance)."""
    pairs = [(it["prompt_ids"], it["continuation_ids"]) for it in job.items]
    bar = tqdm(total=len(pairs), desc="teacher-forced draft pass", mininterval=5)
    forced = acceptance.teacher_forced_matches(
        job.draft, pairs, pad_id=job.target_tok.pad_token_id, batch_size=job.settings["batch_size"], progress=bar
    )
    bar.close()
    return forced


def walk_check(job: Job, k: int, walked: list, forced: list[dict]) -> dict:
    """Assisted generation on the first job.checks[k] prompts against the walk at k, step by step, and timed."""
    runs = job.assisted(k, 0.0, job.items[: job.checks[k]])
    outputs_ok = [check_output(job.target, it, r["tokens"], k) for it, r in zip(job.items, runs)]
    steps_ok = [
        ok and check_steps(it, r["steps"], walked[i], forced[i]["gap"], k)
        for i, (ok, it, r) in enumerate(zip(outputs_ok, job.items, runs))
    ]
    timed = runs[: job.settings["n_check"]]  # the prompts the target alone was timed on
    return check_summary(outputs_ok, steps_ok, runs, _speed(timed, job.settings["warmup_prompts"]), job.ar_speed)


def walk_records(job: Job) -> None:
    """Greedy, shared tokenizer: teacher_forced_walk for every k = 1..k_max and tree_walk for every tree budget,
    from one teacher-forced pass, cross-checked against assisted generation and the tree loop."""
    settings, max_new = job.settings, job.settings["max_new_tokens"]
    forced = teacher_forced(job)
    walks = {
        k: [acceptance.walk(f["matches"], k, max_new, it["ended_by_eos"]) for f, it in zip(forced, job.items)]
        for k in range(1, settings["k_max"] + 1)
    }
    checks = {k: walk_check(job, k, walks[k], forced) for k in job.checks}
    runs = [acceptance.match_runs(f["matches"]) for f in forced]
    for k, generations in walks.items():
        engine = vllm_counts(runs, k, settings["bootstrap"], job.seed)
        job.add(0.0, k, "teacher_forced_walk", job.summarize(generations, k), **engine, **checks.get(k, {}))
    for budget, generations, extra in tree_records(
        job.target, job.draft, job.items, forced, settings["tree_budgets"], settings
    ):
        summary = job.summarize(generations, extra["tree_depth"], extra["tree_nodes_expanded"])
        job.add(0.0, budget, "tree_walk", summary, **extra)


def rollout_steps_agree(item: dict, real: list, walked: list, gaps: list[float], k: int, loop: str) -> bool:
    """steps_agree on (committed, drafted) steps of a different-tokenizer loop and walk; gaps: per step, the smallest
    top-2 gap of the draft's rollout, and every rollout up to the first difference counts (each fed the next)."""
    return steps_agree(item, real, walked, lambda step: min(gaps[: step + 1], default=float("inf")), k, loop)


def uag_check(job: Job, k: int, walked: list, gaps: list) -> dict:
    """transformers' UAG against the walk at k on the first job.checks[k] prompts (timed on the first n_check).

    The loop runs as users run it, the draft's cache kept; engine_same_steps counts the prompts where it output
    the cached continuation in the walk's steps. Where it did not, transformers' defect in cropping that cache
    (sd2.measure.speculative.draft_cache_dropped) can be the cause, so the loop runs again with the cache dropped
    and its output must be the cached continuation and its steps the walk's.
    """
    kept = job.assisted(k, 0.0, job.items[: job.checks[k]])
    kept_ok = [check_output(job.target, it, r["tokens"], k) for it, r in zip(job.items, kept)]
    same = [ok and r["steps"] == w for ok, r, w in zip(kept_ok, kept, walked)]
    again = [i for i, ok in enumerate(same) if not ok]
    runs, outputs_ok = list(kept), list(kept_ok)
    with draft_cache_dropped():
        dropped = job.assisted(k, 0.0, [job.items[i] for i in again])
    for i, run in zip(again, dropped):
        runs[i], outputs_ok[i] = run, check_output(job.target, job.items[i], run["tokens"], k)
    steps_ok = [
        ok and rollout_steps_agree(it, r["steps"], walked[i], gaps[i], k, "universal assisted generation")
        for i, (ok, it, r) in enumerate(zip(outputs_ok, job.items, runs))
    ]
    speed = _speed(kept[: job.settings["n_check"]], job.settings["warmup_prompts"])
    return {**check_summary(outputs_ok, steps_ok, runs, speed, job.ar_speed), "engine_same_steps": sum(same)}


def uag_records(job: Job) -> None:
    """Greedy, different tokenizers: uag_walk on every prompt at every headline k, checked against transformers,
    on the eval sets and methods measure.uag_eval_sets and uag_methods name (its draft rolls out at every step,
    which costs far more than the intersection walk's one teacher-forced pass)."""
    settings, eos = job.settings, model_eos_ids(job.target)
    for key, label in (("uag_eval_sets", "eval_set"), ("uag_methods", "method")):
        if settings.get(key) is not None and job.base[label] not in settings[key]:
            return
    for k in settings["k"]:
        bar = tqdm(total=len(job.items), desc=f"uag walk k={k}", mininterval=5)
        walked, gaps = cross_tokenizer.uag_walk(
            job.draft,
            job.target_tok,
            job.draft_tok,
            job.items,
            k=k,
            max_new_tokens=settings["max_new_tokens"],
            eos_ids=eos,
            batch_size=settings["batch_size"],
            progress=bar,
        )
        bar.close()
        job.add(0.0, k, "uag_walk", job.summarize(walked, k), **uag_check(job, k, walked, gaps))


def tli_check(job: Job, mapping: dict, k: int, walked: list) -> dict:
    """sd2.measure.cross_tokenizer.tli_generate on the first job.checks[k] prompts: the cached outputs, the walk's
    steps."""
    settings, eos = job.settings, model_eos_ids(job.target)
    outputs_ok, steps_ok, checked_steps = [], [], 0
    for item, steps in zip(job.items[: job.checks[k]], walked):
        tokens, real, gaps = cross_tokenizer.tli_generate(
            job.target,
            job.draft,
            mapping,
            item["prompt_ids"],
            k=k,
            max_new_tokens=settings["max_new_tokens"],
            eos_ids=eos,
        )
        outputs_ok.append(check_output(job.target, item, tokens, k))
        steps_ok.append(outputs_ok[-1] and rollout_steps_agree(item, real, steps, gaps, k, "intersection"))
        checked_steps += len(real) if steps_ok[-1] else 0
    return {
        "checked_prompts": sum(steps_ok),
        "checked_steps": checked_steps,
        "target_near_ties": outputs_ok.count(False),
        "draft_near_ties": sum(o and not s for o, s in zip(outputs_ok, steps_ok)),
    }


def tli_records(job: Job) -> None:
    """Greedy, different tokenizers: tli_walk for every k = 1..k_max from one teacher-forced pass over mapped ids."""
    settings = job.settings
    target_size = job.target.config.get_text_config().vocab_size
    mapping = cross_tokenizer.vocab_map(
        job.target_tok, job.draft_tok, target_size, job.draft.config.get_text_config().vocab_size
    )
    bar = tqdm(total=len(job.items), desc="intersection teacher-forced pass", mininterval=5)
    pad = job.draft_tok.pad_token_id if job.draft_tok.pad_token_id is not None else 0
    forced = cross_tokenizer.tli_matches(
        job.draft, mapping, job.items, pad_id=pad, batch_size=settings["batch_size"], progress=bar
    )
    bar.close()
    runs = [acceptance.match_runs(f["matches"]) for f in forced]
    for k in range(1, settings["k_max"] + 1):
        walked = [cross_tokenizer.vllm_steps(r, k) for r in runs]
        checks = tli_check(job, mapping, k, walked) if k in job.checks else {}
        engine = vllm_counts(runs, k, settings["bootstrap"], job.seed)
        extra = {"tli_shared_tokens": mapping["shared"], "tli_target_vocab": target_size}
        job.add(0.0, k, "tli_walk", job.summarize(walked, k), **engine, **checks, **extra)


def parallel_check(job: Job, k: int, walked: list, forced: list[dict]) -> dict:
    """Our parallel decoding loop on the first job.checks[k] prompts against the walk at k, step by step, and timed."""
    eos = model_eos_ids(job.target)
    with swapped(job.draft, job.kernel_layers):
        runs = [
            parallel_generate(job.target, job.draft, it["prompt_ids"], k, job.settings["max_new_tokens"], eos)
            for it in tqdm(job.items[: job.checks[k]], desc=f"parallel decoding loop k={k}", mininterval=5)
        ]
    outputs_ok = [check_output(job.target, it, r["tokens"], k) for it, r in zip(job.items, runs)]
    steps_ok = []
    for ok, it, r, walk, f in zip(outputs_ok, job.items, runs, walked, forced):
        # The gap of the proposals read at the step's first token: where a near-tie could change the step.
        starts = itertools.accumulate((c for c, _ in walk[:-1]), initial=0)
        gap_at = [*(f["gap"][t] for t in starts), float("inf")].__getitem__
        steps_ok.append(ok and steps_agree(it, r["steps"], walk, gap_at, k, "parallel decoding"))
    timed = runs[: job.settings["n_check"]]
    return check_summary(outputs_ok, steps_ok, runs, _speed(timed, job.settings["warmup_prompts"]), job.ar_speed)


def parallel_cost(summary: dict, k: int, macs_ratio: float) -> dict:
    """The improvement factor of a parallel step: the draft computes the step's new real tokens (MAL on average)
    and k - 1 masks, MAL / (1 + (MAL - 1 + k) x c), a monotone map of MAL applied to its CI bounds too."""

    def factor(mal):
        return mal / (1 + (mal - 1 + k) * macs_ratio)

    mal = summary["mal"]
    return {
        "draft_passes_per_step": 1,
        "draft_tokens_per_step": None if mal is None else mal - 1 + k,
        "improvement_factor": None if mal is None else factor(mal),
        "improvement_factor_ci_low": factor(summary["mal_ci_low"]),
        "improvement_factor_ci_high": factor(summary["mal_ci_high"]),
    }


def parallel_records(job: Job) -> None:
    """Greedy, a parallel draft: parallel_walk for every k = 1..k_max from one pass with mask chains."""
    settings, max_new = job.settings, job.settings["max_new_tokens"]
    pairs = [(it["prompt_ids"], it["continuation_ids"]) for it in job.items]
    bar = tqdm(total=len(pairs), desc="parallel draft pass", mininterval=5)
    forced = parallel_matches(job.draft, pairs, k=settings["k_max"], batch_size=settings["batch_size"], progress=bar)
    bar.close()
    runs = [f["runs"] for f in forced]
    for k in range(1, settings["k_max"] + 1):
        walked = [acceptance.walk_runs(r, k, max_new, it["ended_by_eos"]) for r, it in zip(runs, job.items)]
        checks = parallel_check(job, k, walked, forced) if k in job.checks else {}
        summary = job.summarize(walked, k)
        summary.update(parallel_cost(summary, k, job.base["macs_ratio"]))
        engine = vllm_counts(runs, k, settings["bootstrap"], job.seed)
        job.add(0.0, k, "parallel_walk", summary, **engine, **checks)


def assisted_records(job: Job, temperature: float) -> None:
    """assisted_generation at a sampling `temperature` for every headline k, on the first n_assisted prompts."""
    for k in job.settings["k"]:
        runs = job.assisted(k, temperature, job.items[: job.settings["n_assisted"]])
        job.add(temperature, k, "assisted_generation", job.summarize([r["steps"] for r in runs], k))


def tvd_records(job: Job, temperature: float) -> None:
    """tvd_estimate for every k: alpha = the mean of sum_x min(p, q) over positions, MAL as if i.i.d."""
    settings = job.settings
    pairs = [(it["prompt_ids"], it["continuation_ids"]) for it in job.items[: settings["n_tvd"]]]
    sums = acceptance.overlap(
        job.target,
        job.draft,
        pairs,
        temperature=temperature,
        pad_id=job.target_tok.pad_token_id,
        batch_size=settings["batch_size"],
    )
    alpha, low, high = ratio_ci([s for s, _ in sums], [n for _, n in sums], n_boot=settings["bootstrap"], seed=job.seed)
    for k in range(1, settings["k_max"] + 1):
        mal = acceptance.iid_mal(alpha, k)
        lo, hi = acceptance.iid_mal(low, k), acceptance.iid_mal(high, k)
        scale = 1 / (1 + k * job.base["macs_ratio"])
        result = {
            "n_prompts": len(sums),
            "mal": mal,
            "mal_ci_low": lo,
            "mal_ci_high": hi,
            "alpha": alpha,
            "alpha_ci_low": low,
            "alpha_ci_high": high,
            "improvement_factor": mal * scale,
            "improvement_factor_ci_low": lo * scale,
            "improvement_factor_ci_high": hi * scale,
        }
        job.add(temperature, k, "tvd_estimate", result)


def measure(target_dir, draft_dir, outputs_path, out_path, *, labels: dict, **kwargs) -> dict:
    """Every record of one (target, draft, eval set) as one JSON file at out_path (measure_eval_sets)."""
    name = labels["eval_set"]
    return measure_eval_sets(target_dir, draft_dir, {name: (outputs_path, out_path)}, labels=labels, **kwargs)[name]


def measure_eval_sets(
    target_dir,
    draft_dir,
    eval_sets: dict,
    *,
    settings: dict,
    labels: dict,
    seed: int,
    run=None,
    trust_remote_code: bool = False,
    device: str | None = None,
    dtype="auto",
    draft_dtype="auto",
    device_map=None,
) -> dict:
    """Every record of one (target, draft) on each eval set, {name: (target_outputs path, out path)}: the models
    are loaded once, every continuations file is read (and checked against the settings) before anything is
    measured, and each eval set's records are one JSON file at its out path. Returns {name: that file's content}."""
    continuations_of = {name: load_continuations(outputs, settings) for name, (outputs, _) in eval_sets.items()}
    target, target_tok = load_checkpoint(target_dir, trust_remote_code, device, dtype=dtype, device_map=device_map)
    draft, draft_tok = load_checkpoint(draft_dir, trust_remote_code, device, dtype=draft_dtype)
    # Runs on CPUs with and without native bf16 train in different precisions: every record says which.
    precisions = {
        "target_training_precision": training_precision(target_dir),
        "draft_training_precision": training_precision(draft_dir),
    }
    draft_job = prepare(target, draft, target_tok, draft_tok, settings=settings, labels=labels, seed=seed, run=run)
    draft_job.base.update(precisions)
    outputs = {}
    for name, (cached, items) in continuations_of.items():
        job = on_eval_set(draft_job, name, cached, items)
        measure_job(job)
        outputs[name] = {"definitions": DEFINITIONS, "prompt_ids": [it["id"] for it in items], "records": job.records}
        write_json(eval_sets[name][1], outputs[name], indent=None)
    return outputs


def measure_job(job: Job) -> None:
    """The records of every temperature and estimator the settings ask for, best_k marked."""
    drafts_in_parallel = parallel.mask_token(job.draft) is not None
    if drafts_in_parallel and job.path != "assisted":
        raise ValueError("a parallel draft is measured only with the target's own tokenizer")
    for temperature in job.settings["temperatures"]:
        if drafts_in_parallel:
            if temperature == 0:
                parallel_records(job)
            else:
                print(f"temperature {temperature}: not measured for a parallel draft (its walk is greedy)")
            continue
        if temperature == 0 and job.path == "assisted":
            walk_records(job)
            continue
        if temperature == 0:
            uag_records(job)
            tli_records(job)
            continue
        assisted_records(job, temperature)
        if job.path == "assisted" and job.settings["n_tvd"]:
            tvd_records(job, temperature)
    mark_best_k(job.records)


def mark_best_k(records: list[dict]) -> None:
    """best_k = True on the k with the largest improvement factor per (temperature, estimator)."""
    groups = {}
    for r in records:
        groups.setdefault((r["temperature"], r["estimator"]), []).append(r)
    for group in groups.values():
        scored = [r for r in group if r.get("improvement_factor") is not None]
        best = max(scored, key=lambda r: r["improvement_factor"], default=None)
        for r in group:
            r["best_k"] = r is best
