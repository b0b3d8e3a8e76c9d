"""Memory plan: how many GPUs and how much host memory each model job needs, from model sizes alone.

Snakemake calls this while it builds the DAG, so it needs no torch and no weights: a model's
sizes come from its `shape` in the config (hub ids), its config.json (a local checkpoint
directory) or its from-scratch spec. Every count is in bytes and written out below, so a
plan can be checked by hand (tests/test_memory.py does, for 70B / 8B / 3B / 1B models).

What each rule holds at its peak (T = tokens in flight, h = hidden size, i = MLP size,
L = decoder layers, V = vocabulary, b = bytes per weight in the dtype the job loads):
- inference (self_distill, target_outputs, model_report, measure): weights + KV cache of
  the whole batch (2 L kv_heads head_dim b per token) + one layer's activations over the
  prefill (T (4h + 3i) b: q/k/v/o inputs and outputs, the MLP's gate, up and product) +
  logits (fp32, with their softmax: 8 bytes per token and vocabulary entry; generation keeps
  the last position only, the teacher-forced passes of `measure` every position).
- SparseGPT pruning (llm-compressor's sequential pipeline): on the GPU one decoder layer at a
  time (or the embedding, if larger), the fp32 Hessian of every linear of that layer
  (in_features^2 x 4 bytes: q, k, v, gate and up read h inputs, o reads heads x head_dim,
  down reads i), SparseGPT's fp32 copy of the largest weight and its inverse Hessian, and one
  calibration sample's activations. The host holds the model twice (prune.py keeps the
  originals beside llm-compressor's working copy) and the cached layer inputs of every
  calibration sample (samples x seq_len x h x b, inputs and outputs of a layer at once).
- fine-tuning: full AdamW on fp32 master weights (4 weights + 4 gradients + 8 moments = 16
  bytes per parameter), bf16 autocast's copies of the weights (2 bytes per parameter), a bool
  mask per decoder weight, gradient checkpointing at the
  micro-batch (the fp32 residual stream at every layer boundary, plus one layer recomputed
  with its gradients: T (4h + 3i) x 4 bytes) and the output layer in chunks (sd2's chunked
  loss keeps about four fp32 tensors of 2^27 logits alive: 2 GiB).
- parallel drafting (the `pard` loss, sd2.parallel): fine-tuning reads each row with its mask
  chains, at most seq_len x (1 + the share of chains kept at each depth) slots (3.37 x seq_len
  at PARD's k = 8, keep 0.7, keep_min 0.2), so its activations are those of that many tokens, and
  adds the row's additive attention mask (slots^2, counted at 4 bytes); measuring a parallel
  draft scores prompt + new tokens + (k_max - 1) masks per new token in one pass, with its mask.
- pretraining: as fine-tuning, without checkpointing (every layer's activations are kept)
  and with the full logits of the batch (logits, softmax and gradient: 12 bytes an entry).
- head training (train_head, train_sparse_head): the frozen target's forward over a batch with
  every hidden state and its logits, the head's AdamW states (at most 16 H^2 parameters) and the
  head's logits over its depth, kept for the backward pass.
- layer_prune, magnitude pruning and the data rules run on the CPU: no GPU.
- with engine.name vllm, self_distill and target_outputs generate with vLLM, which preallocates
  engine.gpu_memory_utilization of every GPU it runs on (tensor parallel): the weights, then a
  KV cache from the rest. Such a job asks for the fewest GPUs whose preallocated share holds the
  weights and the KV cache of one longest sequence (prompt + new tokens, or engine.max_model_len;
  vLLM will not start with less), rounded up to a count that divides the attention heads (tensor parallelism splits
  them); its GPU bytes are that whole share, the part beyond the weights counted as KV cache.
  Every GPU's worker is its own process (HOST_BASE each). target_outputs also times the target
  alone on transformers first (batch 1), so it gets at least the GPUs that needs.

GPUs = ceil(GPU bytes / (90% of resources.gpu_mem_gb)); in a job that needs more than one,
the largest model is spread over them (device_map="auto"). Host memory = what is loaded
on the CPU before it moves to a GPU, or everything for a CPU job, plus HOST_BASE.
"""

import math
from dataclasses import dataclass, field

from sd2 import methods, variants
from sd2.errors import ConfigError
from sd2.shapes import Shape, model_shape

GB = 10**9
MiB = 2**20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The plan fills at most this share of a GPU: the CUDA context, cuBLAS workspaces and the
# caching allocator's fragmentation take the rest.
USABLE_GPU_SHARE = 0.9
# Python, torch and the CUDA libraries, tokenizers, the job's dataset and JSON records.
HOST_BASE = 8 * GB
# Where the config sets no distill.max_prompt_tokens (and for the eval sets, whose prompts are
# not limited), the plan assumes prompts of at most this many tokens (UltraChat's first turns
# and the eval sets' prompts are far shorter).
PROMPT_TOKENS = 2048
# sd2.chunked_loss: one chunk's fp32 logits hold 2^27 entries; about four such tensors live at once.
CHUNK_LOGITS = 2**27
# Prompts the model report continues, 16 at a time, for 128 tokens (sd2.report.model_report.report).
REPORT_BATCH, REPORT_NEW_TOKENS = 16, 128
# Trainable parameters of a draft head, in units of the target's hidden size squared: an upper
# bound for the heads of sd2.drafters (ReDrafter's large size has 12 H^2, MoA's fewer).
HEAD_PARAMS_PER_HIDDEN2 = 16
# Wall-time class of each model rule (resources.runtime_min.<class>); the head rules share the
# plans of train_head (training) and target_outputs (measure_head).
RUNTIME_CLASS = {
    "pretrain": "training",
    "finetune": "training",
    "train_head": "training",
    "self_distill": "inference",
    "target_outputs": "inference",
    "measure": "inference",
    "model_report": "inference",
    "prune": "calibration",
    "quantize": "calibration",
    "layer_prune": "light",
    "layer_subset": "light",
}


@dataclass
class Plan:
    """One job: its GPUs, the bytes it needs on them and on the host, and how each model is placed."""

    rule: str
    models: dict  # role -> model name
    gpus: int
    gpu_bytes: int
    host_bytes: int
    dtypes: dict  # role -> dtype the job loads the model in
    spread: dict  # role -> True for the model spread over the job's GPUs (device_map="auto")
    parts: dict = field(default_factory=dict)  # what the GPU bytes (or a CPU job's bytes) are made of

    @property
    def mem_mb(self) -> int:
        return math.ceil(self.host_bytes / MiB)


def load_dtype(name: str, config: dict, shape: Shape | None = None) -> str:
    """The dtype jobs load `name` in: models.<name>.dtype, where auto is the stored dtype."""
    wanted = config["models"][name].get("dtype", "auto")
    if wanted != "auto":
        return wanted
    return (shape or model_shape(name, config)).dtype


# ---- the counts ----


def weight_bytes(shape: Shape, dtype: str) -> int:
    return shape.params * DTYPE_BYTES[dtype]


def kv_cache_bytes(shape: Shape, dtype: str, tokens: int) -> int:
    return 2 * shape.num_hidden_layers * shape.num_key_value_heads * shape.head_dim * DTYPE_BYTES[dtype] * tokens


def layer_activation_bytes(shape: Shape, tokens: int, bytes_per: int) -> int:
    """One decoder layer's activations over `tokens` positions."""
    return tokens * (4 * shape.hidden_size + 3 * shape.intermediate_size) * bytes_per


def logits_bytes(shape: Shape, positions: int) -> int:
    """fp32 logits and their softmax."""
    return positions * shape.vocab_size * 8


def inference_parts(shape: Shape, dtype: str, batch: int, prompt: int, new: int, every_position: bool) -> dict:
    """Weights, KV cache, prefill activations and logits of generating (or scoring) a batch."""
    seq = prompt + new
    return {
        "weights": weight_bytes(shape, dtype),
        "kv_cache": kv_cache_bytes(shape, dtype, batch * seq),
        "activations": layer_activation_bytes(shape, batch * (seq if every_position else prompt), DTYPE_BYTES[dtype]),
        "logits": logits_bytes(shape, batch * (seq if every_position else 1)),
    }


def sparsegpt_gpu_parts(shape: Shape, dtype: str, seq_len: int, hessians: bool) -> dict:
    b = DTYPE_BYTES[dtype]
    inputs = shape.layer_linear_inputs
    widest = max(inputs)
    out_of_widest = shape.hidden_size  # down_proj (the widest input) writes h outputs
    return {
        "layer": max(shape.layer_params, shape.embedding_params) * b,
        "hessians": sum(n * n for n in inputs) * 4 if hessians else 0,
        # SparseGPT's fp32 copy of the weight it prunes and (with Hessians) the inverse Hessian.
        "working": (out_of_widest * widest + (widest * widest if hessians else 0)) * 4,
        "activations": layer_activation_bytes(shape, seq_len, b) + 2 * seq_len * shape.hidden_size * b,
    }


def training_parts(shape: Shape, tokens: int, fine_tuning: bool) -> dict:
    """Fine-tuning: masks, gradient checkpointing, chunked logits; pretraining: none of them."""
    if fine_tuning:
        activations = shape.num_hidden_layers * tokens * shape.hidden_size * 4 + 2 * layer_activation_bytes(
            shape, tokens, 4
        )
    else:
        activations = shape.num_hidden_layers * layer_activation_bytes(shape, tokens, 4)
    logits = min(tokens * shape.vocab_size, CHUNK_LOGITS) * 4 * 4 if fine_tuning else tokens * shape.vocab_size * 12
    return {
        "weights_grads_adam": shape.params * 16,
        # Fine-tuning holds a bool mask per decoder weight (pruned or not).
        "masks": shape.layer_params * shape.num_hidden_layers if fine_tuning else 0,
        # bf16 autocast (what bf16: auto picks on a GPU) keeps a bf16 copy of every weight it casts
        # until the forward's graph is freed: without it the plan was 9% under the 3B's measured peak.
        "autocast_copies": shape.params * 2,
        "activations": activations,
        "logits": logits,
    }


# ---- per rule ----


def _gpus(total: int, config: dict) -> int:
    return max(1, math.ceil(total / usable_gpu_bytes(config)))


def usable_gpu_bytes(config: dict) -> int:
    return int(config["resources"]["gpu_mem_gb"] * GB * USABLE_GPU_SHARE)


def runtime_min(rule: str, config: dict) -> int:
    """The wall-time limit of a job of `rule`: resources.runtime_min, or its class's entry there."""
    limit = config["resources"]["runtime_min"]
    return limit if isinstance(limit, int) else limit[RUNTIME_CLASS[rule]]


@dataclass
class Need:
    """What one job holds: its parts in bytes (on the GPUs, or for a CPU job in host memory; a
    "host_" part is on the host only), the host bytes beyond HOST_BASE, and the dtypes it loads a
    model in where they are not load_dtype's."""

    parts: dict
    host: int
    on_gpu: bool = True
    dtypes: dict = field(default_factory=dict)


def parallel_slots(tokens: int, parallel: dict) -> int:
    """Slots of a pard training row of `tokens` tokens, every position an anchor (an upper bound)."""
    kept = sum(round(tokens * max(parallel["keep"] ** j, parallel["keep_min"])) for j in range(1, parallel["k"]))
    return tokens + kept


def plan_job(rule: str, models: dict, config: dict, parallel: bool = False) -> Plan:
    """The plan of one job of `rule` that loads `models` (role -> model name; None = not loaded);
    `parallel`: a finetune or measure job of a parallel draft (the pard loss)."""
    if rule not in PLANNERS:
        raise ValueError(f"no memory plan for rule '{rule}' (known: {', '.join(PLANNERS)})")
    if parallel and rule not in ("finetune", "measure"):
        raise ValueError(f"rule '{rule}' has no parallel-draft plan (finetune and measure have)")
    models = {role: name for role, name in models.items() if name is not None}
    shapes = {role: model_shape(name, config) for role, name in models.items()}
    dtypes = {role: load_dtype(models[role], config, shapes[role]) for role in models}
    if rule in ("self_distill", "target_outputs") and config["engine"]["name"] == "vllm":
        return vllm_plan(rule, models, shapes, dtypes, config)
    need = PLANNERS[rule](rule, models, shapes, dtypes, config, **({"parallel": True} if parallel else {}))
    dtypes.update(need.dtypes)
    host = HOST_BASE + need.host
    total = sum(v for k, v in need.parts.items() if not k.startswith("host_"))
    if not need.on_gpu:
        # Everything is in host memory; nothing is asked of a GPU.
        return Plan(rule, models, 0, 0, host, dtypes, {r: False for r in models}, need.parts)
    # A job that needs more than one GPU spreads its target over them (device_map="auto", balanced);
    # a draft sits on the first GPU beside the target's share. Training never spreads a model: more
    # than one GPU for it means sharded optimizer states (the fine-tuning step's own multi-GPU path).
    spread = {role: total > usable_gpu_bytes(config) and role == "target" for role in models}
    # A spread model loads straight onto the GPUs, never whole into host memory.
    host -= sum(weight_bytes(shapes[role], dtypes[role]) for role, s in spread.items() if s)
    return Plan(rule, models, _gpus(total, config), total, host, dtypes, spread, need.parts)


def _generation_need(rule, models, shapes, dtypes, config) -> Need:
    """self_distill and target_outputs on transformers: the target generates a batch."""
    settings = config["distill"] if rule == "self_distill" else config["measure"]
    prompt = settings.get("max_prompt_tokens") or PROMPT_TOKENS
    parts = inference_parts(
        shapes["target"], dtypes["target"], settings["batch_size"], prompt, settings["max_new_tokens"], False
    )
    return Need(parts, parts["weights"])


def _measure_need(rule, models, shapes, dtypes, config, parallel: bool = False) -> Need:
    """Target and draft score every position of a batch (the teacher-forced walk; a parallel draft with a chain of
    k_max - 1 masks on every new token, and its attention mask)."""
    m = config["measure"]
    prompt = m.get("max_prompt_tokens") or PROMPT_TOKENS
    parts, host = {}, 0
    for role in ("target", "draft"):
        s, dt = shapes[role], dtypes[role]
        if parallel and role == "draft":
            slots = prompt + m["max_new_tokens"] * m["k_max"]
            scored = inference_parts(s, dt, m["batch_size"], slots, 0, True)
            scored["attention_mask"] = m["batch_size"] * slots * slots * DTYPE_BYTES[dt]
        else:
            scored = inference_parts(s, dt, m["batch_size"], prompt, m["max_new_tokens"], True)
        # Assisted generation runs one prompt at a time: a batch-1 KV cache beside the teacher-forced batches.
        scored["kv_cache"] = kv_cache_bytes(s, dt, prompt + m["max_new_tokens"])
        parts.update({f"{role}_{k}": v for k, v in scored.items()})
        host += scored["weights"]
    return Need(parts, host)


def _model_report_need(rule, models, shapes, dtypes, config) -> Need:
    """The models are reported one after another: the largest one's generation."""
    best = {}
    for role, s in shapes.items():
        prompt = min(PROMPT_TOKENS, config["models"][models[role]].get("max_position_embeddings", PROMPT_TOKENS))
        found = inference_parts(s, dtypes[role], REPORT_BATCH, prompt, REPORT_NEW_TOKENS, False)
        if sum(found.values()) > sum(best.values()):
            best = found
    return Need(best, best.get("weights", 0))


def _compression_need(rule, models, shapes, dtypes, config) -> Need:
    """prune and quantize: GPTQ, like SparseGPT, walks the layers with one Hessian per linear input;
    rtn, like magnitude, needs none and runs on the CPU."""
    s, dt, p = shapes["draft"], dtypes["draft"], config[rule]
    algorithm = p["pruner"] if rule == "prune" else p["algorithm"]
    # Two copies on the host: our module's (the originals, and what is saved) and llm-compressor's.
    host = 2 * weight_bytes(s, dt)
    if algorithm in ("magnitude", "rtn"):
        return Need({"weights_twice": 2 * weight_bytes(s, dt)}, host, on_gpu=False)
    parts = sparsegpt_gpu_parts(s, dt, p["calibration_seq_len"], hessians=algorithm != "wanda")
    cached = 2 * p["calibration_samples"] * p["calibration_seq_len"] * s.hidden_size * DTYPE_BYTES[dt]
    parts["host_calibration_cache"] = cached
    return Need(parts, host + cached)


def _layer_prune_need(rule, models, shapes, dtypes, config) -> Need:
    weights = weight_bytes(shapes["draft"], dtypes["draft"])
    return Need({"weights": weights}, weights, on_gpu=False)


def _finetune_need(rule, models, shapes, dtypes, config, parallel: bool = False) -> Need:
    """The draft trained on fp32 master weights, beside the frozen teacher its loss reads (if any); a parallel
    draft over its rows' mask chains too."""
    ft = config["finetune"]
    micro_batch = ft.get("micro_batch_size") or ft["batch_size"]
    row = parallel_slots(ft["seq_len"], config["parallel"]) if parallel else ft["seq_len"]
    parts = training_parts(shapes["draft"], micro_batch * row, fine_tuning=True)
    if parallel:
        parts["attention_mask"] = micro_batch * row * row * 4
    host = weight_bytes(shapes["draft"], "float32")  # loaded as fp32 master weights
    if "teacher" in shapes:
        teacher = inference_parts(shapes["teacher"], dtypes["teacher"], micro_batch, ft["seq_len"], 0, True)
        teacher["kv_cache"] = 0
        parts.update({f"teacher_{k}": v for k, v in teacher.items()})
        host += teacher["weights"]
    return Need(parts, host, dtypes={"draft": "float32"})


def _pretrain_need(rule, models, shapes, dtypes, config) -> Need:
    train = config["models"][models["model"]]["train"]
    tokens = train["batch_size"] * train["seq_len"]
    instruct = train.get("instruct") or {}
    if instruct.get("steps"):
        tokens = max(tokens, instruct["batch_size"] * instruct["seq_len"])
    return Need(training_parts(shapes["model"], tokens, fine_tuning=False), 0, dtypes={"model": "float32"})


def _train_head_need(rule, models, shapes, dtypes, config) -> Need:
    """A draft head trained against the frozen target (sd2.drafters.heads.distill_loss): the target's
    forward over a batch with every hidden state and fp32 logits, the head's AdamW states, and per
    step of its depth the head's logits through the target's lm_head, kept for the backward pass
    (log-softmax and the KL's product: two fp32 tensors; three more while a step is computed)."""
    s, dt, train = shapes["target"], dtypes["target"], config["heads"]["train"]
    tokens = train["batch_size"] * train["seq_len"]
    vocab_fp32 = tokens * s.vocab_size * 4
    parts = {
        "weights": weight_bytes(s, dt),
        "hidden_states": (s.num_hidden_layers + 1) * tokens * s.hidden_size * DTYPE_BYTES[dt],
        "activations": layer_activation_bytes(s, tokens, DTYPE_BYTES[dt]),
        "logits": vocab_fp32,
        "head_weights_grads_adam": HEAD_PARAMS_PER_HIDDEN2 * s.hidden_size**2 * 16,
        "head_logits": (2 * train["depth"] + 3) * vocab_fp32,
    }
    return Need(parts, parts["weights"])


PLANNERS = {
    "pretrain": _pretrain_need,
    "model_report": _model_report_need,
    "self_distill": _generation_need,
    "target_outputs": _generation_need,
    "prune": _compression_need,
    "layer_prune": _layer_prune_need,
    "layer_subset": _layer_prune_need,
    "quantize": _compression_need,
    "finetune": _finetune_need,
    "measure": _measure_need,
    "train_head": _train_head_need,
}


def vllm_plan(rule: str, models: dict, shapes: dict, dtypes: dict, config: dict) -> Plan:
    """self_distill / target_outputs with engine.name vllm (see the module docstring)."""
    s, dt = shapes["target"], dtypes["target"]
    settings = config["distill"] if rule == "self_distill" else config["measure"]
    prompt = settings.get("max_prompt_tokens") or PROMPT_TOKENS
    weights = weight_bytes(s, dt)
    per_gpu = int(config["resources"]["gpu_mem_gb"] * GB * config["engine"]["gpu_memory_utilization"])
    longest = config["engine"]["max_model_len"] or prompt + settings["max_new_tokens"]  # as sd2.generation sets it
    gpus = max(1, math.ceil((weights + kv_cache_bytes(s, dt, longest)) / per_gpu))
    while s.num_attention_heads % gpus:
        gpus += 1
    spread, host = False, HOST_BASE * gpus
    if rule == "target_outputs":  # the batch-1 timing on transformers, before vLLM starts
        alone = sum(inference_parts(s, dt, 1, prompt, settings["max_new_tokens"], False).values())
        spread = alone > usable_gpu_bytes(config)
        gpus = max(gpus, _gpus(alone, config))
        host = max(host, HOST_BASE + (0 if spread else weights))
    parts = {"weights": weights, "kv_cache": gpus * per_gpu - weights}
    return Plan(rule, models, gpus, gpus * per_gpu, host, dtypes, {"target": spread}, parts)


def check_fits(plan: Plan, config: dict) -> None:
    """ConfigError when a job needs more GPUs than one node offers (resources.gpu)."""
    cap = config["resources"]["gpu"]
    if plan.gpus > cap:
        names = ", ".join(f"{role} {name}" for role, name in plan.models.items())
        raise ConfigError(
            f"config error at resources.gpu: {plan.rule} ({names}) needs {plan.gpus} GPUs "
            f"({plan.gpu_bytes / GB:.0f} GB at {usable_gpu_bytes(config) / GB:.0f} GB usable each), "
            f"more than resources.gpu={cap} (the GPUs of one node)"
        )


def describe(plan: Plan) -> dict:
    """One row for the plan table: rule, models, dtypes, GPUs, GB on the GPUs and the host."""
    return {
        "rule": plan.rule,
        "models": " ".join(f"{r}={n}" for r, n in plan.models.items()),
        "dtypes": ",".join(f"{r}={d}" for r, d in plan.dtypes.items()),
        "gpus": plan.gpus,
        "gpu_gb": round(plan.gpu_bytes / GB, 1),
        "host_gb": round(plan.host_bytes / GB, 1),
        "mem_mb": plan.mem_mb,
        "spread": ",".join(r for r, s in plan.spread.items() if s) or "-",
    }


def job_plans(config: dict) -> list[Plan]:
    """The plan of every kind of model job in `config` (one per rule and models loaded)."""
    models, targets, drafts = config["models"], config["targets"], config["drafts"]
    scratch = [name for name, spec in models.items() if "hub" not in spec]
    plans = [plan_job("pretrain", {"model": m}, config) for m in scratch]
    if scratch:
        plans.append(plan_job("model_report", {f"model{i}": m for i, m in enumerate(scratch)}, config))
    heads = ("train_head",) if config["heads"]["methods"] else ()
    for t in targets:
        plans += [plan_job(rule, {"target": t}, config) for rule in ("self_distill", "target_outputs", *heads)]
    for d in drafts:
        plans += [plan_job(rule, {"draft": d}, config) for rule in ("prune", "layer_prune")]
        if set(config.get("quantization", [])) - {variants.NO_QUANTIZATION}:
            plans.append(plan_job("quantize", {"draft": d}, config))
        # A loss that reads another model's outputs loads it beside the draft: the target or the draft itself.
        tuned = [(t, v) for t in targets for v in variants.variants(config, t, d) if methods.BY_NAME[v.method].tuned]
        teachers = dict.fromkeys({"target": t, "draft": d}.get(methods.LOSSES[v.loss].teacher) for t, v in tuned)
        plans += [plan_job("finetune", {"draft": d, "teacher": t}, config) for t in teachers]
        plans += [plan_job("measure", {"target": t, "draft": d}, config) for t in targets if t != d]
        if any(v.loss and methods.LOSSES[v.loss].parallel for _, v in tuned):
            plans.append(plan_job("finetune", {"draft": d}, config, parallel=True))
            plans += [plan_job("measure", {"target": t, "draft": d}, config, parallel=True) for t in targets if t != d]
    return plans
