"""Load and validate the workflow configuration against the package's config.schema.yaml.

The schema's registry names (the `methods`, `losses` and `heads.methods` lists and `heads.sizes`)
are filled in from sd2.methods when a config is validated, after the config's `extensions` are
imported, so a name an extension registers is a valid name.
"""

import copy
import json
from pathlib import Path

import jsonschema
import yaml

from sd2 import fields, methods
from sd2.errors import ConfigError
from sd2.shapes import model_shape

SCHEMA_PATH = Path(__file__).resolve().parent / "config.schema.yaml"
FINETUNE_FIELDS = ["prompt_field", "response_field"]
LOCAL_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")  # what sd2.data reads
SCRATCH_KEYS = ("arch", "tokenizer", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _with_defaults(validator_class):
    set_defaults = validator_class.VALIDATORS["properties"]

    def fill(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = _copy(sub["default"])
        yield from set_defaults(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": fill})


def _copy(value):
    return yaml.safe_load(yaml.safe_dump(value))


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def schema() -> dict:
    """config.schema.yaml with the registry's names filled in (sd2.methods, extensions included)."""
    full = yaml.safe_load(SCHEMA_PATH.read_text())
    props = full["properties"]
    props["methods"]["items"] = _names("method", methods.NAMES)
    props["losses"]["items"] = _names("loss", methods.LOSSES)
    heads = props["heads"]["properties"]
    heads["methods"]["items"] = _names("draft-head family", methods.HEAD_FAMILIES)
    heads["sizes"]["properties"] = {name: _sizes(f) for name, f in methods.HEAD_FAMILIES.items()}
    return full


def _names(kind: str, names) -> dict:
    # The title names the kind in the error message (_message).
    return {"enum": list(names), "title": kind}


def _sizes(family: methods.HeadFamily) -> dict:
    """heads.sizes.<family>: named sizes, each the keyword arguments of the family's head."""
    return {
        "type": "object",
        "propertyNames": {"pattern": "^[A-Za-z0-9_.]+$"},
        "minProperties": 1,
        "default": family.default_sizes,
        "description": family.description or f"{family.name} sizes.",
        "additionalProperties": {
            "type": "object",
            "additionalProperties": False,
            "required": [key for key, sub in family.size.items() if "default" not in sub],
            "properties": family.size,
        },
    }


def _message(err) -> str:
    if err.validator == "enum" and "title" in err.schema:
        known = ", ".join(map(str, err.validator_value))
        return f"unknown {err.schema['title']} {err.instance!r} (known: {known})"
    return err.message


def validate(config: dict) -> dict:
    """A checked copy of `config` with every default filled in; `config` itself is not changed.
    Raises ConfigError naming the bad key."""
    config = copy.deepcopy(config)
    if isinstance(config.get("finetune"), dict) and "loss" in config["finetune"]:
        raise ConfigError(
            "config error at finetune.loss: the fine-tuning loss is a sweep axis now; remove finetune.loss "
            f"and list the losses at the top level, e.g. `losses: [{config['finetune']['loss']}]`"
        )
    _import_extensions(config.get("extensions", []))
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema())
    # Errors are reported in a stable order, most specific key first.
    errors = sorted(validator.iter_errors(config), key=lambda e: (-len(e.path), _key(e.path)))
    if errors:
        err = errors[0]
        raise ConfigError(f"config error at {_key(err.path)}: {_message(err)}")
    _check_references(config)
    return config


def _import_extensions(modules) -> None:
    """Import the config's extension modules before any name is checked (they register names)."""
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ConfigError(f"config error at extensions: a list of module names, not {modules!r}")
    for i, module in enumerate(modules):
        try:
            methods.load_extensions([module])
        except ImportError as err:
            raise ConfigError(f"config error at extensions.{i}: cannot import {module}: {err}") from err


def _check_references(config: dict) -> None:
    models = config["models"]
    _check_tokenizers(config)
    for name, spec in models.items():
        where = f"models.{name}"
        if "gguf" in spec and "hub" not in spec:
            raise ConfigError(f"config error at {where}.gguf: only a hub model has a GGUF fallback; add its `hub` id")
        if "layers_of" in spec:
            _check_layers_of(name, spec, models)
        elif "hub" in spec:
            extra = [k for k in SCRATCH_KEYS if k in spec]
            if extra:
                raise ConfigError(
                    f"config error at {where}: a hub model takes no from-scratch keys ({', '.join(extra)})"
                )
        elif "shape" in spec:
            raise ConfigError(
                f"config error at {where}.shape: a from-scratch model is sized by its own keys; shape is for hub models"
            )
        else:
            missing = [k for k in SCRATCH_KEYS if k not in spec]
            if missing:
                raise ConfigError(
                    f"config error at {where}: needs either 'hub' or the from-scratch keys; "
                    f"missing {', '.join(missing)}"
                )
            if spec["tokenizer"] not in config["tokenizers"]:
                raise ConfigError(
                    f"config error at {where}.tokenizer: unknown tokenizer family '{spec['tokenizer']}' "
                    f"(known: {sorted(config['tokenizers'])})"
                )
            heads = spec["num_attention_heads"]
            if spec["hidden_size"] % heads:
                raise ConfigError(
                    f"config error at {where}.hidden_size: {spec['hidden_size']} is not divisible by "
                    f"num_attention_heads={heads}"
                )
            if heads % spec.get("num_key_value_heads", heads):
                raise ConfigError(
                    f"config error at {where}.num_key_value_heads: must divide num_attention_heads={heads}"
                )
    for role in ("targets", "drafts"):
        for i, name in enumerate(config[role]):
            if name not in models:
                raise ConfigError(f"config error at {role}.{i}: unknown model '{name}' (known: {sorted(models)})")
    if config["resources"]["gpu"] > 0:
        # A GPU run sizes every job from its models: a model that cannot be sized stops here.

        for name in dict.fromkeys(config["targets"] + config["drafts"]):
            model_shape(name, config)
    if config["prune"]["structure"] == "2:4" and any(s != 50 for s in config["sparsities"]):
        raise ConfigError(
            f"config error at prune.structure: 2:4 sparsity is exactly 50%, but sparsities is {config['sparsities']}"
        )
    measure = config["measure"]
    if max(measure["k"]) > measure["k_max"]:
        raise ConfigError(
            f"config error at measure.k: {max(measure['k'])} is more than measure.k_max={measure['k_max']} "
            "(the walk covers k = 1..k_max)"
        )
    _check_every_k(config)
    _check_data(config)


def _check_every_k(config: dict) -> None:
    """measure.check_every_k must name a cell the sweep measures, measure.uag_eval_sets eval sets it has and
    measure.uag_methods registered methods."""
    for key, known_names, where in (
        ("uag_eval_sets", set(config["data"]["eval_sets"]), "data.eval_sets"),
        ("uag_methods", set(methods.BY_NAME), "the registered methods"),
    ):
        unknown = sorted(set(config["measure"][key] or []) - known_names)
        if unknown:
            raise ConfigError(f"config error at measure.{key}: {unknown} not among {where} {sorted(known_names)}")
    cell = config["measure"]["check_every_k"]
    if cell is None:
        return
    known = {
        "draft": config["drafts"],
        "method": config["methods"],
        "sparsity": [0] + config["sparsities"],
        "eval_set": list(config["data"]["eval_sets"]),
    }
    for key, values in known.items():
        if cell[key] not in values:
            raise ConfigError(
                f"config error at measure.check_every_k.{key}: {cell[key]!r} is not one the sweep measures "
                f"(known: {values})"
            )


def _check_tokenizers(config: dict) -> None:
    for family, spec in config["tokenizers"].items():
        where = f"tokenizers.{family}"
        if spec["kind"] == "from_model":
            if spec.get("model") not in config["models"]:
                raise ConfigError(
                    f"config error at {where}.model: kind from_model needs the model whose tokenizer is copied "
                    f"(a key of models: {sorted(config['models'])}), got {spec.get('model')!r}"
                )
        elif "vocab_size" not in spec or "model" in spec:
            raise ConfigError(
                f"config error at {where}: a trained tokenizer ({spec['kind']}) takes vocab_size, not model"
            )


def _check_layers_of(name: str, spec: dict, models: dict) -> None:
    where = f"models.{name}"
    extra = [k for k in ("hub", "shape", "gguf", *SCRATCH_KEYS) if k in spec]
    if extra:
        raise ConfigError(f"config error at {where}: a model made of another's layers takes no {', '.join(extra)}")
    whole = spec["layers_of"]["model"]
    if whole not in models or "layers_of" in models[whole]:
        raise ConfigError(
            f"config error at {where}.layers_of.model: '{whole}' is not a model with layers of its own "
            f"(known: {sorted(n for n, s in models.items() if 'layers_of' not in s)})"
        )


def _check_data(config: dict) -> None:
    data = config["data"]
    sources = {"data.corpus": (data["corpus"], ["text_field"]), "data.finetune": (data["finetune"], FINETUNE_FIELDS)}
    sources.update({f"data.eval_sets.{name}": (spec, ["prompt_field"]) for name, spec in data["eval_sets"].items()})
    for where, (spec, field_keys) in sources.items():
        source = spec["source"]
        # A key the source does not read would be silently ignored: say so instead.
        needed = {"hub": ["dataset"], "file": ["path"]}.get(source, [])
        unused = {"hub": ["path"], "file": ["dataset", "config"]}.get(source, ["dataset", "config", "path"])
        for key in needed:
            if not spec.get(key):
                raise ConfigError(f"config error at {where}.{key}: source '{source}' needs a {key}")
        for key in unused:
            if spec.get(key) is not None:
                raise ConfigError(f"config error at {where}.{key}: source '{source}' does not read a {key}")
        if source in ("hub", "file"):
            for key in field_keys:
                if spec[key] is not None:
                    try:
                        fields.parse(spec[key])
                    except fields.FieldSpecError as err:
                        raise ConfigError(f"config error at {where}.{key}: {err}") from None
    # Stdlib fine-tuning and held-out prompts are functions of the stdlib corpus' two splits.
    stdlib_users = {"data.finetune": data["finetune"]["source"] == "stdlib"}
    stdlib_users.update({f"data.eval_sets.{n}": s["source"] == "stdlib_heldout" for n, s in data["eval_sets"].items()})
    for where, uses in stdlib_users.items():
        if uses and data["corpus"]["source"] != "stdlib":
            raise ConfigError(
                f"config error at {where}.source: these prompts are functions of the stdlib corpus, "
                f"but data.corpus.source is '{data['corpus']['source']}'"
            )
    on_original = [m for m in config["methods"] if methods.BY_NAME[m].data == "original"]
    if data["finetune"]["source"] != "stdlib" and not data["finetune"]["response_field"] and on_original:
        raise ConfigError(
            f"config error at data.finetune.response_field: the {', '.join(on_original)} method trains on the "
            f"original responses; name their field or leave {', '.join(on_original)} out of methods"
        )
    for where, (spec, field_keys) in sources.items():
        if spec["source"] == "file":
            _check_file(spec, field_keys, where)


def _check_file(spec: dict, field_keys: list, where: str) -> None:
    """A local file exists, and its first row has what the field specs name (the prompt, ...)."""
    path = Path(spec["path"])  # relative to the directory Snakemake runs in
    if not path.is_file():
        raise ConfigError(f"config error at {where}.path: file {path} does not exist")
    if path.suffix.lower() not in LOCAL_FILE_SUFFIXES:
        raise ConfigError(f"config error at {where}.path: {path} is not one of {', '.join(LOCAL_FILE_SUFFIXES)}")
    row = _first_row(path)
    if row is None:
        raise ConfigError(f"config error at {where}.path: {path} has no rows")
    for key in field_keys:
        if spec[key] is None:
            continue
        field = fields.parse(spec[key])
        if field.column not in row:
            raise ConfigError(
                f"config error at {where}.{key}: {path} has no column '{field.column}' (its first row has "
                f"{', '.join(sorted(row))})"
            )
        try:
            field.resolve(row)
        except fields.FieldSpecError as err:
            raise ConfigError(f"config error at {where}.{key}: in the first row of {path}: {err}") from None


def _first_row(path: Path) -> dict | None:
    """The first record of a .jsonl, .json (records or JSON lines) or .parquet file; None if it has none."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        batch = next(pq.ParquetFile(path).iter_batches(batch_size=1), None)
        return batch.to_pylist()[0] if batch is not None and batch.num_rows else None
    with path.open(encoding="utf-8") as lines:
        first = next((line for line in lines if line.strip()), None)
    if first is None:
        return None
    try:
        value = json.loads(first)
    except json.JSONDecodeError:  # a .json file of records over several lines
        value = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, dict) else None


def read(path) -> dict:
    """A config file's YAML, unvalidated; a key given twice in one mapping is a ConfigError (plain
    YAML loading would keep the last silently)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    _check_unique_keys(yaml.compose(text, Loader=yaml.SafeLoader), (), path)
    return yaml.safe_load(text) or {}


def _check_unique_keys(node, where: tuple, path: Path) -> None:
    if isinstance(node, yaml.MappingNode):
        seen = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise ConfigError(
                        f"config error at {_key((*where, key.value))}: duplicate key in {path} "
                        f"(lines {seen[key.value]} and {key.start_mark.line + 1})"
                    )
                seen[key.value] = key.start_mark.line + 1
            _check_unique_keys(value, (*where, getattr(key, "value", "?")), path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, (*where, i), path)


def load(path) -> dict:
    return validate(read(path))
