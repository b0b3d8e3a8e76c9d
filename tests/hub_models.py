"""Tiny stand-ins for the paper's Instruct checkpoints, saved in the hub's layout.

`chat_tokenizer` gives a tokenizer trained here the special tokens and chat template of
a real family: "llama3" (Llama-3.1-Instruct: <|begin_of_text|> added to every text, a
system header with `Cutting Knowledge Date` and `Today Date: {{ date_string }}` defaulting
to the current date, turns ended by <|eot_id|>, the tokenizer's eos) or "qwen2" (Qwen2.5-
Instruct: ChatML <|im_start|>/<|im_end|>, the default system prompt, eos <|im_end|>, pad
<|endoftext|>). `save_hub_model` saves a tiny random model with such a tokenizer: config.json
in bfloat16 and the generation_config.json the real checkpoint ships (sampling defaults,
Qwen's repetition penalty, Llama's list of end ids), which sd2 must not let leak into its
decoding. Plain functions, so an end-to-end workflow test can build the same checkpoints.
"""

import json
from pathlib import Path

import torch
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from sd2.models import build_model

# The sizes of every tiny test model (tests/conftest.py builds its from-scratch ones with them too).
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- if strftime_now is defined %}\n"
    '        {%- set date_string = strftime_now("%d %b %Y") %}\n'
    "    {%- else %}\n"
    '        {%- set date_string = "26 Jul 2024" %}\n'
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    '    {%- set system_message = "" %}\n'
    "{%- endif %}\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    "{{- system_message }}\n"
    '{{- "<|eot_id|>" }}\n'
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\n" + QWEN_SYSTEM + "<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) '
    'or (message.role == "assistant") %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

FAMILIES = {
    "llama3": {
        "arch": "llama",
        "specials": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": None,
        "template": LLAMA3_TEMPLATE,
    },
    "qwen2": {
        "arch": "qwen2",
        "specials": ["<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "template": QWEN2_TEMPLATE,
    },
}


def chat_tokenizer(family: str, base_dir, out_dir) -> PreTrainedTokenizerFast:
    """The tokenizer in `base_dir` (sd2.tokenization) with `family`'s special tokens and template, saved to out_dir."""
    spec = FAMILIES[family]
    tok = PreTrainedTokenizerFast.from_pretrained(base_dir)
    tok.add_special_tokens({"additional_special_tokens": spec["specials"]})
    tok.eos_token = spec["eos"]
    if spec["pad"]:
        tok.pad_token = spec["pad"]
    if spec["bos"]:
        tok.bos_token = spec["bos"]
        # Like Llama 3's tokenizer: every tokenized text starts with <|begin_of_text|>.
        bos_id = tok.convert_tokens_to_ids(spec["bos"])
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{spec['bos']} $A",
            pair=f"{spec['bos']} $A {spec['bos']} $B",
            special_tokens=[(spec["bos"], bos_id)],
        )
    tok.chat_template = spec["template"]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    return PreTrainedTokenizerFast.from_pretrained(out_dir)


def shipped_generation_config(family: str, tok) -> dict:
    """The sampling defaults the real Instruct checkpoint ships in generation_config.json."""
    ids = tok.convert_tokens_to_ids
    if family == "llama3":
        return {
            "bos_token_id": ids("<|begin_of_text|>"),
            # Llama 3.1: <|end_of_text|>, <|eom_id|>, <|eot_id|> (here <|endoftext|> plays <|end_of_text|>).
            "eos_token_id": [ids("<|endoftext|>"), ids("<|eom_id|>"), ids("<|eot_id|>")],
            "do_sample": True,
            "temperature": 0.6,
            "top_p": 0.9,
        }
    return {
        "bos_token_id": ids("<|endoftext|>"),
        "pad_token_id": ids("<|endoftext|>"),
        "eos_token_id": [ids("<|im_end|>"), ids("<|endoftext|>")],
        "do_sample": True,
        "repetition_penalty": 1.05,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
    }


def save_hub_model(path, family: str, tokenizer_dir, seed: int, generation_config: dict | None = None, **sizes):
    """A tiny random `family` model with the chat tokenizer in `tokenizer_dir`, saved as a hub checkpoint.

    generation_config: what generation_config.json holds (default: the real checkpoint's settings).
    """
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    model = build_model({"arch": FAMILIES[family]["arch"], **TINY, **sizes}, tok, seed)
    model.to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    shipped = shipped_generation_config(family, tok) if generation_config is None else generation_config
    # Written as the hub file is, so nothing transformers would normalise is lost.
    (Path(path) / "generation_config.json").write_text(json.dumps(shipped, indent=2))
    return Path(path)
