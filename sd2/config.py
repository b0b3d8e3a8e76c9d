"""Load and validate the workflow configuration against the package's config.schema.yaml."""

from pathlib import Path

import jsonschema
import yaml

from sd2 import fields
from sd2.errors import ConfigError
from sd2.methods import BY_NAME
from sd2.shapes import model_shape

SCHEMA_PATH = Path(__file__).resolve().parent / "config.schema.yaml"
FINETUNE_FIELDS = ["prompt_field", "response_field"]
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


def validate(config: dict) -> dict:
    """Fill defaults into `config` in place and check it; raise ConfigError naming the bad key."""
    if isinstance(config.get("finetune"), dict) and "loss" in config["finetune"]:
        raise ConfigError(
            "config error at finetune.loss: the fine-tuning loss is a sweep axis now; remove finetune.loss "
            f"and list the losses at the top level, e.g. `losses: [{config['finetune']['loss']}]`"
        )
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    # Errors are reported in a stable order, most specific key first.
    errors = sorted(validator.iter_errors(config), key=lambda e: (-len(e.path), _key(e.path)))
    if errors:
        err = errors[0]
        raise ConfigError(f"config error at {_key(err.path)}: {err.message}")
    _check_references(config)
    return config


def _check_references(config: dict) -> None:
    models = config["models"]
    for name, spec in models.items():
        where = f"models.{name}"
        if "hub" in spec:
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
    _check_data(config)


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
    on_original = [m for m in config["methods"] if BY_NAME[m].data == "original"]
    if data["finetune"]["source"] != "stdlib" and not data["finetune"]["response_field"] and on_original:
        raise ConfigError(
            f"config error at data.finetune.response_field: the {', '.join(on_original)} method trains on the "
            f"original responses; name their field or leave {', '.join(on_original)} out of methods"
        )


def load(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    config = yaml.safe_load(path.read_text()) or {}
    return validate(config)
