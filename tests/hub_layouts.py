"""Local stand-ins of the paper's three hub datasets, in their real hub repository layouts.

Each writer lays out a directory the way the hub repository is laid out (the same file paths,
the same README `configs:` block where the hub repo has one, parquet files written by
`datasets` as the hub's are), with a handful of realistic rows. `load_dataset(<dir>, <config>,
split=...)` then resolves exactly as it does for the hub id, so a config overlay can swap
`HuggingFaceH4/ultrachat_200k`, `HuggingFaceH4/mt_bench_prompts` and `openai/gsm8k` for these
paths. `write_all(root)` writes all three and returns their paths by hub id.

Layouts (from the hub repositories):
- ultrachat_200k: `data/{train_sft,test_sft,train_gen,test_gen}-00000-of-0000N-<hash>.parquet`, README
  `configs:` (one `default` config, four splits); columns prompt (str), prompt_id (sha256 hex of
  the prompt), messages (list of {content, role}, user first, alternating).
- mt_bench_prompts: `data/train-00000-of-00001-<hash>.parquet` (columns prompt = list of turns,
  prompt_id int, category, reference = list of strings), `raw/question.jsonl` (lmsys' original
  file, which the loader ignores), a README without `configs:` (the split comes from the file name).
- gsm8k: `main/{train,test}-00000-of-00001.parquet` and `socratic/...` (columns question, answer),
  README `configs:` naming the configs main and socratic.

One UltraChat training row quotes a GSM8K test question with different line breaks, as scraped
chat data can: the fine-tuning decontamination has something real to find.
"""

import hashlib
import json
from pathlib import Path

from datasets import Dataset

ULTRACHAT = "HuggingFaceH4/ultrachat_200k"
MT_BENCH = "HuggingFaceH4/mt_bench_prompts"
GSM8K = "openai/gsm8k"

GSM8K_TEST = [
    (
        "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
        "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 "
        "per fresh duck egg. How much in dollars does she make every day at the farmers' market?",
        "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
        "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18",
        "How many eggs does Janet sell? ** Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
        "How much does Janet make at the farmers' market? ** She makes 9 * 2 = $<<9*2=18>>18 every day "
        "at the farmer's market.\n#### 18",
    ),
    (
        "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
        "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 bolts "
        "of fabric\n#### 3",
        "How many bolts of white fiber does it take? ** It takes 2/2=<<2/2=1>>1 bolt of white fiber\n"
        "How many bolts in total does it take? ** So the total amount of fabric is 2+1=<<2+1=3>>3 bolts of "
        "fabric\n#### 3",
    ),
    (
        "Kylar went to the store to buy glasses for his new apartment. One glass costs $5, but every second "
        "glass costs only 60% of the price. Kylar wants to buy 16 glasses. How much does he need to pay for them?",
        "The discount price of one glass is 60/100 * 5 = $<<60/100*5=3>>3.\nIf every second glass is cheaper, "
        "that means Kylar is going to buy 16 / 2 = <<16/2=8>>8 cheaper glasses.\nSo for the cheaper glasses, "
        "Kylar is going to pay 8 * 3 = $<<8*3=24>>24.\nAnd for the regular-priced glasses, Kylar will pay "
        "8 * 5 = $<<8*5=40>>40.\nSo in total Kylar needs to pay 24 + 40 = $<<24+40=64>>64 for the glasses he "
        "wants to buy.\n#### 64",
        "How much does a discounted glass cost? ** The discount price of one glass is 60/100 * 5 = "
        "$<<60/100*5=3>>3.\nHow much does Kylar pay in total? ** Kylar pays 8 * 3 + 8 * 5 = "
        "$<<8*3+8*5=64>>64.\n#### 64",
    ),
    (
        "Toulouse has twice as many sheep as Charleston. Charleston has 4 times as many sheep as Seattle. "
        "How many sheep do Toulouse, Charleston, and Seattle have together if Seattle has 20 sheep?",
        "If Seattle has 20 sheep, Charleston has 4 * 20 sheep = <<20*4=80>>80 sheep\nToulouse has twice as "
        "many sheep as Charleston, which is 2 * 80 sheep = <<2*80=160>>160 sheep\nTogether, the three has "
        "20 sheep + 160 sheep + 80 sheep = <<20+160+80=260>>260 sheep\n#### 260",
        "How many sheep does Charleston have? ** Charleston has 4 * 20 sheep = <<20*4=80>>80 sheep\n"
        "How many sheep do they have together? ** 20 + 160 + 80 = <<20+160+80=260>>260 sheep\n#### 260",
    ),
]

GSM8K_TRAIN = [
    (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
        "altogether in April and May.\n#### 72",
        "How many clips did Natalia sell in May? ** Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "How many clips did Natalia sell altogether in April and May? ** Natalia sold 48+24 = "
        "<<48+24=72>>72 clips altogether in April and May.\n#### 72",
    ),
    (
        "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
        "How much did she earn?",
        "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
        "$<<0.2*50=10>>10.\n#### 10",
        "How much does Weng earn per minute? ** Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
        "How much did Weng earn? ** Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    ),
]

GSM8K_README = """---
annotations_creators:
- crowdsourced
language:
- en
license:
- mit
pretty_name: Grade School Math 8K
task_categories:
- text2text-generation
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train-*
  - split: test
    path: socratic/test-*
---

# Dataset Card for GSM8K (local stand-in with the hub repository's layout)
"""

# (category, turns, reference) as in lmsys' question.jsonl; the hub parquet renames turns to prompt.
MT_BENCH_QUESTIONS = [
    (
        81,
        "writing",
        [
            "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
            "experiences and must-see attractions.",
            "Rewrite your previous response. Start every sentence with the letter A.",
        ],
        [],
    ),
    (
        91,
        "roleplay",
        [
            "Pretend yourself to be Elon Musk in all the following conversations. Speak like Elon Musk as much "
            "as possible. Why do we need to go to Mars?",
            "How do you like dancing? Can you teach me?",
        ],
        [],
    ),
    (
        111,
        "math",
        [
            "The vertices of a triangle are at points (0, 0), (-1, 1), and (3, 3). What is the area of the triangle?",
            "What's area of the circle circumscribing the triangle?",
        ],
        ["Area is 3", "5pi"],
    ),
    (
        121,
        "coding",
        [
            "Develop a Python program that reads all the text files under a directory and returns top-5 words "
            "with the most number of occurrences.",
            "Can you parallelize it?",
        ],
        [],
    ),
    (
        131,
        "extraction",
        [
            "Evaluate the following movie reviews on a scale of 1 to 5, with 1 being very negative, 3 being "
            "neutral, and 5 being very positive:\n1. This movie released on Nov. 18, 2019, was phenomenal.\n"
            "2. Never before have I been so disappointed with a movie.\n3. The movie was okay.\n"
            "Return the answer as a JSON array of integers.",
            "Update your previous reply by including the release date as part of the JSON content.",
        ],
        [],
    ),
]

MT_BENCH_README = """---
license: apache-2.0
task_categories:
- question-answering
- conversational
language:
- en
tags:
- evaluation
pretty_name: MT Bench
size_categories:
- n<1K
---

# MT Bench by LMSYS (local stand-in with the hub repository's layout)
"""

# Conversations as (turns alternating user / assistant). The first user turn is the `prompt` column.
ULTRACHAT_TRAIN_SFT = [
    [
        "How does the process of photosynthesis work in plants?",
        "Photosynthesis turns light energy into chemical energy. In the chloroplasts, chlorophyll absorbs "
        "light, water is split into oxygen, protons and electrons, and the energy carriers ATP and NADPH "
        "drive the Calvin cycle, which fixes carbon dioxide into sugars.",
        "What role does chlorophyll play exactly?",
        "Chlorophyll is the pigment that absorbs mostly blue and red light and passes the energy to the "
        "reaction centres of the photosystems.",
    ],
    [
        "Write a short poem about the ocean at night.",
        "Beneath a silver, silent moon,\nthe tide hums low its ancient tune;\nthe dark waves fold, the "
        "foam runs white,\nand stars drown softly in the night.",
    ],
    [
        "Can you explain the difference between a list and a tuple in Python?",
        "Both are ordered sequences. A list is mutable: you can append, remove or change items. A tuple is "
        "immutable, which makes it hashable when its items are, so it can be a dictionary key.",
        "When should I prefer a tuple?",
        "Use a tuple for fixed records, such as coordinates, and whenever the value must not change.",
    ],
    [
        # Quotes a GSM8K test question with other line breaks: decontamination must drop this row.
        "Please help me with my homework:\n\n" + GSM8K_TEST[1][0].replace(". ", ".\n", 1),
        "The robe takes 2 bolts of blue fiber and 1 bolt of white fiber, so 3 bolts in total.",
    ],
    [
        "Summarize the main causes of the French Revolution in three sentences.",
        "France's finances were ruined by war debt while the nobility and clergy paid little tax. Bad "
        "harvests raised bread prices and hunger in the cities. Enlightenment ideas about rights and "
        "popular sovereignty gave the discontent a political programme.",
    ],
    [
        "Give me three tips for improving my sleep.",
        "Keep a regular schedule, even at weekends; avoid screens and caffeine in the evening; and keep "
        "your bedroom dark, quiet and cool.",
    ],
]

ULTRACHAT_OTHER_SPLITS = {
    "test_sft": [
        [
            "What is the capital of Australia?",
            "The capital of Australia is Canberra.",
        ],
    ],
    "train_gen": [
        [
            "Describe a sunrise over the mountains.",
            "The first light spills over the ridge, turning the snow pink and then gold.",
        ],
    ],
    "test_gen": [
        [
            "List two renewable energy sources.",
            "Solar power and wind power.",
        ],
    ],
}

ULTRACHAT_README = """---
language:
- en
license: mit
size_categories:
- 100K<n<1M
task_categories:
- text-generation
pretty_name: UltraChat 200k
configs:
- config_name: default
  data_files:
  - split: train_sft
    path: data/train_sft-*
  - split: test_sft
    path: data/test_sft-*
  - split: train_gen
    path: data/train_gen-*
  - split: test_gen
    path: data/test_gen-*
---

# Dataset Card for UltraChat 200k (local stand-in with the hub repository's layout)
"""


def _shard_name(split: str, rows: list) -> str:
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
    return f"{split}-00000-of-00001-{digest}.parquet"


def write_ultrachat(root) -> Path:
    """HuggingFaceH4/ultrachat_200k: one default config, splits train_sft, test_sft, train_gen, test_gen."""
    root = Path(root) / "ultrachat_200k"
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text(ULTRACHAT_README)
    for split, conversations in {"train_sft": ULTRACHAT_TRAIN_SFT, **ULTRACHAT_OTHER_SPLITS}.items():
        rows = [
            {
                "prompt": turns[0],
                "prompt_id": hashlib.sha256(turns[0].encode()).hexdigest(),
                "messages": [
                    {"content": text, "role": "user" if i % 2 == 0 else "assistant"} for i, text in enumerate(turns)
                ],
            }
            for turns in conversations
        ]
        Dataset.from_list(rows).to_parquet(str(root / "data" / _shard_name(split, rows)))
    return root


def write_mt_bench(root) -> Path:
    """HuggingFaceH4/mt_bench_prompts: split train; `prompt` is the list of the question's turns."""
    root = Path(root) / "mt_bench_prompts"
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "raw").mkdir(exist_ok=True)
    (root / "README.md").write_text(MT_BENCH_README)
    with open(root / "raw" / "question.jsonl", "w") as f:
        for qid, category, turns, reference in MT_BENCH_QUESTIONS:
            record = {"question_id": qid, "category": category, "turns": turns}
            f.write(json.dumps({**record, **({"reference": reference} if reference else {})}) + "\n")
    rows = [
        {
            "prompt": turns,
            # The hub's prompt_id: the sha256 of the joined turns, modulo 10**8 (its README's recipe).
            "prompt_id": int(hashlib.sha256("".join(turns).encode()).hexdigest(), 16) % 10**8,
            "category": category,
            "reference": reference,
        }
        for _, category, turns, reference in MT_BENCH_QUESTIONS
    ]
    Dataset.from_list(rows).to_parquet(str(root / "data" / _shard_name("train", rows)))
    return root


def write_gsm8k(root) -> Path:
    """openai/gsm8k: configs main and socratic, splits train and test, columns question and answer."""
    root = Path(root) / "gsm8k"
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text(GSM8K_README)
    for config, answer in (("main", 1), ("socratic", 2)):
        (root / config).mkdir(exist_ok=True)
        for split, examples in (("train", GSM8K_TRAIN), ("test", GSM8K_TEST)):
            rows = [{"question": ex[0], "answer": ex[answer]} for ex in examples]
            Dataset.from_list(rows).to_parquet(str(root / config / f"{split}-00000-of-00001.parquet"))
    return root


def write_all(root) -> dict[str, Path]:
    """All three stand-ins under `root`, keyed by the hub id each one replaces."""
    return {ULTRACHAT: write_ultrachat(root), MT_BENCH: write_mt_bench(root), GSM8K: write_gsm8k(root)}
