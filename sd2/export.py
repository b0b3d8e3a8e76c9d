"""Servable drafts: a sweep checkpoint as a plain Hugging Face checkpoint, with what was measured about it.

The export is what `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` and
vLLM's `draft_model` speculative method load: the checkpoint's safetensors (hard links, so the
bytes and the dtype are the ones the sweep stored, zeros included), config.json,
generation_config.json and the tokenizer files, plus sd2_draft.json: target, draft, method, loss,
sparsity, the MAL measured at the headline k on every eval set (with its CI), the k that served
best, the vLLM command for that k, and the source checkpoint's provenance. sd2's own files
(provenance.json, training.csv) stay behind; their content is in sd2_draft.json.
"""

import json
import math
import os
import shlex
import shutil
from pathlib import Path

from sd2 import methods, variants
from sd2.checkpoint import atomic_path, write_json
from sd2.parallel import MASK_KEY as PARALLEL_KEY
from sd2.provenance import provenance

METADATA = "sd2_draft.json"
SD2_FILES = {"provenance.json", "training.csv"}
# Per (eval set, temperature), the measurement reported: exact ones first; tvd_estimate is a model of acceptance.
# The export's numbers come from the rule its `vllm serve` command runs: the shared-tokenizer walk, or for a
# different tokenizer vLLM's token-level intersection (tli_walk), not transformers' re-encoding (uag_walk).
# A parallel draft (loss pard) has only its own walk, which is the rule vLLM's parallel drafting runs.
ESTIMATORS = ("parallel_walk", "teacher_forced_walk", "tli_walk", "assisted_generation")
LABELS = ("target", "draft", "method", "sparsity")


def link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link src to dst (same bytes, no disk); copy where the filesystem refuses a link."""
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def weight_files(checkpoint: Path) -> list[Path]:
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files or not (checkpoint / "config.json").exists():
        raise ValueError(f"{checkpoint}: not a safetensors checkpoint (needs config.json and *.safetensors)")
    return files


def tensor_summary(checkpoint: Path, sparsity: int | None = None) -> dict:
    """Stored dtypes and the zeros of every decoder linear weight (2-D tensors inside `.layers.`), read back from disk.

    With `sparsity` (percent), every such tensor must hold at least floor(sparsity% of its size) zeros:
    the masks survived fine-tuning and export.
    """
    import torch
    from safetensors import safe_open

    dtypes, zeros, total = set(), 0, 0
    for path in weight_files(checkpoint):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                dtypes.add(f.get_slice(name).get_dtype())
                if ".layers." not in name or not name.endswith(".weight") or len(f.get_slice(name).get_shape()) != 2:
                    continue
                weight = f.get_tensor(name)
                n_zero = int(torch.count_nonzero(weight == 0))
                if sparsity is not None and n_zero < math.floor(sparsity / 100 * weight.numel()):
                    raise ValueError(
                        f"{path}: {name} has {n_zero / weight.numel():.4f} zeros, the draft is {sparsity}% sparse"
                    )
                zeros, total = zeros + n_zero, total + weight.numel()
    return {"stored_dtypes": sorted(dtypes), "decoder_linear_sparsity": zeros / total if total else None}


def load_records(record_files, labels: dict) -> list[dict]:
    """Every record of the measurement files, checked to be about this (target, draft, method, sparsity)."""
    records = []
    for path in record_files:
        for record in json.loads(Path(path).read_text())["records"]:
            wrong = {key: record.get(key) for key in LABELS if record.get(key) != labels[key]}
            if wrong:
                raise ValueError(f"{path}: a record of {wrong}, not of this export's {labels}")
            records.append(record)
    if not records:
        raise ValueError(f"no measurement records in {list(map(str, record_files))}")
    return records


def _chosen(records: list[dict]) -> list[dict]:
    """Per (eval set, temperature), the records of the first estimator in ESTIMATORS that was measured."""
    found = {}
    for r in records:
        found.setdefault((r["eval_set"], r["temperature"]), set()).add(r["estimator"])
    keep = {key: next((e for e in ESTIMATORS if e in names), None) for key, names in found.items()}
    return [r for r in records if keep[(r["eval_set"], r["temperature"])] == r["estimator"]]


def headline(records: list[dict]) -> list[dict]:
    """MAL with its 95% CI at the config's headline k (measure.k), per eval set and temperature."""
    rows = []
    for r in _chosen(records):
        if r["k"] not in r["provenance"]["settings"].get("k", [r["k"]]):
            continue
        rows.append(
            {
                key: r.get(key)
                for key in (
                    "eval_set",
                    "temperature",
                    "k",
                    "estimator",
                    "mal",
                    "mal_ci_low",
                    "mal_ci_high",
                    "mal_vllm",
                    "mal_vllm_ci_low",
                    "mal_vllm_ci_high",
                    "improvement_factor",
                    "n_prompts",
                )
            }
        )
    return sorted(rows, key=lambda row: (row["eval_set"], row["temperature"], row["k"]))


def best_k(records: list[dict]) -> dict:
    """The k to serve with: largest improvement factor averaged over the eval sets, at the lowest temperature.

    Only k values measured on every eval set compete (the walk gives 1..k_max, assisted generation
    the headline k only); a tie goes to the smaller k.
    """
    rows = [r for r in _chosen(records) if r.get("improvement_factor") is not None]
    if not rows:  # every generation ended in its first step: no step was counted
        k = records[0]["provenance"]["settings"]["k"][0]
        return {"k": k, "criterion": "no improvement factor was measured: the first headline k (measure.k)"}
    temperature = min(r["temperature"] for r in rows)
    rows = [r for r in rows if r["temperature"] == temperature]
    eval_sets = {r["eval_set"] for r in rows}
    by_k = {}
    for r in rows:
        by_k.setdefault(r["k"], {})[r["eval_set"]] = r
    scored = {
        k: sum(r["improvement_factor"] for r in got.values()) / len(got)
        for k, got in by_k.items()
        if set(got) == eval_sets
    }
    if not scored:
        raise ValueError(f"no k was measured on every eval set ({sorted(eval_sets)})")
    k = max(sorted(scored), key=lambda k: scored[k])
    return {
        "k": k,
        "temperature": temperature,
        "mean_improvement_factor": scored[k],
        "mal": {e: by_k[k][e]["mal"] for e in sorted(eval_sets)},
        "criterion": "largest mean improvement factor MAL / (1 + k * draft MACs / target MACs) over the eval sets",
    }


def _vocab_size(name_or_path, trust_remote_code: bool = False) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    return config.get_text_config().vocab_size


def vllm_command(target: str, draft_dir, k: int, heterogeneous: bool, parallel: bool = False) -> tuple[dict, str]:
    """vLLM's speculative config for this draft (vllm/config/speculative.py), and `vllm serve` with it.

    use_heterogeneous_vocab: vLLM refuses a draft whose vocabulary size differs from the target's
    unless it is set; with it, drafting is greedy only (draft_sample_method greedy, vLLM's default).
    parallel_drafting: a parallel draft proposes all k tokens in one pass, reading k - 1 copies of the
    `pard_token` its config.json names after the last token.
    """
    spec = {"method": "draft_model", "model": str(Path(draft_dir).absolute()), "num_speculative_tokens": k}
    if heterogeneous:
        spec["use_heterogeneous_vocab"] = True
    if parallel:
        spec["parallel_drafting"] = True
    return spec, f"vllm serve {shlex.quote(str(target))} --speculative-config {shlex.quote(json.dumps(spec))}"


def check_tokenizer(export_dir: Path, source_dir: Path) -> None:
    """AutoTokenizer alone must load the tokenizer the measurements used (sd2.models.load_tokenizer)."""
    from transformers import AutoTokenizer

    from sd2.models import load_tokenizer, same_tokenizer

    auto = AutoTokenizer.from_pretrained(str(export_dir))
    if not same_tokenizer(auto, load_tokenizer(source_dir)):
        raise ValueError(
            f"{source_dir}: AutoTokenizer loads this checkpoint's tokenizer as {type(auto).__name__}, which encodes "
            "differently from the tokenizer it was measured with (transformers picks the class from the model type, "
            "e.g. Qwen2Tokenizer for any qwen2 model): the export would not serve what was measured"
        )


VLLM_NOTE = (
    "vLLM runs the draft in the target's dtype. At temperature 0 this command is what the greedy MAL "
    "measures. At temperature > 0 vLLM's default greedy drafting is not what the sampled MAL measures "
    "(the draft sampling its own distribution): add draft_sample_method: probabilistic for that "
    "(same vocabulary only). With use_heterogeneous_vocab vLLM drafts over the vocabularies' "
    "intersection: the headline is then the tli_walk, which measures that rule. mal_vllm is the mean "
    "acceptance length as vLLM's counters log it (every step counted). With parallel_drafting vLLM feeds the "
    "draft num_speculative_tokens - 1 copies of its config's pard_token after the last token and takes every "
    "proposal from that one pass: the parallel_walk measures that rule."
)


def copy_checkpoint(draft_dir: Path, weights: list[Path], dest: Path) -> dict:
    """The servable files of `draft_dir` into `dest`: weights linked, the rest copied but sd2's own files,
    a generation_config.json written where there is none. Returns how each file got there, by name."""
    from transformers import AutoConfig, GenerationConfig

    files = {p.name: link_or_copy(p, dest / p.name) for p in weights}
    for p in sorted(draft_dir.iterdir()):
        if p.is_file() and p.name not in files and p.name not in SD2_FILES:
            shutil.copy2(p, dest / p.name)
            files[p.name] = "copy"
    if not (dest / "generation_config.json").exists():
        GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(dest))).save_pretrained(dest)
        files["generation_config.json"] = "written"
    return files


def export_draft(
    draft_dir,
    record_files,
    out_dir,
    *,
    target: str,
    labels: dict,
    run_name: str,
    seed: int,
    trust_remote_code: bool = False,
) -> dict:
    """Export the draft checkpoint `draft_dir` to `out_dir` (atomically); return its metadata (sd2_draft.json)."""
    draft_dir, out_dir = Path(draft_dir), Path(out_dir)
    weights = weight_files(draft_dir)
    records = load_records(record_files, labels)
    same_tokenizer = {bool(r["same_tokenizer"]) for r in records}
    if len(same_tokenizer) != 1:
        raise ValueError(f"records of {labels} disagree on whether the tokenizers are the same")
    chosen = best_k(records)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        files = copy_checkpoint(draft_dir, weights, tmp)
        check_tokenizer(tmp, draft_dir)
        # labels["method"] is the workflow's variant name (sd2+kl): the registry's method and its loss.
        method, loss = variants.parse_variant(labels["method"])
        masked = masked_method(method) and labels["sparsity"] > 0
        tensors = tensor_summary(tmp, labels["sparsity"] if masked else None)
        draft_vocab, target_vocab = _vocab_size(tmp), _vocab_size(target, trust_remote_code)
        heterogeneous = not same_tokenizer.pop() or draft_vocab != target_vocab
        parallel = json.loads((tmp / "config.json").read_text()).get(PARALLEL_KEY) is not None
        spec, command = vllm_command(target, out_dir, chosen["k"], heterogeneous, parallel)
        source_prov = draft_dir / "provenance.json"
        metadata = {
            **{key: labels[key] for key in LABELS},
            "method": method,
            "loss": loss,
            "target_model": str(target),
            "run_name": run_name,
            "seed": seed,
            "eval_sets": sorted({r["eval_set"] for r in records}),
            "headline": headline(records),
            "best_k": chosen,
            **tensors,
            "vocab_size": {"draft": draft_vocab, "target": target_vocab},
            "vllm": {"speculative_config": spec, "serve": command, "note": VLLM_NOTE},
            "files": files,
            "source": {
                "path": str(draft_dir),
                "provenance": json.loads(source_prov.read_text()) if source_prov.exists() else None,
            },
            "provenance": provenance(
                seed=seed, draft=str(draft_dir), target=str(target), records=[str(p) for p in record_files]
            ),
        }
        write_json(tmp / METADATA, metadata)
    return metadata


def masked_method(name: str) -> bool:
    """Whether a method's decoder linears carry pruning masks: its start point is a masked copy of the
    dense draft (SparseGPT-pruned; layer_pruned drops whole layers instead)."""
    m = methods.method(name)
    return m.init is not None and methods.start_point(m.init).masked
