"""Exact greedy acceptance for a draft whose tokenizer differs from the target's.

Greedy speculative decoding commits the target's greedy continuation y whatever the draft
proposes, so a verification step starting at target position t is decided by what the draft
proposes there, and that depends only on the draft's input at t. Each walk below replays an
engine's rule for that input along the cached y and never runs the target:

- `uag_walk`, transformers' universal assisted generation: the engine's own re-encoding code
  (`AssistedCandidateGeneratorDifferentTokenizers`, its look-behind windows and the diagonal
  alignment that merges re-encoded tokens across a step boundary) keeps the draft's ids, the
  draft rolls out k tokens, and their text re-encoded by the target's tokenizer is the proposal.
  The draft's ids depend on where earlier steps ended, so the walk goes step by step and per k,
  the rollouts of a batch of prompts run together (`DraftRows`).
- `tli_walk`, vLLM's token-level intersection (`use_heterogeneous_vocab`): the draft reads and
  writes only tokens whose strings both vocabularies hold, mapped id to id (`vocab_map`). Its input
  never depends on step boundaries, so one teacher-forced pass gives every step for every k.

Both give per prompt the (committed, drafted) target tokens of every step, the last included, as
sd2.measure.acceptance.walk does, and the draft's top-1 minus top-2 logit gaps (a near-tie where
the walk's forward and the engine's own may legitimately pick different tokens). Each is checked
against a loop that runs both models: transformers' own for UAG, `tli_generate` for the intersection.
"""

from collections.abc import Generator

import torch
from transformers.generation.candidate_generator import AssistedCandidateGeneratorDifferentTokenizers

# A walk is a generator per prompt: it yields the draft's input ids at a step, is sent the
# rollout (tokens, smallest gap) and returns the step list when the continuation is committed.
Walk = Generator[list[int], tuple[list[int], float], list[tuple[int, int]]]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def right_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token lists padded on the right to the longest."""
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq, dtype=torch.long), 1
    return ids, mask


# Dead cache slots DraftRows tolerates before it compacts (a few rounds' worth of rollout slots).
COMPACT_SLACK = 16
# A feed longer than this (a newly admitted prompt) is prefilled in a forward of its own rows only: in the
# shared forward every row would compute that many positions.
PREFILL_MIN = 32


class DraftRows:
    """Greedy draft rollouts for a fixed batch of walks, round after round, each row reusing its cached keys
    and values for the part of its input that did not change.

    One cache serves every row: each forward appends a block of slots to all rows (a row's new tokens first,
    then padding), and a row's attention mask keeps only the slots of its current input, so a row whose
    input was rewritten (re-encoding replaced its last tokens) drops those slots and feeds the new ones, at
    their own positions (position_ids); dropped slots are gathered out of the cache once they add up, and a
    newly admitted prompt is cached by a forward of its own row (`_prefill`), not padded into every row's. What
    a row attends to is exactly its input, as if it were run alone from scratch: the rule transformers'
    loop follows with the draft's cache dropped.
    """

    def __init__(self, draft, rows: int, pad_id: int):
        self.draft, self.pad_id, self.rows = draft, pad_id, rows
        self.past = None
        self.mask = torch.zeros((self.rows, 0), dtype=torch.long, device=self.draft.device)
        self.slots: list[list[int]] = [[] for _ in range(self.rows)]  # a row's cache slot per input position
        self.tokens: list[list[int]] = [[] for _ in range(self.rows)]  # the token each of those slots holds

    def _compact(self) -> None:
        """Drop the slots no row attends to: each row's live slots gathered to the front of a narrower cache.

        Keys are stored with their rotary positions applied, so gathering them keeps each row's positions;
        a gather costs far less than attending to (and appending behind) slots that are all masked.
        """
        width = max((len(s) for s in self.slots), default=0)
        if self.past is None or self.mask.shape[1] <= width + COMPACT_SLACK:
            return
        index = torch.zeros((self.rows, width), dtype=torch.long, device=self.mask.device)
        self.mask = torch.zeros((self.rows, width), dtype=torch.long, device=self.mask.device)
        for i, slots in enumerate(self.slots):
            index[i, : len(slots)] = torch.tensor(slots, dtype=torch.long)
            self.mask[i, : len(slots)] = 1
            self.slots[i] = list(range(len(slots)))
        for layer in self.past.layers:
            gather = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, gather), layer.values.gather(2, gather)

    def _prefill(self, rows: list[int], feeds: list[list[int]]) -> None:
        """Cache these rows' whole feeds (each from position 0) in a forward of those rows alone, then append
        the keys and values to every row's cache as new slots, live for those rows only."""
        ids, mask = right_padded(feeds, self.pad_id)
        width = ids.shape[1]
        past = self.draft(
            input_ids=ids.to(self.draft.device), attention_mask=mask.to(self.draft.device), use_cache=True
        ).past_key_values
        index = torch.tensor(rows, device=self.mask.device)
        for layer, fresh in zip(self.past.layers, past.layers):
            for name in ("keys", "values"):
                old = getattr(layer, name)
                grown = old.new_zeros((*old.shape[:2], width, old.shape[-1]))
                grown[index] = getattr(fresh, name)
                setattr(layer, name, torch.cat([old, grown], dim=2))
        first = self.mask.shape[1]
        fresh_mask = torch.zeros((self.rows, width), dtype=torch.long, device=self.mask.device)
        self.mask = torch.cat([self.mask, fresh_mask], dim=1)
        for row, feed in zip(rows, feeds):
            self.mask[row, first : first + len(feed)] = 1
            self.slots[row] += range(first, first + len(feed))
            self.tokens[row] += feed

    def _forward(self, feeds: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Feed each row its tokens at positions from its start; the logits after each row's last token."""
        width = max(1, max(len(f) for f in feeds))
        ids = torch.full((len(feeds), width), self.pad_id, dtype=torch.long)
        positions = torch.zeros_like(ids)
        for i, (feed, start) in enumerate(zip(feeds, starts)):
            ids[i, : len(feed)] = torch.tensor(feed, dtype=torch.long)
            positions[i] = torch.arange(start, start + width)
        first = self.mask.shape[1]
        # Padding attends (it must attend to something) but comes after a row's tokens, which never see it.
        self.mask = torch.cat([self.mask, torch.ones_like(ids, device=self.mask.device)], dim=1)
        out = self.draft(
            input_ids=ids.to(self.draft.device),
            attention_mask=self.mask,
            position_ids=positions.to(self.draft.device),
            past_key_values=self.past,
            use_cache=True,
        )
        self.past = out.past_key_values
        for i, feed in enumerate(feeds):
            self.mask[i, first + len(feed) : first + width] = 0
            self.slots[i] += range(first, first + len(feed))
            self.tokens[i] += feed
        return out.logits[torch.arange(len(feeds)), [max(len(f), 1) - 1 for f in feeds]].float()

    def rollout(self, contexts: list, k: int, *, stop_ids: set[int], allowed=None) -> list:
        """Up to k greedy draft tokens after each context (None: a finished row): [(tokens, smallest top-2 gap)].

        A rollout ends after a token in stop_ids, as generate() does for one sequence; `allowed` (a boolean
        mask over the draft's vocabulary) restricts the argmax to those tokens.
        """
        feeds, starts, long = [], [], []
        for i, context in enumerate(contexts):
            if context is None:
                feeds.append([])
                starts.append(len(self.tokens[i]))
                continue
            keep = min(_common_prefix(context, self.tokens[i]), len(context) - 1)
            if self.past is not None and len(context) - keep > PREFILL_MIN:
                keep = 0
                long.append(i)
            self.mask[i, self.slots[i][keep:]] = 0
            del self.slots[i][keep:], self.tokens[i][keep:]
            feeds.append(context[keep:])
            starts.append(keep)
        if long:
            self._prefill(long, [feeds[i][:-1] for i in long])
            for i in long:
                feeds[i], starts[i] = feeds[i][-1:], len(self.tokens[i])
        self._compact()
        logits = self._forward(feeds, starts)
        tokens = [[] for _ in contexts]
        gaps = [float("inf")] * len(contexts)
        live = [c is not None for c in contexts]
        for step in range(k):
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            top = logits.topk(2, dim=-1).values
            for i, token in enumerate(logits.argmax(-1).tolist()):
                if live[i]:
                    tokens[i].append(token)
                    gaps[i] = min(gaps[i], float(top[i, 0] - top[i, 1]))
                    live[i] = token not in stop_ids
            if step == k - 1 or not any(live):
                break
            feeds = [[t[-1]] if alive else [] for t, alive in zip(tokens, live)]
            logits = self._forward(feeds, [len(r) for r in self.tokens])
        return [None if c is None else (t, g) for c, t, g in zip(contexts, tokens, gaps)]


def run_walks(
    walks: list[Walk], rows: DraftRows, k: int, *, stop_ids: set[int], progress=None
) -> tuple[list[list[tuple[int, int]]], list[list[float]]]:
    """Drive every prompt's walk to its end, one batched rollout of `rows` per round: (steps, gaps) per prompt.

    A row whose walk ends takes the next walk at once, so a round's batch stays full until the walks run out
    instead of waiting for the longest walk of a fixed batch.
    """
    steps: list = [None] * len(walks)
    gaps: list[list[float]] = [[] for _ in walks]
    queue = iter(range(len(walks)))
    walk_of: list[int | None] = [None] * rows.rows
    contexts: list[list[int] | None] = [None] * rows.rows

    def admit(row: int) -> None:
        walk_of[row] = next(queue, None)
        contexts[row] = None if walk_of[row] is None else next(walks[walk_of[row]])

    for row in range(rows.rows):
        admit(row)
    while any(i is not None for i in walk_of):
        for row, (i, result) in enumerate(zip(list(walk_of), rows.rollout(contexts, k, stop_ids=stop_ids))):
            if i is None:
                continue
            gaps[i].append(result[1])
            try:
                contexts[row] = walks[i].send(result)
            except StopIteration as done:
                steps[i] = done.value
                if progress is not None:
                    progress.update(1)
                admit(row)
    return steps, gaps


def verify(candidate: list[int], y: list[int], t: int, *, length_left: int, eos_ids: set[int]) -> int:
    """Target tokens one greedy verification step commits at t, as transformers' assisted decoding does.

    The target's argmax along y is y itself; a candidate that reaches the length limit or ends with
    an end-of-text and matches throughout gives its last token back to the target, and the step
    commits at most the tokens left to generate.
    """
    matched = 0
    for proposed, wanted in zip(candidate, y[t:]):
        if proposed != wanted:
            break
        matched += 1
    done = len(candidate) >= length_left or bool(candidate and candidate[-1] in eos_ids)
    if done and matched == len(candidate):
        matched -= 1
    return min(matched + 1, length_left, len(y) - t)


def _uag_engine(target_tok, draft_tok, draft, max_length: int) -> AssistedCandidateGeneratorDifferentTokenizers:
    """transformers' UAG candidate generator without its models: only its re-encoding state and code."""
    engine = AssistedCandidateGeneratorDifferentTokenizers.__new__(AssistedCandidateGeneratorDifferentTokenizers)
    config = draft.generation_config
    engine.target_tokenizer, engine.assistant_tokenizer = target_tok, draft_tok
    engine.prev_target_ids_len, engine.prev_assistant_ids = None, None
    # generate() fills unset look-behinds with its global defaults (10 and 10 in transformers 5).
    defaults = config._get_default_generation_params()
    engine.target_lookbehind = config.target_lookbehind or defaults["target_lookbehind"]
    engine.assistant_lookbehind = config.assistant_lookbehind or defaults["assistant_lookbehind"]
    engine.main_model_max_length = max_length
    return engine


def uag_steps(engine, prompt_ids: list[int], y: list[int], *, max_new_tokens: int, eos_ids: set[int]) -> Walk:
    """One prompt's walk under transformers' UAG (`AssistedCandidateGeneratorDifferentTokenizers.get_candidates`)."""
    steps, t = [], 0
    while t < len(y):
        input_ids = torch.tensor([prompt_ids + y[:t]])
        draft_ids, _ = engine._prepare_assistant_input_ids(input_ids)
        engine.prev_assistant_ids = draft_ids
        tokens, _ = yield draft_ids[0].tolist()
        sequences = torch.cat([draft_ids, torch.tensor([tokens], dtype=draft_ids.dtype)], dim=-1)
        proposal = engine._process_assistant_outputs(input_ids, sequences)
        engine.prev_target_ids_len, engine.prev_assistant_ids = input_ids.shape[1], sequences
        candidate = proposal[0, input_ids.shape[1] :].tolist()
        committed = verify(candidate, y, t, length_left=max_new_tokens - t, eos_ids=eos_ids)
        steps.append((committed, len(candidate)))
        t += committed
    return steps


def uag_walk(
    draft,
    target_tok,
    draft_tok,
    items: list[dict],
    *,
    k: int,
    max_new_tokens: int,
    eos_ids: set[int],
    batch_size: int,
    progress=None,
):
    """(steps, gaps) per item ({prompt_ids, continuation_ids}) under transformers' UAG at k draft tokens per step.

    eos_ids are the target's: transformers stops the draft's rollout at them too, as draft ids.
    """
    walks = [
        uag_steps(
            _uag_engine(target_tok, draft_tok, draft, len(it["prompt_ids"]) + max_new_tokens),
            it["prompt_ids"],
            it["continuation_ids"],
            max_new_tokens=max_new_tokens,
            eos_ids=eos_ids,
        )
        for it in items
    ]
    pad = draft_tok.pad_token_id if draft_tok.pad_token_id is not None else 0
    rows = DraftRows(draft, min(batch_size, len(items)) or 1, pad)
    # Prompts of similar lengths side by side: the cache's width follows the longest row's input.
    order = sorted(range(len(items)), key=lambda i: len(items[i]["prompt_ids"]))
    with torch.no_grad():
        steps, gaps = run_walks([walks[i] for i in order], rows, k, stop_ids=eos_ids, progress=progress)
    back = {i: n for n, i in enumerate(order)}
    return [steps[back[i]] for i in range(len(items))], [gaps[back[i]] for i in range(len(items))]


def _space_prefixes(tokenizer) -> tuple[str, ...]:
    """The marker a tokenizer writes for a leading space, found as vLLM's vocab_mapping does: from " a"."""
    first = tokenizer.convert_ids_to_tokens(tokenizer.encode(" a", add_special_tokens=False))[0]
    if len(first) > 1 and first.endswith("a") and first[0] not in " \t":
        return (first[:-1],)
    return ("Ġ", "▁")


def _normalized_vocab(tokenizer, vocab_size: int) -> dict[str, int]:
    """{token string with a leading space marker written as ' ': the first id that has it}, ids < vocab_size."""
    prefixes, out = _space_prefixes(tokenizer), {}
    # By id: a fast tokenizer's get_vocab() comes from a hash map whose order changes from process to process,
    # and where two tokens normalize alike (a metaspace vocabulary's "▁" and a literal " ") the map must not.
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        for p in prefixes:
            if token.startswith(p):
                token = " " + token[len(p) :]
                break
        if token_id < vocab_size and token not in out:
            out[token] = token_id
    return out


def vocab_map(target_tok, draft_tok, target_vocab_size: int, draft_vocab_size: int) -> dict:
    """vLLM's token-level intersection: tokens whose normalized strings both vocabularies hold, mapped id to id.

    Returns {target_to_draft: LongTensor (target vocab, -1 where absent), draft_allowed: BoolTensor over the
    draft vocab, draft_fallback: the draft id an absent target token becomes (its unk, else its eos), shared: count}.
    """
    target_vocab = _normalized_vocab(target_tok, target_vocab_size)
    draft_vocab = _normalized_vocab(draft_tok, draft_vocab_size)
    target_to_draft = torch.full((target_vocab_size,), -1, dtype=torch.long)
    allowed = torch.zeros(draft_vocab_size, dtype=torch.bool)
    for token in target_vocab.keys() & draft_vocab.keys():
        target_to_draft[target_vocab[token]] = draft_vocab[token]
        allowed[draft_vocab[token]] = True
    fallback = draft_tok.unk_token_id if draft_tok.unk_token_id is not None else draft_tok.eos_token_id
    if fallback is None:
        raise ValueError("the draft tokenizer has neither an unk nor an eos token for target tokens it lacks")
    return {
        "target_to_draft": target_to_draft,
        "draft_allowed": allowed,
        "draft_fallback": int(fallback),
        "shared": int(allowed.sum()),
    }


def to_draft_ids(mapping: dict, target_ids: list[int]) -> list[int]:
    """Target ids as the draft reads them under the intersection: one for one, absent ones as the fallback."""
    mapped = mapping["target_to_draft"][torch.tensor(target_ids, dtype=torch.long)]
    return torch.where(mapped < 0, mapping["draft_fallback"], mapped).tolist()


@torch.no_grad()
def tli_matches(draft, mapping: dict, items: list[dict], *, pad_id: int, batch_size: int, progress=None) -> list[dict]:
    """Per item, teacher-forced over the mapped prompt + y: matches[s] = the draft's argmax over the shared tokens
    at s is y[s] (mapped), and its top-2 gap there. The draft's input never depends on step boundaries under
    the intersection, so one pass gives every step for every k."""
    out: list[dict | None] = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(items[i]["prompt_ids"]) + len(items[i]["continuation_ids"]))
    allowed = mapping["draft_allowed"].to(draft.device)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        seqs = [to_draft_ids(mapping, items[i]["prompt_ids"] + items[i]["continuation_ids"]) for i in idx]
        ids, mask = right_padded(seqs, pad_id)
        logits = draft(input_ids=ids.to(draft.device), attention_mask=mask.to(draft.device)).logits.float()
        logits = logits.masked_fill(~allowed, float("-inf"))
        for row, i in enumerate(idx):
            p, y = len(items[i]["prompt_ids"]), items[i]["continuation_ids"]
            own = logits[row, p - 1 : p - 1 + len(y)]
            wanted = mapping["target_to_draft"][torch.tensor(y)].to(own.device)
            top = own.topk(2, dim=-1).values
            out[i] = {
                "matches": ((own.argmax(-1) == wanted) & (wanted >= 0)).cpu().tolist(),
                "gap": (top[:, 0] - top[:, 1]).cpu().tolist(),
            }
        if progress is not None:
            progress.update(len(idx))
    return out


def vllm_steps(runs: list[int], k: int) -> list[tuple[int, int]]:
    """(committed, drafted) per verification step as vLLM runs greedy drafting, the last step included.

    runs[t] = how many of y[t], y[t+1], ... the draft proposes right from t (sd2.measure.acceptance.match_runs).
    The prefill gives y[0] with no draft; every later step drafts k tokens and commits 1 + the accepted ones,
    the last step cut where y ends (its accepted count, as vLLM's counters see it, is `engine_counts`'s).
    """
    steps, t = [], 1
    while t < len(runs):
        accepted = min(runs[t], k)
        steps.append((min(accepted + 1, len(runs) - t), k))
        t += accepted + 1
    return steps


def engine_counts(runs: list[int], k: int) -> tuple[int, int]:
    """(accepted draft tokens, verification steps) as vLLM's spec-decode counters add them up over one request:
    every step, the last one included, accepted before any cut (within y: what the target says after y is not
    cached, so a last step that matched to y's end may count fewer than vLLM would)."""
    accepted, steps, t = 0, 0, 1
    while t < len(runs):
        a = min(runs[t], k)
        accepted, steps, t = accepted + a, steps + 1, t + a + 1
    return accepted, steps


class CachedModel:
    """A model run on a growing sequence with its keys and values kept: each call feeds only what follows the
    longest prefix it has already seen (the cache cropped to it), as a serving engine's decoding loop does."""

    def __init__(self, model):
        self.model, self.past, self.seen = model, None, []

    def logits(self, ids: list[int]) -> torch.Tensor:
        """The logits after every token of ids from the first one not cached on."""
        keep = min(_common_prefix(ids, self.seen), len(ids) - 1)
        if self.past is not None:
            self.past.crop(keep)
        out = self.model(
            input_ids=torch.tensor([ids[keep:]], device=self.model.device), past_key_values=self.past, use_cache=True
        )
        self.past, self.seen = out.past_key_values, list(ids)
        return out.logits[0].float()


@torch.no_grad()
def tli_generate(
    target, draft, mapping: dict, prompt_ids: list[int], *, k: int, max_new_tokens: int, eos_ids: set[int]
):
    """A greedy decoding loop under the token-level intersection, batch size 1, each model with its own cache.

    The measuring instrument the tli walk is checked against: the target generates its first token alone
    (vLLM's prefill), then every step the draft proposes k shared tokens from the mapped sequence, the target
    verifies them in one forward and commits the agreeing ones and its own next token. Returns (new tokens,
    [(committed, drafted)] per step, the last included) and the smallest draft top-2 gap per step.
    """
    allowed = mapping["draft_allowed"].to(draft.device)
    draft_to_target = torch.full((allowed.numel(),), -1, dtype=torch.long)
    shared = mapping["target_to_draft"] >= 0
    draft_to_target[mapping["target_to_draft"][shared]] = torch.nonzero(shared)[:, 0]
    target_run, draft_run = CachedModel(target), CachedModel(draft)
    seq, steps, gaps = list(prompt_ids), [], []
    new = [int(target_run.logits(seq)[-1].argmax())]
    while len(new) < max_new_tokens and new[-1] not in eos_ids:
        drafted, proposal, gap = to_draft_ids(mapping, seq + new), [], float("inf")
        for _ in range(k):
            logits = draft_run.logits(drafted)[-1].masked_fill(~allowed, float("-inf"))
            top = logits.topk(2).values
            gap = min(gap, float(top[0] - top[1]))
            choice = int(logits.argmax())
            proposal.append(int(draft_to_target[choice]))
            drafted = drafted + [choice]
        verdicts = target_run.logits(seq + new + proposal)[-k - 1 :].argmax(-1).tolist()
        accepted = next((i for i, (p, v) in enumerate(zip(proposal, verdicts)) if p != v), k)
        committed = (proposal[:accepted] + [verdicts[accepted]])[: max_new_tokens - len(new)]
        if any(token in eos_ids for token in committed):
            committed = committed[: next(i for i, token in enumerate(committed) if token in eos_ids) + 1]
        new += committed
        steps.append((len(committed), k))
        gaps.append(gap)
    return new, steps, gaps
