"""Rule target_outputs: the target's greedy continuation of every eval prompt, computed once.

Greedy speculative decoding is lossless, so what it commits is exactly this continuation
for every draft: each (target, eval set) generates it once, batched, and every
measurement job of the sweep reads it. The same job times the target alone, batch size
1, on the first prompts (the autoregressive side of the measured speed-up).

The config's engine section picks what generates the continuations (sd2.generation). The
batch-1 timing always runs on transformers, first, before vLLM (where it is the engine)
preallocates the GPUs: speculative decoding is measured with transformers' generate, so its
autoregressive baseline must be the same engine. batch1_differs counts prompts where the
batch-1 greedy output differs from the batched one.
"""

import json
import time

import torch
from tqdm.auto import tqdm

from sd2 import chat, generation
from sd2.checkpoint import write_json
from sd2.generation import decoding_kwargs
from sd2.measure.speculative import ar_generate, load_prompts
from sd2.models import load_tokenizer
from sd2.provenance import provenance


def generate_all(engine, prompts: list[dict], *, max_new_tokens: int, batch_size: int) -> list[dict]:
    """Greedy continuation of every prompt (formatted by sd2.chat) in batches of similar lengths."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]["prompt"]))
    batches = {n: order[b : b + batch_size] for n, b in enumerate(range(0, len(order), batch_size))}
    bar = tqdm(total=len(batches), desc="target continuations", unit="batch", mininterval=5)
    pairs = engine.generate(
        [p["prompt"] for p in prompts], batches, max_new_tokens=max_new_tokens, temperature=0.0, bar=bar
    )
    bar.close()
    items: list[dict | None] = [None] * len(prompts)
    for i, row in pairs:
        items[i] = _item(prompts[i], row)
    return items


def _item(prompt: dict, row: dict) -> dict:
    """One continuation record from a row of sd2.generation."""
    return {
        "id": prompt["id"],
        "prompt_ids": _nonempty(prompt, row["prompt_ids"]),
        "continuation_ids": row["new_ids"],
        "text": row["response"],
        "ended_by_eos": row["finished"],
    }


def _nonempty(prompt: dict, ids: list[int]) -> list[int]:
    if not ids:
        raise ValueError(f"prompt id {prompt['id']!r} is empty after tokenization")
    return ids


def time_target_alone(engine, prompts: list[dict], chat_settings: dict, settings: dict) -> tuple[dict, list]:
    """(timing of batch-1 greedy decoding of the first n_check prompts, the new ids of each), on transformers.

    The first warmup_prompts are decoded but not timed.
    """
    n_timed = settings["n_check"]
    items = [
        {"prompt_ids": _nonempty(p, chat.prompt_ids(engine.tokenizer, p["prompt"], chat_settings))}
        for p in prompts[:n_timed]
    ]
    return _batch1(
        engine.transformers_model(),
        engine.tokenizer,
        items,
        n_timed=n_timed,
        warmup_prompts=settings["warmup_prompts"],
        max_new_tokens=settings["max_new_tokens"],
    )


def _batch1(model, tokenizer, items, *, n_timed: int, warmup_prompts: int, max_new_tokens: int):
    """(timing of batch-1 greedy decoding of items[:n_timed] from their prompt_ids, the new ids of each)."""
    gen_kwargs = decoding_kwargs(0.0, max_new_tokens, tokenizer.pad_token_id)
    seconds, tokens, outputs = 0.0, 0, []
    for index, item in enumerate(items[:n_timed]):
        input_ids = torch.tensor([item["prompt_ids"]], device=model.device)
        start = time.perf_counter()
        new = ar_generate(model, input_ids, gen_kwargs)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        elapsed = time.perf_counter() - start
        outputs.append(new.tolist())
        if index >= warmup_prompts:
            seconds, tokens = seconds + elapsed, tokens + new.numel()
    timing = {
        "timed_prompts": max(0, min(n_timed, len(items)) - warmup_prompts),
        "ar_tokens": tokens,
        "ar_seconds": round(seconds, 4),
        "ar_tokens_per_s": tokens / seconds if seconds else None,
    }
    return timing, outputs


def _differ(items: list[dict], outputs: list[list[int]]) -> list:
    """Ids of the prompts whose batch-1 output differs from the batched one (left padding changes the
    kernels' shapes, so a near-tie can break differently)."""
    return [item["id"] for item, new in zip(items, outputs) if new != item["continuation_ids"]]


def _stats(items: list[dict], seconds: float) -> dict:
    new_tokens = sum(len(i["continuation_ids"]) for i in items)
    return {
        "prompts": len(items),
        "new_tokens": new_tokens,
        "ended_by_eos": sum(i["ended_by_eos"] for i in items),
        "generation_seconds": round(seconds, 2),
        "batched_tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1),
    }


def _summary(out: dict) -> str:
    """One JSON line for the log: the stats and the timing, batch1_differs counted."""
    timing = out["timing"]
    shown = {k: v for k, v in timing.items() if k != "batch1_differs"}
    return json.dumps({**out["stats"], **shown, "batch1_differs": len(timing["batch1_differs"])})


def target_outputs(
    target_dir,
    eval_dir,
    out_path,
    *,
    settings: dict,
    seed: int,
    trust_remote_code: bool = False,
    dtype="auto",
    device_map=None,
    gpus: int = 0,
) -> dict:
    """Write {items: [{id, prompt_ids, continuation_ids, text, ended_by_eos}], timing, provenance} as JSON.

    prompt_ids are the eval prompt as the target sees it (its chat template applied where
    settings["chat"] allows); every measurement of the sweep then uses these ids.
    settings["engine"] (the config's engine section) picks what generates the continuations.
    """
    tokenizer = load_tokenizer(target_dir, trust_remote_code)
    prompts = load_prompts(eval_dir, settings["n_prompts"])
    chat_settings = chat.resolve(settings.get("chat"))
    loading = {"trust_remote_code": trust_remote_code, "dtype": dtype, "device_map": device_map}
    engine = generation.engine(
        settings["engine"], target_dir, tokenizer, chat_settings, seed=seed, gpus=gpus, loading=loading
    )
    timing, outputs = time_target_alone(engine, prompts, chat_settings, settings)
    engine.start([p["prompt"] for p in prompts], settings["max_new_tokens"])
    start = time.time()
    items = generate_all(engine, prompts, max_new_tokens=settings["max_new_tokens"], batch_size=settings["batch_size"])
    out = {
        "target": str(target_dir),
        "eval_set": str(eval_dir),
        "max_new_tokens": settings["max_new_tokens"],
        "stats": _stats(items, time.time() - start),
        "timing": {**timing, "batch1_differs": _differ(items, outputs)},
        "provenance": provenance(
            seed=seed,
            settings=settings,
            decoding="greedy",
            padding=engine.padding,
            engine=engine.settings,
            chat=chat.describe(tokenizer, chat_settings),
        ),
        "items": items,
    }
    write_json(out_path, out, indent=None)
    print(_summary(out))
    return out


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)
