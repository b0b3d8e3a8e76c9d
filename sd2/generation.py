"""The target's batched generation, whichever engine runs it (rules self_distill and target_outputs).

One interface, `engine(settings, ...)`, over transformers' generate (the default) and vLLM (the
config's engine.name: vllm). Both get the same prompt ids (sd2.chat.prompt_ids) and exactly greedy
or pure sampling, and both give the same rows (`generate_batch`'s), so the files the rules write
have one format whichever engine made them. The exact decoding settings (`generation_config`,
`check_shipped_generation`) and the model's end-of-sequence ids live here too, for every caller
of transformers' generate.

vLLM has not run this code on a GPU: tests/test_engines.py checks the glue against a fake `vllm`
module. The API used was read in vLLM's source (github.com/vllm-project/vllm):
- vllm/entrypoints/llm.py: LLM(model, dtype, tensor_parallel_size, seed, trust_remote_code,
  gpu_memory_utilization, max_model_len, generation_config, ...); LLM.generate(prompts,
  sampling_params) takes one SamplingParams per prompt and returns RequestOutputs in the
  prompts' order.
- vllm/config/model.py (ModelConfig, whose fields EngineArgs in vllm/engine/arg_utils.py and
  LLM's keywords pass on): generation_config="auto" loads the checkpoint's
  generation_config.json as default sampling settings; "vllm" loads none (vLLM's neutral
  defaults), the hygiene `generation_config` applies to transformers.
- vllm/sampling_params.py: temperature 0 is greedy; top_p 1 and top_k 0 or -1 ("consider all
  tokens"; -1 is also what older releases accept), min_p 0, repetition_penalty 1 disable
  every filter; stop_token_ids, ignore_eos, max_tokens, seed (per request).
- vllm/inputs (TokensPrompt, exported by vllm/__init__.py): a prompt given as token ids, not tokenized again.
- vllm/outputs.py: RequestOutput.outputs[0] is a CompletionOutput with token_ids,
  finish_reason ("stop" or "length") and stop_reason (the stop token id that ended it, None
  for the model's EOS).
"""

import gc

import torch
from transformers import GenerationConfig

from sd2 import chat
from sd2.models import default_device, load_model

# ---- exact decoding: nothing the checkpoint ships leaks in ----

# Every logits setting generate() knows a neutral value for. transformers 5.17 fills each
# field of a passed GenerationConfig that is None from model.generation_config (what the
# checkpoint ships: Qwen2.5's repetition_penalty 1.05, top_k 20, ...), so all are set.
NEUTRAL = dict(
    num_beams=1,
    num_beam_groups=1,
    num_return_sequences=1,
    temperature=1.0,
    top_k=50,  # greedy ignores it; sampling sets 0 (off). 50 is the library's default, so generate() does not warn.
    top_p=1.0,
    typical_p=1.0,
    epsilon_cutoff=0.0,
    eta_cutoff=0.0,
    repetition_penalty=1.0,
    encoder_repetition_penalty=1.0,
    length_penalty=1.0,
    diversity_penalty=0.0,
    no_repeat_ngram_size=0,
    encoder_no_repeat_ngram_size=0,
    min_length=0,
    remove_invalid_values=False,
)
# Settings with no neutral value (None means "unset", which the checkpoint's value then fills):
# a checkpoint that ships one is refused rather than silently changing the decoding.
NO_NEUTRAL = (
    "min_p",
    "top_h",
    "min_new_tokens",
    "bad_words_ids",
    "force_words_ids",
    "constraints",
    "sequence_bias",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
    "guidance_scale",
    "renormalize_logits",
    "watermarking_config",
    "stop_strings",
    "penalty_alpha",
    "dola_layers",
    "max_time",
)


def generation_config(temperature: float, max_new_tokens: int, pad_token_id) -> GenerationConfig:
    """Greedy (temperature 0) or pure sampling at `temperature`, nothing else; eos ids come from the model."""
    sampling = (
        dict(do_sample=True, temperature=float(temperature), top_k=0) if temperature > 0 else dict(do_sample=False)
    )
    return GenerationConfig(**{**NEUTRAL, **sampling}, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id)


def check_shipped_generation(model) -> None:
    """Raise naming a decoding setting in model.generation_config that an explicit config cannot override."""
    shipped = model.generation_config
    found = {k: getattr(shipped, k, None) for k in NO_NEUTRAL if getattr(shipped, k, None) not in (None, False)}
    if found:
        raise ValueError(
            f"{getattr(model.config, '_name_or_path', type(model).__name__)}: its generation_config sets {found}, "
            "which generate() would apply on top of sd2's explicit decoding settings; remove it from "
            "generation_config.json"
        )


def decoding_kwargs(temperature: float, max_new_tokens: int, pad_token_id) -> dict:
    """generate() keywords shared by the target alone and the speculative run: one explicit generation config."""
    return {"generation_config": generation_config(temperature, max_new_tokens, pad_token_id)}


def eos_ids(model_dir, trust_remote_code: bool = False) -> list[int]:
    """The end-of-sequence ids transformers' generate stops at: model.generation_config.eos_token_id
    (generation_config.json, else derived from config.json as transformers does)."""
    from transformers import AutoConfig

    try:
        found = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
    except OSError:  # no generation_config.json: transformers derives one from config.json
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        found = GenerationConfig.from_model_config(config).eos_token_id
    ids = found if isinstance(found, list) else [] if found is None else [found]
    if not ids:
        raise ValueError(f"{model_dir}: no eos_token_id in its generation_config.json or config.json")
    return [int(i) for i in ids]


def model_eos_ids(model) -> set[int]:
    """The end-of-sequence ids a loaded model's generate() stops at."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


# ---- rows: one format for both engines ----


def decode_response(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text of the new tokens, special tokens stripped.

    Decoded together with the prompt and cut after the decoded prompt, because some
    decoders (metaspace) drop a leading space when a sequence starts mid-text.
    """
    full = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    if full.startswith(head):
        return full[len(head) :]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def _row(tokenizer, prompt_ids: list[int], new_ids: list[int], finished: bool) -> dict:
    return {
        "response": decode_response(tokenizer, prompt_ids, new_ids),
        "new_tokens": len(new_ids),
        "finished": finished,
        "prompt_ids": prompt_ids,
        "new_ids": new_ids,
    }


def _first_eos(new_ids: list[int], eos: set) -> int | None:
    return next((j for j, t in enumerate(new_ids) if t in eos), None)


# ---- transformers ----


@torch.no_grad()
def generate_batch(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float, chat_settings: dict | None = None
) -> list[dict]:
    """Answer `prompts` in one left-padded batch: response text, token ids and counts, whether EOS ended it.

    Each prompt is formatted by sd2.chat (its chat template where the tokenizer has one and
    chat_settings allow it); the decoding is exactly greedy or pure sampling (`generation_config`).
    The attention mask (and the position ids generate() derives from it) make each answer the
    same as an unbatched one.
    """
    check_shipped_generation(model)
    tokenizer.padding_side = "left"
    ids = [chat.prompt_ids(tokenizer, p, chat_settings) for p in prompts]
    enc = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(model.device)
    out = model.generate(**enc, **decoding_kwargs(temperature, max_new_tokens, tokenizer.pad_token_id))
    width = enc["input_ids"].shape[1]
    eos = model_eos_ids(model)
    rows = []
    for i in range(len(prompts)):
        prompt_ids = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        new_ids = out[i, width:].tolist()
        # generate() pads finished rows after their end-of-sequence token: cut there.
        end = _first_eos(new_ids, eos)
        rows.append(_row(tokenizer, prompt_ids, new_ids if end is None else new_ids[: end + 1], end is not None))
    return rows


# ---- vLLM ----


def import_vllm():
    """The vllm module, or an ImportError that says which setting asked for it and how to install it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "engine.name: vllm needs the vllm package, which is not installed here: `pip install vllm` "
            "(or run Snakemake with --sdm conda, which builds workflow/envs/vllm.yaml), "
            "or set engine.name: transformers"
        ) from err
    return vllm


def load_llm(model_dir, engine: dict, *, dtype: str, gpus: int, seed: int, trust_remote_code: bool, max_model_len: int):
    """A vllm.LLM over `gpus` GPUs (tensor parallel; 1 where the job was given none), the job's dtype.

    max_model_len: the job's longest prompt + max_new_tokens (engine.max_model_len overrides it).
    Without it vLLM reserves room for one sequence of the model's whole context (128k tokens for
    Llama 3.1: 43 GB of KV cache for the 70B), which the memory plan does not give it.
    """
    vllm = import_vllm()
    return vllm.LLM(
        model=str(model_dir),
        dtype=dtype,
        tensor_parallel_size=max(1, gpus),
        seed=seed,
        trust_remote_code=trust_remote_code,
        gpu_memory_utilization=engine["gpu_memory_utilization"],
        max_model_len=engine["max_model_len"] or max_model_len,
        generation_config="vllm",
    )


def sampling_params(vllm, *, temperature: float, max_new_tokens: int, eos: list[int], seed: int | None):
    """Exactly greedy (temperature 0) or pure sampling at `temperature`, stopping at the model's EOS ids."""
    return vllm.SamplingParams(
        temperature=float(temperature),
        top_p=1.0,
        top_k=-1,
        min_p=0.0,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        max_tokens=max_new_tokens,
        stop_token_ids=list(eos),
        ignore_eos=False,
        seed=seed if temperature > 0 else None,
    )


def _vllm_row(tokenizer, prompt_ids: list[int], completion, eos: set) -> dict:
    """generate_batch's row from a vLLM CompletionOutput: new ids cut after the first EOS id, or ended by a stop id."""
    new_ids = list(completion.token_ids)
    end = _first_eos(new_ids, eos)
    if end is not None:
        new_ids = new_ids[: end + 1]
    elif completion.finish_reason == "stop":
        # Stopped by an EOS id that vLLM left out of token_ids: keep it, as generate_batch does.
        stop = completion.stop_reason if isinstance(completion.stop_reason, int) else tokenizer.eos_token_id
        new_ids.append(stop)
    return _row(tokenizer, prompt_ids, new_ids, end is not None or completion.finish_reason == "stop")


def generate_vllm(
    llm,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    eos: list[int],
    seeds: list[int],
    chat_settings: dict | None = None,
) -> list[dict]:
    """generate_batch's rows from one llm.generate call. Each prompt samples with its own seed, so its
    answer does not depend on the others in the call (and a resumed run draws what an uninterrupted one does)."""
    vllm = import_vllm()
    ids = [chat.prompt_ids(tokenizer, p, chat_settings) for p in prompts]
    params = [
        sampling_params(vllm, temperature=temperature, max_new_tokens=max_new_tokens, eos=eos, seed=s) for s in seeds
    ]
    outputs = llm.generate([vllm.TokensPrompt(prompt_token_ids=p) for p in ids], params)
    return [_vllm_row(tokenizer, p, out.outputs[0], set(eos)) for p, out in zip(ids, outputs, strict=True)]


# ---- the engines behind one interface ----


def _load_target(target_dir, loading: dict):
    trust, dtype, device_map = (loading[k] for k in ("trust_remote_code", "dtype", "device_map"))
    return load_model(target_dir, trust, dtype=dtype, device=default_device(), device_map=device_map)


class Transformers:
    """transformers' generate: one left-padded batch per batch, its sampling seeded with seed + its number."""

    name, padding = "transformers", "left"

    def __init__(
        self, settings: dict, target_dir, tokenizer, chat_settings: dict, *, seed: int, gpus: int, loading: dict
    ):
        # gpus: the job's; device_map in `loading` places the model on them.
        self.settings, self.target_dir, self.tokenizer, self.chat = settings, target_dir, tokenizer, chat_settings
        self.seed, self.loading, self.model = seed, loading, None

    def transformers_model(self):
        """The target as a transformers model: the one this engine generates with."""
        if self.model is None:
            self.model = _load_target(self.target_dir, self.loading)
        return self.model

    def start(self, prompts: list[str], max_new_tokens: int) -> None:
        self.transformers_model()

    def generate(
        self, prompts: list[str], batches: dict[int, list[int]], *, max_new_tokens: int, temperature: float, bar=None
    ) -> list[tuple[int, dict]]:
        """(prompt index, row) for every index of `batches` (batch number -> prompt indices), in their order."""
        pairs = []
        for number, idx in batches.items():
            torch.manual_seed(self.seed + number)
            rows = generate_batch(
                self.model,
                self.tokenizer,
                [prompts[i] for i in idx],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                chat_settings=self.chat,
            )
            pairs += zip(idx, rows)
            if bar is not None:
                bar.update(1)
        return pairs


class VLLM:
    """vLLM: one llm.generate call per generate(), each prompt's sampling seeded with seed + its index,
    tensor parallel over the job's GPUs."""

    name, padding = "vllm", None

    def __init__(
        self, settings: dict, target_dir, tokenizer, chat_settings: dict, *, seed: int, gpus: int, loading: dict
    ):
        self.settings, self.target_dir, self.tokenizer, self.chat = settings, target_dir, tokenizer, chat_settings
        self.seed, self.gpus, self.loading, self.llm, self.eos = seed, gpus, loading, None, None

    def transformers_model(self):
        """A transformers copy of the target, for work vLLM does not do; drop it before start()."""
        if self.llm is not None:
            raise RuntimeError("vLLM holds the GPUs already: load the transformers model before start()")
        return _load_target(self.target_dir, self.loading)

    def start(self, prompts: list[str], max_new_tokens: int) -> None:
        """Start vLLM with room for the longest of `prompts` plus max_new_tokens."""
        # vLLM preallocates gpu_memory_utilization of each GPU when it starts: free a transformers copy first.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        longest = max(len(chat.prompt_ids(self.tokenizer, text, self.chat)) for text in prompts)
        trust = self.loading["trust_remote_code"]
        self.llm = load_llm(
            self.target_dir,
            self.settings,
            dtype=self.loading["dtype"],
            gpus=self.gpus,
            seed=self.seed,
            trust_remote_code=trust,
            max_model_len=longest + max_new_tokens,
        )
        self.eos = eos_ids(self.target_dir, trust)

    def generate(
        self, prompts: list[str], batches: dict[int, list[int]], *, max_new_tokens: int, temperature: float, bar=None
    ) -> list[tuple[int, dict]]:
        """(prompt index, row) for every index of `batches` (batch number -> prompt indices), in their order."""
        idx = [i for b in batches.values() for i in b]
        rows = generate_vllm(
            self.llm,
            self.tokenizer,
            [prompts[i] for i in idx],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos=self.eos,
            seeds=[self.seed + i for i in idx],
            chat_settings=self.chat,
        )
        if bar is not None:
            bar.update(len(batches))
        return list(zip(idx, rows))


ENGINES = {"transformers": Transformers, "vllm": VLLM}


def engine(
    settings: dict, target_dir, tokenizer, chat_settings: dict, *, seed: int, gpus: int, loading: dict
) -> Transformers | VLLM:
    """The engine the config's engine section names, for the target at target_dir; nothing is loaded yet.

    loading: trust_remote_code, dtype and device_map of the target's transformers model (the
    first two also vLLM's). Call start() before generate().
    """
    if settings["name"] not in ENGINES:
        raise ValueError(f"unknown engine {settings['name']!r} (known: {', '.join(ENGINES)})")
    return ENGINES[settings["name"]](
        settings, target_dir, tokenizer, chat_settings, seed=seed, gpus=gpus, loading=loading
    )
