"""Which of a target's layers a draft cut from it should keep: greedy acceptance before any fine-tuning.

For each subset of the target's decoder layers (the rule `layers_of` uses, first layers only,
first and last, and the whole target minus its middle), one teacher-forced pass over the
target's cached greedy continuations gives the share of positions where the subset's argmax
is the target's token: the k = 1 acceptance rate of that subset as a draft, untuned. Prints
one row per subset (layers kept, MACs per token against the target's, acceptance) and writes
them as CSV with --out.

    python benchmarks/layer_subsets.py            # after `make real` (its target and continuations)
    python benchmarks/layer_subsets.py --prompts 16 --out results/real/tables/layer_subsets.csv
"""

import argparse
import copy

import pandas as pd
import torch

from sd2.drafts.layer_prune import default_drop, remove_layers
from sd2.macs import model_macs
from sd2.measure import continuations
from sd2.measure.acceptance import teacher_forced_matches
from sd2.models import load_model
from sd2.report.collect import write_table


def subsets(n: int) -> dict[str, list[int]]:
    spread = {f"spread {keep}": [i for i in range(n) if i not in default_drop(n, n - keep)] for keep in (6, 10, 15, 20)}
    return {
        **spread,
        "first 6": list(range(6)),
        "first 5 + last": [*range(5), n - 1],
        "first 20": list(range(20)),
        f"all but the middle 5 ({n - 5})": [i for i in range(n) if not n // 2 - 3 < i <= n // 2 + 2],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="work-real/hub/smollm2-135m-instruct")
    parser.add_argument("--outputs", default="work-real/target_outputs/smollm2-135m-instruct/humaneval.json")
    parser.add_argument("--prompts", type=int, default=32, help="the first this many cached continuations")
    parser.add_argument("--out", default=None, help="also write the rows as CSV")
    args = parser.parse_args()
    torch.set_num_threads(1)
    target = load_model(args.target, dtype="float32")
    cached = continuations.load(args.outputs)["items"][: args.prompts]
    items = [(i["prompt_ids"], i["continuation_ids"]) for i in cached]
    pad = target.config.pad_token_id or 0
    whole = model_macs(target)["macs_per_token"]
    rows = []
    for name, keep in subsets(target.config.num_hidden_layers).items():
        draft = copy.deepcopy(target)
        remove_layers(draft, [i for i in range(target.config.num_hidden_layers) if i not in keep])
        flags = [m for r in teacher_forced_matches(draft, items, pad_id=pad, batch_size=8) for m in r["matches"]]
        rows.append(
            {
                "subset": name,
                "layers kept": " ".join(map(str, keep)),
                "MACs vs target": round(model_macs(draft)["macs_per_token"] / whole, 3),
                "acceptance at k = 1, untuned": round(sum(flags) / len(flags), 3),
                "positions": len(flags),
            }
        )
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    if args.out:
        write_table(table, args.out)


if __name__ == "__main__":
    main()
