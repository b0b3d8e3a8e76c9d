"""What every draft head (sd2.drafters.base.DraftHead) shares: distillation training, batched rollouts,
offline measure, decoding. A head method's module is the registry's (sd2.methods.HEAD_FAMILIES).

Timing convention (the same in training, the offline measurement and the decoding loop):
prefill commits the target's first token y[0] itself (one target forward, nothing drafted).
A step that starts at committed length t >= 1 sees the target's hidden states of the verified
context, prompt + y[:t-1] (every position whose hidden state the target has computed: the last
committed token y[t-1] has none yet), and the last committed token y[t-1]; the head proposes k
tokens for y[t], ..., y[t+k-1] (ReDrafter with beam_width > 1: that many beams, verified as one
batch of paths; accepted = the longest beam prefix that the target's greedy tokens confirm).
In training the same holds at every position j of a sequence x: context x[:j] (hidden states
0..j-1), last token x[j], depth d predicts x[j+d] against the target's logits at j+d-1.

Offline measurement (estimator `rollout_walk`): a head's proposal at t depends on the target's
state at t, so the teacher-forced shortcut of sd2.measure.acceptance does not apply. For each cached
item one target forward over prompt + y gives every hidden state; the head's k-token rollouts
from every start t run batched over t; runs[t] = the matched prefix length of the proposal at t
(the longest over beams). `walk` = the prefill step (1 committed, 0 drafted) followed by
sd2.measure.acceptance.walk_runs over the starts t >= 1. Beam search of length k is not a prefix of
beam search of length k + 1, so with beams each k has its own rollouts; a chain (one beam)
rolls out once to k_max.

`decode` is our own greedy decoding loop (target KV cache, the head's proposal, one batched
target forward over the paths); `measure_head` checks on the first n_check prompts that it
commits the cached greedy continuation and that its per-step committed counts equal the walk's,
leaving out float near-ties (top-2 gaps below sd2.measure.drafts.NEAR_TIE) as sd2.measure.drafts does.
"""

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sd2 import chat, methods
from sd2.checkpoint import atomic_path, write_json
from sd2.drafters.base import head_device, on_head, target_forward
from sd2.macs import model_macs
from sd2.masks import apply_masks, magnitude_mask
from sd2.measure import acceptance, continuations
from sd2.measure.drafts import (
    DEFINITIONS,
    check_output,
    check_steps,
    check_summary,
    mark_best_k,
    summarize,
)
from sd2.models import load_checkpoint
from sd2.provenance import provenance
from sd2.training import lr_at, shuffled_batches

HEAD_WEIGHTS = "head.pt"
HEAD_CONFIG = "head.json"


# ---- rollouts: beam search (a chain is one beam), batched over queries ----


def propose(head, feats, item, ctx_len, last, k: int, beams: int):
    """The head's k-token proposal for every query: (tokens (Q, beams, k), margins (Q, k)).

    Beam search by summed log-probabilities; margins[:, i] is the gap at step i between the
    last kept and the first dropped candidate (for one beam: the top-2 gap), which tells a
    float near-tie from a real disagreement.
    """
    if beams > head.vocab:
        raise ValueError(f"beam_width {beams} exceeds the vocabulary ({head.vocab})")
    n_q = len(last)
    state = head.begin(feats, item, ctx_len, last)
    scores = torch.zeros((n_q, 1), device=head_device(head))
    tokens = torch.zeros((n_q, 1, 0), dtype=torch.long, device=scores.device)
    margins = []
    for step in range(k):
        logp = head.logits(state).log_softmax(-1).view(n_q, -1, head.vocab)
        total = (scores[:, :, None] + logp).view(n_q, -1)
        top = total.topk(min(beams + 1, total.shape[1]), dim=-1)
        kept = top.values[:, :beams]
        dropped = top.values[:, beams] if top.values.shape[1] > beams else torch.full_like(kept[:, 0], math.inf)
        margins.append(kept[:, -1] - dropped)
        parent, token = top.indices[:, :beams] // head.vocab, top.indices[:, :beams] % head.vocab
        tokens = torch.cat([tokens.gather(1, parent[..., None].expand(-1, -1, step)), token[..., None]], dim=-1)
        scores = kept
        if step + 1 < k:
            rows = (torch.arange(n_q, device=parent.device)[:, None] * logp.shape[1] + parent).reshape(-1)
            state = head.advance(head.index(state, rows), token.reshape(-1))
    return tokens, torch.stack(margins, dim=1)


def matched(tokens: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per query, the longest prefix of any beam that equals the reference: tokens (Q, B, k), reference (Q, k)."""
    return (tokens == reference[:, None, :]).long().cumprod(-1).sum(-1).max(-1).values


@torch.no_grad()
def item_runs(head, target, prompt: list[int], y: list[int], ks: list[int], beams: int, batch_size: int) -> dict:
    """runs[k][t] and gaps[k][t] for every start t of one item (t = 0, the prefill, gets 0 and inf).

    gaps[k][t] = the smallest rollout margin up to the first position the proposal missed.
    """
    device = head_device(head)
    ids = torch.tensor([prompt + y], device=target.device)
    feats = head.features(on_head(head, target_forward(target, ids).hidden_states))
    n_prompt, length = len(prompt), len(y)
    starts = torch.arange(1, length, device=device)
    y_pad = torch.tensor(y + [-1] * max(ks), device=device)
    out = {k: {"runs": [0] * length, "gaps": [math.inf] * length} for k in ks}
    # One beam: the length-k_max chain holds every shorter one.
    searches = [max(ks)] if beams == 1 else ks
    for chunk in starts.split(batch_size):
        for k_search in searches:
            tokens, margins = propose(
                head, feats, torch.zeros_like(chunk), n_prompt + chunk - 1, y_pad[chunk - 1], k_search, beams
            )
            reference = y_pad[chunk[:, None] + torch.arange(k_search, device=device)]
            for k in ks if beams == 1 else [k_search]:
                runs = matched(tokens[:, :, :k], reference[:, :k])
                # The margins that decided the proposal up to its first miss.
                upto = torch.arange(k, device=device)[None, :] <= runs[:, None]
                gaps = margins[:, :k].masked_fill(~upto, math.inf).min(-1).values
                for t, r, g in zip(chunk.tolist(), runs.tolist(), gaps.tolist()):
                    out[k]["runs"][t], out[k]["gaps"][t] = r, g
    return out


def walk(runs: list[int], k: int, max_new_tokens: int, ended_by_eos: bool) -> list[tuple[int, int]]:
    """(committed, drafted) per step: the prefill commits y[0] alone, then acceptance.walk_runs from t = 1."""
    if not runs:
        return []
    return [(1, 0)] + acceptance.walk_runs(runs[1:], k, max_new_tokens - 1, ended_by_eos)


# ---- our decoding loop ----


@torch.no_grad()
def decode(head, target, prompt: list[int], *, k: int, beams: int, max_new_tokens: int, eos_ids) -> dict:
    """Greedy speculative decoding with the head; tokens and (committed, drafted) per step (prefill first)."""
    eos_ids = set(eos_ids)
    device = head_device(head)
    out = target_forward(target, torch.tensor([prompt], device=target.device), use_cache=True)
    cache = out.past_key_values
    feats = head.features(on_head(head, out.hidden_states))
    token = int(out.logits[0, -1].argmax())
    tokens, steps = [token], [(1, 0)]
    while len(tokens) < max_new_tokens and token not in eos_ids:
        drafted = min(k, max_new_tokens - len(tokens) - 1)
        if drafted:
            one = torch.zeros(1, dtype=torch.long, device=device)
            paths, _ = propose(head, feats, one, one + feats.shape[1], one + token, k, beams)
            paths = paths[0, :, :drafted].to(target.device)
        else:
            paths = torch.zeros((1, 0), dtype=torch.long, device=target.device)
        rows = paths.shape[0]
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        fed = torch.cat([torch.full((rows, 1), token, device=target.device), paths], dim=1)
        out = target_forward(target, fed, past_key_values=cache, use_cache=True)
        greedy = out.logits.argmax(-1).to(paths.device)
        accepted = (paths == greedy[:, :-1]).long().cumprod(-1).sum(-1)
        best = int(accepted.argmax())
        a = int(accepted[best])
        new = paths[best, :a].tolist() + [int(greedy[best, a])]
        # An accepted end-of-text ends generation there (the target commits nothing after it).
        end = next((i for i, tok in enumerate(new) if tok in eos_ids), None)
        new = new if end is None else new[: end + 1]
        if rows > 1:
            # A CPU index: with device_map auto the cache's layers sit on several devices.
            cache.batch_select_indices(torch.tensor([best]))
        if drafted > a:
            cache.crop(-(drafted - a))
        verified = tuple(h[best : best + 1, : a + 1] for h in out.hidden_states)
        feats = torch.cat([feats, head.features(on_head(head, verified))], dim=1)
        tokens += new
        steps.append((len(new), drafted))
        token = new[-1]
    return {"tokens": tokens, "steps": steps}


# ---- training: distillation from the target, teacher forcing over the head's depth ----


def distill_loss(head, target, batch: dict, depth: int) -> tuple[torch.Tensor, int]:
    """Mean over (start j, depth d) of KL(target || head): the target's softmax at j+d-1 against the head's
    step-d distribution, over positions whose token x[j+d] is a trained answer token; the head's inputs
    are the true tokens x[j..j+d-1] (teacher forcing)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        out = target_forward(target, ids, mask)
    feats = head.features(on_head(head, out.hidden_states))
    width = ids.shape[1]
    # Starts j >= 1 (a head needs at least one hidden state) whose first prediction x[j+1] is trained on.
    valid_start = torch.zeros_like(labels, dtype=torch.bool)
    valid_start[:, 1 : width - 1] = labels[:, 2:] != -100
    item, start = valid_start.nonzero(as_tuple=True)
    if item.numel() == 0:
        raise ValueError("a training batch has no answer tokens to distill on")
    state = head.begin(feats, item, start, ids[item, start])
    total, count = 0.0, 0
    for d in range(1, depth + 1):
        at = start + d
        inside = at < width
        at_c = at.clamp(max=width - 1)
        keep = inside & (labels[item, at_c] != -100)
        logits = head.logits(state)
        teacher = out.logits[item, at_c - 1].float().log_softmax(-1).to(logits.device)
        kl = (teacher.exp() * (teacher - logits.log_softmax(-1))).sum(-1)
        total = total + kl[keep].sum()
        count += int(keep.sum())
        if d < depth:
            state = head.advance(state, ids[item, at_c])
    return total / max(count, 1), count


def head_class(method: str):
    """The nn.Module class of a head method: the registry's head family's module."""
    return methods.resolve(methods.head_family(method).module)


def split_name(head: str) -> tuple[str, str]:
    """(method, size) from a head name like redrafter-small."""
    method, sep, size = head.partition("-")
    if not sep or not size:
        raise ValueError(f"head name {head!r} is not <method>-<size> (e.g. redrafter-small)")
    methods.head_family(method)
    return method, size


def build_head(method: str, size: dict, target):
    """A fresh head of `method` with its heads.sizes entry (e.g. {layers: 1}); null values take the default."""
    given = {key: value for key, value in size.items() if value is not None}
    try:
        return head_class(method)(target, **given)
    except TypeError as err:
        raise ValueError(f"{method}: size {size} has a key this head does not take ({err})") from err


def magnitude_masks(head, sparsity: float) -> dict:
    """Per linear layer of the head (not the shared embeddings), a mask keeping its largest |weights|, 1 - sparsity."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"head sparsity must be a fraction in [0, 1), got {sparsity}")
    linears = {name: m for name, m in head.named_modules() if isinstance(m, torch.nn.Linear)}
    return {name: magnitude_mask(module.weight, sparsity) for name, module in linears.items()}


def _training_batches(tokenizer, target, target_dir, data_dir, settings, chat_settings, seed: int):
    """(endless shuffled batches of the self-distilled examples on the target's device, the data's format)."""
    from datasets import load_from_disk

    data = load_from_disk(str(data_dir))
    if not chat.is_self_distilled(data):
        raise ValueError(
            f"{data_dir} is not a self-distilled dataset (no target_prompt column): see sd2/drafts/distill.py"
        )
    if settings["max_examples"]:
        data = data.select(range(min(settings["max_examples"], len(data))))
    examples, fmt = chat.encode_dataset(tokenizer, data, data_dir, chat_settings, settings["seq_len"])
    if fmt["format"] != "target":
        raise ValueError(f"{data_dir} was distilled by a target with another tokenizer than {target_dir}")
    examples = [e for e in examples if sum(label != -100 for label in e["labels"][2:])]
    if not examples:
        raise ValueError(f"{data_dir}: no example has an answer token past its first two positions")
    return shuffled_batches(examples, settings["batch_size"], tokenizer.pad_token_id, seed, device=target.device), fmt


def _fit(head, target, batches, settings, steps: int, desc: str, run=None, masks=None) -> list[dict]:
    """AdamW with warmup and cosine decay on distill_loss; masked weights stay zero (re-applied after every step)."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings["lr"], weight_decay=0.0)
    history, started = [], time.time()
    bar = tqdm(range(steps), desc=desc, mininterval=5)
    for step in bar:
        lr = lr_at(step, steps, settings["lr"], settings["warmup"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, count = distill_loss(head, target, next(batches), settings["depth"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        if masks:
            apply_masks(head, masks)
        if step % settings["log_every"] == 0 or step == steps - 1:
            row = {
                "step": step,
                "train_loss": loss.item(),
                "positions": count,
                "lr": lr,
                "seconds": time.time() - started,
            }
            history.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}")
            if run is not None:
                run.log(row)
    return history


def train_head(
    target_dir,
    data_dir,
    out_dir,
    *,
    head_name: str,
    size: dict,
    settings: dict,
    chat_settings: dict | None,
    seed: int,
    beam_width: int,
    trust_remote_code: bool,
    dtype,
    init_dir=None,
    sparsity: int = 0,
    run=None,
    device: str | None = None,
    device_map=None,
) -> dict:
    """Train head `head_name` (<method>-<size>) on the target's self-distilled data; write it to out_dir.

    settings: the config's heads.train (steps, sparse_steps, batch_size, lr, warmup, seq_len, depth,
    max_examples, log_every). The target is frozen; its hidden states and logits are computed per batch.
    With init_dir (a trained dense head) and sparsity (percent): that head's own linear layers are
    magnitude-pruned per layer to `sparsity` and trained sparse_steps more steps with the masks fixed.
    """
    method, _ = split_name(head_name)
    torch.manual_seed(seed)
    target, tokenizer = load_checkpoint(target_dir, trust_remote_code, device, dtype=dtype, device_map=device_map)
    target.eval().requires_grad_(False)
    batches, fmt = _training_batches(tokenizer, target, target_dir, data_dir, settings, chat_settings, seed)
    if init_dir is None:
        if sparsity:
            raise ValueError(f"{head_name}: a sparse head ({sparsity}%) starts from a trained dense head (init_dir)")
        head, dense = build_head(method, size, target).to(target.get_input_embeddings().weight.device), None
        history = _fit(head, target, batches, settings, settings["steps"], f"train {head_name}", run)
    else:
        head, dense = load_head(init_dir, target)
        if dense["method"] != method or dense["size"] != size:
            raise ValueError(f"{init_dir} is a {dense['head']} head with size {dense['size']}, not {head_name} {size}")
        history = _fit_sparse(
            head, target, batches, settings, sparsity, f"train {head_name} at {sparsity}% sparsity", run
        )
    info = {
        "head": head_name,
        "method": method,
        "size": size,
        "sparsity": sparsity,
        "init": None if init_dir is None else str(init_dir),
        "beam_width": beam_width,
        "target": str(target_dir),
        **_head_sizes(head),
        "shared_with_target": "input embedding and lm_head (the target's own weights, frozen, not saved here)",
        "data_format": fmt,
        "history": history,
        "dense_history": None if dense is None else dense["history"],
        "provenance": provenance(seed=seed, **settings, chat=chat_settings),
    }
    _save_head(out_dir, head, info)
    return info


def _fit_sparse(head, target, batches, settings, sparsity: int, desc: str, run) -> list[dict]:
    """Magnitude-prune a trained dense head's own linear layers to `sparsity` percent, then train it
    settings["sparse_steps"] more steps with those masks held."""
    head.train()
    masks = magnitude_masks(head, sparsity / 100)
    apply_masks(head, masks)
    return _fit(head, target, batches, settings, settings["sparse_steps"], desc, run, masks)


def _head_sizes(head) -> dict:
    """The target's shapes the head was trained on, and the head's parameters and MACs per drafted token."""
    return {
        "target_hidden_size": head.target_hidden,
        "target_layers": head.target_layers,
        "vocab": head.vocab,
        "parameters": sum(p.numel() for p in head.parameters()),
        "nonzero_parameters": sum(int(torch.count_nonzero(p)) for p in head.parameters()),
        "macs_per_token": head.macs_per_token(),
        "dense_macs_per_token": head.macs_per_token(dense=True),
    }


def _save_head(out_dir, head, info: dict) -> None:
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        torch.save(head.state_dict(), tmp / HEAD_WEIGHTS)
        write_json(tmp / HEAD_CONFIG, info)


def load_head(head_dir, target):
    """A trained head on `target` (which must have the shapes it was trained on)."""
    head_dir = Path(head_dir)
    path = head_dir / HEAD_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{head_dir} is not a trained head (no {HEAD_CONFIG}): run `python -m sd2 train-head`")
    info = json.loads(path.read_text())
    head = build_head(info["method"], info["size"], target)
    found = (head.target_hidden, head.target_layers, head.vocab)
    expected = (info["target_hidden_size"], info["target_layers"], info["vocab"])
    if found != expected:
        raise ValueError(
            f"{head_dir} was trained on a target with (hidden, layers, vocab) = {expected}, this target has {found}"
        )
    device = target.get_input_embeddings().weight.device
    head.load_state_dict(torch.load(head_dir / HEAD_WEIGHTS, map_location=device, weights_only=True))
    return head.to(device).eval(), info


# ---- rule measure_head ----

HEAD_DEFINITIONS = {
    **DEFINITIONS,
    "estimator": "rollout_walk: a draft head's proposal at every start t comes from its own k-token rollout "
    "(beam search, one beam = a chain) fed the target's hidden states of prompt + y[:t-1] from one target "
    "forward over prompt + the cached greedy continuation y; runs[t] = the longest proposal prefix matching "
    "y; steps: the prefill (1 committed, 0 drafted), then sd2.measure.acceptance.walk_runs from t = 1. Checked "
    "against our own decoding loop (sd2.drafters.heads.decode) on checked_prompts.",
    "draft_macs_per_token": "the head's linear-layer weight MACs per drafted token (sd2.macs conventions; the "
    "shared lm_head counted, embedding lookups free, the target's activations reused and not counted) times "
    "beam_width (every beam computes its token): the cost of one drafted position.",
    "checks": "checked_prompts/checked_steps: prompts and verification steps where our decoding loop committed the "
    "target's cached greedy continuation with the walk's per-step counts. target_near_ties: prompts whose output "
    "differs where the target's top two logits differ by less than 1e-4; draft_near_ties: prompts whose counts "
    "differ where the head's rollout margin (top-2 log-prob gap, or for beams the gap between the last kept and "
    "the first dropped candidate) up to the first miss is below 1e-4.",
    "sparsity": "for a head: percent of its own linear weights pruned by magnitude (the target's shared embedding "
    "and lm_head stay dense); 0 = the dense head.",
    "tokens_per_s": "greedy, batch size 1, the first n_check prompts but the first warmup_prompts: ar = the "
    "target alone (from the target_outputs job), sd = our decoding loop with this head (sd2.drafters.heads.decode); "
    "speedup = sd_tokens_per_s / ar_tokens_per_s. With beams the target verifies beam_width paths per step, which "
    "the improvement factor (one chain's MACs) does not count.",
}


def measure_head(
    target_dir,
    head_dir,
    outputs_path,
    out_path,
    *,
    settings: dict,
    labels: dict,
    seed: int,
    trust_remote_code: bool,
    dtype,
    beam_width: int | None = None,
    run=None,
    device: str | None = None,
    device_map=None,
) -> dict:
    """Every greedy record (k = 1..k_max) of one head on one eval set, as one JSON file at out_path.

    settings: the config's measure section (n_prompts, max_new_tokens, k_max, k, n_check,
    warmup_prompts, bootstrap, batch_size = rollout starts per batch). beam_width None: the head's own.
    """
    cached, items = _cached_items(outputs_path, settings)
    target, tokenizer = load_checkpoint(target_dir, trust_remote_code, device, dtype=dtype, device_map=device_map)
    target.eval()
    head, info = load_head(head_dir, target)
    beams = beam_width or info["beam_width"]
    if info["method"] != "redrafter" and beams != 1:
        raise ValueError(
            f"{head_dir}: beam_width {beams}, but only ReDrafter proposes beams ({info['method']} drafts a chain)"
        )
    max_new, ks = settings["max_new_tokens"], list(range(1, settings["k_max"] + 1))
    base = _record_base(labels, head, target, beams, cached)
    cost_ratio = base["macs_ratio"]
    rollouts = [
        item_runs(head, target, it["prompt_ids"], it["continuation_ids"], ks, beams, settings["batch_size"])
        for it in tqdm(items, desc="head rollouts", mininterval=5)
    ]
    walks = {k: [walk(r[k]["runs"], k, max_new, it["ended_by_eos"]) for r, it in zip(rollouts, items)] for k in ks}
    checks = {
        k: _decoding_check(head, target, items, walks[k], rollouts, k, beams, settings, cached) for k in settings["k"]
    }
    records = [
        {
            **base,
            "temperature": 0.0,
            "k": k,
            "estimator": "rollout_walk",
            **summarize(walks[k], k, cost_ratio, settings["bootstrap"], seed),
            **checks.get(k, {}),
            "provenance": provenance(seed=seed, **settings, beam_width=beams, head=info["provenance"]),
        }
        for k in ks
    ]
    mark_best_k(records)
    if run is not None:
        for record in records:
            run.log({key: v for key, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    output = {"definitions": HEAD_DEFINITIONS, "prompt_ids": [it["id"] for it in items], "records": records}
    write_json(out_path, output, indent=None)
    return output


def _record_base(labels: dict, head, target, beams: int, cached: dict) -> dict:
    """What every record of the head shares: its labels, its and the target's MACs per token, how it decodes."""
    target_macs = model_macs(target)["macs_per_token"]
    draft_macs = head.macs_per_token() * beams
    return {
        **{key: labels.get(key) for key in ("target", "draft", "method", "sparsity", "eval_set")},
        "draft_macs_per_token": draft_macs,
        "target_macs_per_token": target_macs,
        "macs_ratio": draft_macs / target_macs,
        "head_macs_per_token": head.macs_per_token(),
        "beam_width": beams,
        "same_tokenizer": True,
        "decoding_path": "draft_head",
        "device": str(target.device),
        "prompt_format": cached["provenance"]["settings"].get("chat"),
    }


def _cached_items(outputs_path, settings: dict) -> tuple[dict, list[dict]]:
    """(the target's cached continuations, the items measured: the first n_prompts)."""
    cached = continuations.load(outputs_path)
    if cached["max_new_tokens"] != settings["max_new_tokens"]:
        raise ValueError(
            f"{outputs_path} holds continuations of {cached['max_new_tokens']} tokens, "
            f"the settings ask for {settings['max_new_tokens']}"
        )
    items = cached["items"][: settings["n_prompts"]] if settings["n_prompts"] else cached["items"]
    return cached, items


def _decoding_check(head, target, items, walks_k, rollouts, k: int, beams: int, settings: dict, cached) -> dict:
    """check_summary of our decoding loop at `k` on the first n_check items against the cached greedy
    continuation and the walk, and its tokens/s after warmup_prompts."""
    eos = target.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
    real, seconds = [], []
    for it in items[: settings["n_check"]]:
        began = time.perf_counter()
        real.append(
            decode(
                head, target, it["prompt_ids"], k=k, beams=beams, max_new_tokens=settings["max_new_tokens"], eos_ids=eos
            )
        )
        seconds.append(time.perf_counter() - began)
    outputs_ok = [check_output(target, it, r["tokens"], k) for it, r in zip(items, real)]
    steps_ok = [
        ok and check_steps(it, r["steps"], walks_k[i], rollouts[i][k]["gaps"], k)
        for i, (ok, it, r) in enumerate(zip(outputs_ok, items, real))
    ]
    timed = slice(settings["warmup_prompts"], None)
    sd_speed = sum(len(r["tokens"]) for r in real[timed]) / sum(seconds[timed]) if sum(seconds[timed]) else None
    return check_summary(outputs_ok, steps_ok, real, sd_speed, cached["timing"]["ar_tokens_per_s"])
