"""Rule target_outputs: the target's greedy continuation of every eval prompt, computed once.

Greedy speculative decoding is lossless, so what it commits is exactly this continuation
for every draft: each (target, eval set) generates it once, batched, and every
measurement job of the sweep reads it. The same job times the target alone, batch size
1, on the first prompts (the autoregressive side of the measured speed-up).

With engine.name vllm (sd2.engines) vLLM generates the continuations; the batch-1 timing stays
on transformers, first, before vLLM preallocates the GPUs: speculative decoding is measured
with transformers' generate, so its autoregressive baseline must be the same engine.
batch1_differs then counts prompts where transformers' batch-1 greedy output differs from vLLM's.
"""

import gc
import json
import time

import torch
from tqdm.auto import tqdm

from sd2 import chat, engines
from sd2.checkpoint import write_json
from sd2.drafts.distill import generate_batch
from sd2.measure.speculative import ar_generate, decoding_kwargs, load_prompts
from sd2.models import default_device, load_model, load_tokenizer
from sd2.provenance import provenance


def generate_all(
    model, tokenizer, prompts: list[dict], *, max_new_tokens: int, batch_size: int, chat_settings: dict | None = None
) -> list[dict]:
    """Greedy continuation of every prompt (formatted by sd2.chat) in left-padded batches of similar lengths."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]["prompt"]))
    items: list[dict | None] = [None] * len(prompts)
    for b in tqdm(range(0, len(order), batch_size), desc="target continuations", unit="batch", mininterval=5):
        idx = order[b : b + batch_size]
        rows = generate_batch(
            model,
            tokenizer,
            [prompts[i]["prompt"] for i in idx],
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            chat_settings=chat_settings,
        )
        for i, row in zip(idx, rows):
            items[i] = _item(prompts[i], row)
    return items


def _item(prompt: dict, row: dict) -> dict:
    """One continuation record from a row of sd2.drafts.distill.generate_batch (or sd2.engines.generate)."""
    if not row["prompt_ids"]:
        raise ValueError(f"prompt id {prompt['id']!r} is empty after tokenization")
    return {
        "id": prompt["id"],
        "prompt_ids": row["prompt_ids"],
        "continuation_ids": row["new_ids"],
        "text": row["response"],
        "ended_by_eos": row["finished"],
    }


def time_target_alone(
    model, tokenizer, items: list[dict], *, n_timed: int, warmup_prompts: int, max_new_tokens: int
) -> dict:
    """Target-alone greedy decoding, batch size 1, on the first n_timed prompts (the first warmup_prompts untimed).

    Also counts prompts whose batch-1 output differs from the batched one (left padding
    changes the kernels' shapes, so a near-tie can break differently).
    """
    timing, outputs = _batch1(
        model, tokenizer, items, n_timed=n_timed, warmup_prompts=warmup_prompts, max_new_tokens=max_new_tokens
    )
    return {**timing, "batch1_differs": _differ(items, outputs)}


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
    return [item["id"] for item, new in zip(items, outputs) if new != item["continuation_ids"]]


def _with_vllm(
    target_dir, tokenizer, prompts, settings, chat_settings, engine, *, seed, trust, dtype, device_map, gpus
):
    """(items, timing, generation seconds): batch-1 timing on transformers first, then vLLM's continuations."""
    ids = [{"id": p["id"], "prompt_ids": chat.prompt_ids(tokenizer, p["prompt"], chat_settings)} for p in prompts]
    model = load_model(target_dir, trust, dtype=dtype, device=default_device(), device_map=device_map)
    timing, outputs = _batch1(
        model,
        tokenizer,
        ids,
        n_timed=settings["n_check"],
        warmup_prompts=settings["warmup_prompts"],
        max_new_tokens=settings["max_new_tokens"],
    )
    # vLLM preallocates gpu_memory_utilization of each GPU when it starts: free transformers' copy first.
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    llm = engines.load_llm(
        target_dir,
        engine,
        dtype=dtype,
        gpus=gpus,
        seed=seed,
        trust_remote_code=trust,
        max_model_len=max(len(i["prompt_ids"]) for i in ids) + settings["max_new_tokens"],
    )
    start = time.time()
    rows = engines.generate(
        llm,
        tokenizer,
        [p["prompt"] for p in prompts],
        max_new_tokens=settings["max_new_tokens"],
        temperature=0.0,
        eos=engines.eos_ids(target_dir, trust),
        seeds=[seed] * len(prompts),
        chat_settings=chat_settings,
    )
    seconds = time.time() - start
    items = [_item(p, row) for p, row in zip(prompts, rows)]
    return items, {**timing, "batch1_differs": _differ(items, outputs)}, seconds


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
    settings["engine"] (the config's engine section) picks transformers or vLLM for the continuations.
    """
    tokenizer = load_tokenizer(target_dir, trust_remote_code)
    prompts = load_prompts(eval_dir, settings["n_prompts"])
    chat_settings = chat.resolve(settings.get("chat"))
    engine = engines.resolve(settings.get("engine"))
    if engine["name"] == "vllm":
        items, timing, seconds = _with_vllm(
            target_dir,
            tokenizer,
            prompts,
            settings,
            chat_settings,
            engine,
            seed=seed,
            trust=trust_remote_code,
            dtype=dtype,
            device_map=device_map,
            gpus=gpus,
        )
    else:
        model = load_model(target_dir, trust_remote_code, dtype=dtype, device=default_device(), device_map=device_map)
        torch.manual_seed(seed)
        start = time.time()
        items = generate_all(
            model,
            tokenizer,
            prompts,
            max_new_tokens=settings["max_new_tokens"],
            batch_size=settings["batch_size"],
            chat_settings=chat_settings,
        )
        seconds = time.time() - start
        timing = time_target_alone(
            model,
            tokenizer,
            items,
            n_timed=settings["n_check"],
            warmup_prompts=settings["warmup_prompts"],
            max_new_tokens=settings["max_new_tokens"],
        )
    new_tokens = sum(len(i["continuation_ids"]) for i in items)
    out = {
        "target": str(target_dir),
        "eval_set": str(eval_dir),
        "max_new_tokens": settings["max_new_tokens"],
        "stats": {
            "prompts": len(items),
            "new_tokens": new_tokens,
            "ended_by_eos": sum(i["ended_by_eos"] for i in items),
            "generation_seconds": round(seconds, 2),
            "batched_tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1),
        },
        "timing": timing,
        "provenance": provenance(
            seed=seed,
            settings=settings,
            decoding="greedy",
            padding="left" if engine["name"] == "transformers" else None,
            engine=engine,
            chat=chat.describe(tokenizer, chat_settings),
        ),
        "items": items,
    }
    write_json(out_path, out, indent=None)
    print(
        json.dumps(
            {
                **out["stats"],
                **{k: v for k, v in timing.items() if k != "batch1_differs"},
                "batch1_differs": len(timing["batch1_differs"]),
            }
        )
    )
    return out


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)
