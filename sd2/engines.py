"""The optional vLLM engine of the target's batched generation (rules self_distill and target_outputs).

The config's `engine` section picks it (engine.name: transformers, the default, or vllm).
vLLM gets the SAME prompt ids as the transformers path (sd2.chat.prompt_ids) and exactly
greedy or pure sampling, and its outputs are mapped to the rows of sd2.drafts.distill.generate_batch,
so the files the rules write have one format whichever engine made them.

NOT RUN ON A GPU WITH vLLM: vLLM is not installed where this was written; tests/test_engines.py
checks the glue against a fake `vllm` module. The API used was read in vLLM's source
(github.com/vllm-project/vllm):
- vllm/entrypoints/llm.py: LLM(model, dtype, tensor_parallel_size, seed, trust_remote_code,
  gpu_memory_utilization, max_model_len, generation_config, ...); LLM.generate(prompts,
  sampling_params) takes one SamplingParams per prompt and returns RequestOutputs in the
  prompts' order.
- vllm/config/model.py (ModelConfig, whose fields EngineArgs in vllm/engine/arg_utils.py and
  LLM's keywords pass on): generation_config="auto" loads the checkpoint's
  generation_config.json as default sampling settings; "vllm" loads none (vLLM's neutral
  defaults), the hygiene sd2.measure.speculative applies to transformers.
- vllm/sampling_params.py: temperature 0 is greedy; top_p 1 and top_k 0 or -1 ("consider all
  tokens"; -1 is also what older releases accept), min_p 0, repetition_penalty 1 disable
  every filter; stop_token_ids, ignore_eos, max_tokens, seed (per request).
- vllm/inputs (TokensPrompt, exported by vllm/__init__.py): a prompt given as token ids, not tokenized again.
- vllm/outputs.py: RequestOutput.outputs[0] is a CompletionOutput with token_ids,
  finish_reason ("stop" or "length") and stop_reason (the stop token id that ended it, None
  for the model's EOS).
"""

# distill imports this module: import it as a module (its attributes are read at call time).
from sd2 import chat
from sd2.drafts import distill


def resolve(settings: dict | None) -> dict:
    """The engine section with its defaults (the schema's, for callers that pass none)."""
    return {"name": "transformers", "gpu_memory_utilization": 0.9, "max_model_len": None, **(settings or {})}


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


def eos_ids(model_dir, trust_remote_code: bool = False) -> list[int]:
    """The end-of-sequence ids the transformers path stops at: model.generation_config.eos_token_id
    (generation_config.json, else derived from config.json as transformers does)."""
    from transformers import AutoConfig, GenerationConfig

    try:
        found = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
    except OSError:  # no generation_config.json: transformers derives one from config.json
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        found = GenerationConfig.from_model_config(config).eos_token_id
    ids = found if isinstance(found, list) else [] if found is None else [found]
    if not ids:
        raise ValueError(f"{model_dir}: no eos_token_id in its generation_config.json or config.json")
    return [int(i) for i in ids]


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


def generate(
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
    """sd2.drafts.distill.generate_batch's rows (response, new_tokens, finished, prompt_ids, new_ids) from one
    llm.generate call. Each prompt samples with its own seed, so its answer does not depend on the
    others in the call (and a resumed run draws what an uninterrupted one does)."""
    vllm = import_vllm()
    ids = [chat.prompt_ids(tokenizer, p, chat_settings) for p in prompts]
    params = [
        sampling_params(vllm, temperature=temperature, max_new_tokens=max_new_tokens, eos=eos, seed=s) for s in seeds
    ]
    outputs = llm.generate([vllm.TokensPrompt(prompt_token_ids=p) for p in ids], params)
    eos_set = set(eos)
    rows = []
    for prompt_ids, out in zip(ids, outputs, strict=True):
        completion = out.outputs[0]
        new_ids = list(completion.token_ids)
        end = next((j for j, t in enumerate(new_ids) if t in eos_set), None)
        if end is not None:
            new_ids = new_ids[: end + 1]
        elif completion.finish_reason == "stop":
            # Stopped by an EOS id that vLLM left out of token_ids: keep it, as generate_batch does.
            stop = completion.stop_reason if isinstance(completion.stop_reason, int) else tokenizer.eos_token_id
            new_ids.append(stop)
        finished = end is not None or completion.finish_reason == "stop"
        rows.append(
            {
                "response": distill.decode_response(tokenizer, prompt_ids, new_ids),
                "new_tokens": len(new_ids),
                "finished": finished,
                "prompt_ids": prompt_ids,
                "new_ids": new_ids,
            }
        )
    return rows
