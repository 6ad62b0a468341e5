"""YAML run configurations: a schema of known keys, ``base:`` inheritance and ``--set`` overrides.

A config file is a mapping of sections (``data``, ``head``, ``loss``, ``optim``, ``eval``,
``init``, ``run``); ``base: other.yaml`` (relative to the file) names a config it extends: mappings
merge key by key, any other value replaces the base's. Every key must exist in ``DEFAULTS`` (the
schema, which also supplies the default values); ``head`` and ``loss`` accept the options of the
chosen head/loss (read from their registries), ``optim.lr_mult`` maps parameter-name prefixes to lr
multipliers and ``init.rename`` maps the parameter-name prefixes of a warm-start checkpoint to this
head's (``longest_prefix`` resolves both).

``--set key.sub=value`` overrides one key after the files are merged; the value is parsed as YAML
(``--set optim.milestones=[10,20]``). PyYAML reads ``5e-4`` (no dot) as a string; keys whose default
is a float accept such strings as numbers.

Feature caches live at ``<data.features>/<data.dataset>/<split>/<modality>-<tag>.h5`` with the tags
``data.image`` / ``data.text``; relative paths are relative to the working directory.

``data.image_source`` / ``data.text_source`` name a registered token source (``heads.sources``):
``cache`` reads the cached tokens;
``tail`` runs a layer-K cache through the backbone's blocks after K, ``e2e`` the photos / captions
through the whole backbone, both trained with the head. A tuned side's parameters are named
``<side>_source.*`` in ``optim.lr_mult``; without an entry for that prefix it gets
``TAIL_LR_MULT`` (x0.1, the references' BERT / ViT multiplier; VSE∞ tunes CNNs at x0.01: set it),
written into the resolved config. ``data.<side>_backbone`` names a tuned side's backbone
(``BACKBONE_KEYS``); the trainer fills it from the train cache and refuses caches that differ from
what a config sets there.
"""
from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any, Iterable

import yaml

from backbones.transforms import CROP_SCALE
from cache.datasets import PRELOAD_CHOICES
from cache.errors import InputError
from cache.store import MODALITIES, default_cache_path
from heads.eval.metrics import PROTOCOLS
from heads.raw_inputs import WORD_AUGMENT
from heads.registry import head_options
from heads.sources import EPOCH_UNITS, list_sources, source_class
from train.distributed import GATHER_MODES

DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {
        "dataset": "f8k",             # folder under data.features
        "features": "features",       # root of the cache tree
        "image": None,                # image cache tag, e.g. efficientnet_lite0
        "text": None,                 # text cache tag, e.g. minilm
        "train_split": "train",
        "dev_split": "dev",           # model selection (never test)
        "test_split": "test",
        "preload": "auto",            # none | ram | device | auto
        "image_token_drop": 0.2,      # VSE∞ region drop; prefix tokens (CLS) never dropped
        "text_token_drop": 0.1,       # feature-level substitute for word deletion; [CLS]/[SEP] kept
        "num_workers": 0,             # DataLoader workers (each reopens the memmaps)
        "image_source": "cache",      # cache | tail | e2e: the cached tokens, a layer-K cache through
        "text_source": "cache",       # the backbone's blocks after K, or the photos / captions
                                      # through the whole backbone; tail and e2e tune with the head
        "image_backbone": None,       # a tuned side's backbone {encoder, weights_id, weights_hash,
        "text_backbone": None,        # layer}: filled from the train cache; set keys must match it
        "images_root": None,          # e2e: folder of the photos (None: as recorded in the cache)
        "crop_scale": list(CROP_SCALE),  # e2e: RandomResizedCrop scale range (+ horizontal flip)
        "text_augment": WORD_AUGMENT,  # e2e: probability of perturbing a caption word (VSE∞)
        "epoch_over": "auto",         # captions | images (one random caption each) | auto: images
                                      # when the image side is e2e (a photo decoded once an epoch)
    },
    "head": {"name": None},           # + the head's constructor options
    "loss": {"name": "hinge"},        # + the loss's options (heads.losses.loss_options)
    "optim": {
        "name": "adamw",              # adamw | adam
        "lr": 5e-4,
        "weight_decay": 1e-4,         # head parameters only (a loss temperature gets none)
        "epochs": 25,
        "batch_size": 128,            # global batch (split over DDP ranks)
        "milestones": [15],           # epochs at which the lr is multiplied by gamma
        "gamma": 0.1,
        "warmup_steps": 0,            # linear warm-up of the lr over the first steps
        "grad_clip": 2.0,             # global gradient norm; 0 = off
        "lr_mult": {},                # parameter-name prefix -> lr multiplier (longest prefix wins)
        "layer_decay": 1.0,           # tuned backbone blocks: lr x decay^(depth from the top); 1 = off
        "backbone_frozen_epochs": 0,  # tuned sides train from this epoch on (VSE∞
                                      # embedding_warmup_epochs); their weights stay in the optimiser
    },
    "eval": {
        "protocol": "full",           # full | coco5k | coco1k (dev during training, default of eval)
        "batch_size": 256,            # encoding batch
        "image_block": None,          # scoring block sizes (None: the evaluator's defaults)
        "caption_block": None,
        "dev_images": None,           # dev evaluation during training on the first N images and
                                      # their captions only (None: the whole dev split)
    },
    "init": {
        "checkpoint": None,           # warm start: a checkpoint of another run (e.g. a linear head)
                                      # whose matching weights initialise this head
        "rename": {},                 # source-name prefix -> this head's prefix, e.g.
                                      # {image_fc: vision_proj, text_fc: text_proj}
    },
    "run": {
        "seed": 0,
        "device": "auto",             # auto | cpu | cuda | cuda:N
        "threads": 0,                 # CPU intra-op threads (0 = PyTorch's default); 1 is much
                                      # faster for small heads on a busy shared CPU
        "amp": True,                  # bf16 autocast on CUDA (CPU always runs fp32)
        "log_every": 50,              # steps between progress-bar / log.jsonl loss updates
        "tensorboard": True,          # when the tensorboard package is installed
        "find_unused_parameters": True,  # DDP: heads may leave inference-only parameters unused
        "ddp_gather": "auto",         # DDP: auto | encodings | inputs (train.distributed.gather_mode)
        "sync_batchnorm": True,       # DDP on CUDA: BatchNorm statistics over the global batch
        "grad_checkpointing": False,  # tuned blocks recompute activations in backward (memory)
    },
}
OPEN_SECTIONS = ("head", "loss")      # options checked against the head / loss registries
OPEN_MAPPINGS = (("optim", "lr_mult"), ("init", "rename"), ("data", "image_backbone"),
                 ("data", "text_backbone"))
BACKBONE_KEYS = ("encoder", "weights_id", "weights_hash", "layer")
EPOCH_OVER = ("auto", *EPOCH_UNITS)
OPTIMIZERS = ("adamw", "adam")
TAIL_LR_MULT = 0.1
"""lr multiplier of a tuned side's backbone blocks unless ``optim.lr_mult.<side>_source`` says
otherwise: the references' BERT and ViT multiplier (x0.1 of the head's lr)."""


def longest_prefix(name: str, prefixes: Iterable[str]) -> str | None:
    """The longest of ``prefixes`` that names ``name`` or one of its parents (``image_fc`` for
    ``image_fc.weight``; a trailing dot is ignored), or None."""
    matches = [p for p in prefixes if name == p or name.startswith(p.rstrip(".") + ".")]
    return max(matches, key=len) if matches else None


# ----------------------------------------------------------------------------------------- files


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise InputError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, mapping by mapping; a head or loss section that names another head or
    loss replaces the section (the options of a hinge loss do not carry over to InfoNCE)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if (key in OPEN_SECTIONS and isinstance(value, dict) and isinstance(out.get(key), dict)
                and value.get("name") not in (None, out[key].get("name"))):
            out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _check_keys(data: dict[str, Any], source: str) -> None:
    """Every key of a file or override must be in the schema (open sections aside)."""
    for section, values in data.items():
        if section not in DEFAULTS:
            raise InputError(f"{source}: unknown config section {section!r}; known: "
                             f"{', '.join(DEFAULTS)}")
        if not isinstance(values, dict):
            raise InputError(f"{source}: section {section!r} must be a mapping")
        if section in OPEN_SECTIONS:
            continue
        for key, value in values.items():
            if key not in DEFAULTS[section]:
                raise InputError(f"{source}: unknown config key '{section}.{key}'; known keys of "
                                 f"{section}: {', '.join(DEFAULTS[section])}")
            if (section, key) in OPEN_MAPPINGS and value is not None and not isinstance(value, dict):
                raise InputError(f"{source}: '{section}.{key}' must be a mapping")


def load_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file merged over its ``base:`` chain (keys checked per file, defaults not added)."""
    path = Path(path)
    if path.resolve() in _seen:
        raise InputError(f"{path}: circular 'base:' chain")
    data = _read_yaml(path)
    base = data.pop("base", None)
    _check_keys(data, str(path))
    if base is None:
        return data
    if not isinstance(base, str):
        raise InputError(f"{path}: 'base' must be a file name")
    return _merge(load_file(path.parent / base, _seen + (path.resolve(),)), data)


# ------------------------------------------------------------------------------------- overrides


def parse_override(text: str, source: str = "--set") -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not sep or len(parts) < 2 or not all(parts):
        raise InputError(f"{source} {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise InputError(f"{source} {text!r}: the value is not valid YAML ({exc})") from exc
    return parts, value


def apply_overrides(config: dict[str, Any], overrides: Iterable[str],
                    source: str = "") -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to a config (a copy); unknown keys are InputErrors."""
    config = copy.deepcopy(config)
    where = f" (config {source})" if source else ""
    for text in overrides:
        parts, value = parse_override(text)
        nested: Any = value
        for part in reversed(parts[1:]):
            nested = {part: nested}
        try:
            _check_keys({parts[0]: nested}, f"--set {text}")
        except InputError as exc:
            raise InputError(f"{exc}{where}") from None
        if len(parts) > 2 and not ((parts[0], parts[1]) in OPEN_MAPPINGS or parts[0] in OPEN_SECTIONS):
            raise InputError(f"--set {text}: '{parts[0]}.{parts[1]}' has no sub-keys{where}")
        target = config.setdefault(parts[0], {})
        for part in parts[1:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[parts[-1]] = value
    return config


# ------------------------------------------------------------------------------------ validation


def _coerce(value: Any, default: Any, key: str, source: str) -> Any:
    """Check ``value`` against the type of its default (None = anything)."""
    def bad(kind: str) -> InputError:
        return InputError(f"{source}: '{key}' must be {kind}, got {value!r}")

    if default is None or value is None and isinstance(default, (list, dict)):
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif isinstance(default, float):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
    elif isinstance(default, list):
        if not isinstance(value, list):
            raise bad("a list")
    elif isinstance(default, dict):
        if not isinstance(value, dict):
            raise bad("a mapping")
    return value


def _coerce_option(value: Any, default: Any, key: str, source: str) -> Any:
    """Lenient check of a head/loss option (their constructors validate meaning): None is always
    allowed (Optional options), numbers written as strings become floats where the default is a
    float, and a flag must be true or false."""
    if value is None or default is None or default is inspect.Parameter.empty:
        return value
    if isinstance(default, bool) or isinstance(default, float) and isinstance(value, str):
        return _coerce(value, default, key, source)
    return value


def _options(section: str, name: Any, source: str) -> dict[str, Any]:
    if not isinstance(name, str) or not name:
        raise InputError(f"{source}: '{section}.name' is missing (pass --{section} NAME or set it)"
                         if section == "head" else f"{source}: '{section}.name' is missing")
    if section == "head":
        return head_options(name)
    from heads.losses import loss_options
    return loss_options(name)


def _check_choice(config: dict[str, Any], section: str, key: str, choices: tuple[str, ...],
                  source: str) -> None:
    if config[section][key] not in choices:
        raise InputError(f"{source}: '{section}.{key}' must be one of {', '.join(choices)}, got "
                         f"{config[section][key]!r}")


def validate(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Fill defaults, check types and choices, check head/loss options against their registries."""
    _check_keys(config, source)
    out = _merge(DEFAULTS, config)
    for section, defaults in DEFAULTS.items():
        if section in OPEN_SECTIONS:
            continue
        for key, default in defaults.items():
            out[section][key] = _coerce(out[section][key], default, f"{section}.{key}", source)
    for prefix, mult in (out["optim"]["lr_mult"] or {}).items():
        out["optim"]["lr_mult"][prefix] = _coerce(mult, 1.0, f"optim.lr_mult.{prefix}", source)
    for prefix, target in (out["init"]["rename"] or {}).items():
        _coerce(target, "", f"init.rename.{prefix}", source)
    for section in OPEN_SECTIONS:
        known = _options(section, out[section].get("name"), source)
        for key, value in out[section].items():
            if key == "name":
                continue
            if key not in known:
                raise InputError(f"{source}: {section} {out[section]['name']!r} has no option "
                                 f"'{section}.{key}'; it accepts: {', '.join(sorted(known)) or 'none'}")
            out[section][key] = _coerce_option(value, known[key], f"{section}.{key}", source)
    _check_choice(out, "data", "preload", PRELOAD_CHOICES, source)
    _check_choice(out, "eval", "protocol", tuple(PROTOCOLS), source)
    _check_choice(out, "optim", "name", OPTIMIZERS, source)
    _check_choice(out, "run", "ddp_gather", GATHER_MODES, source)
    _check_choice(out, "data", "epoch_over", EPOCH_OVER, source)
    for side in MODALITIES:
        named = out["data"][f"{side}_backbone"] or {}
        unknown = sorted(set(named) - set(BACKBONE_KEYS))
        if unknown:
            raise InputError(f"{source}: 'data.{side}_backbone' has unknown keys {unknown}; "
                             f"known: {', '.join(BACKBONE_KEYS)}")
    scale = out["data"]["crop_scale"]
    if (len(scale) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                   for v in scale) or not 0 < scale[0] <= scale[1] <= 1):
        raise InputError(f"{source}: 'data.crop_scale' must be [low, high] with "
                         f"0 < low <= high <= 1, got {scale!r}")
    if not 0.0 <= out["data"]["text_augment"] < 1.0:
        raise InputError(f"{source}: 'data.text_augment' must be in [0, 1), got "
                         f"{out['data']['text_augment']}")
    if not 0.0 < out["optim"]["layer_decay"] <= 1.0:
        raise InputError(f"{source}: 'optim.layer_decay' must be in (0, 1], got "
                         f"{out['optim']['layer_decay']}")
    for side in MODALITIES:
        _check_choice(out, "data", f"{side}_source", tuple(list_sources()), source)
        if source_class(out["data"][f"{side}_source"]).tuned:
            out["optim"]["lr_mult"] = out["optim"]["lr_mult"] or {}
            out["optim"]["lr_mult"].setdefault(f"{side}_source", TAIL_LR_MULT)
    for key in ("image_token_drop", "text_token_drop"):
        if not 0.0 <= out["data"][key] < 1.0:
            raise InputError(f"{source}: 'data.{key}' must be in [0, 1), got {out['data'][key]}")
    for section, key, least in (("optim", "epochs", 1), ("optim", "batch_size", 1),
                                ("optim", "warmup_steps", 0), ("run", "log_every", 1),
                                ("optim", "backbone_frozen_epochs", 0),
                                ("run", "threads", 0), ("data", "num_workers", 0)):
        if out[section][key] < least:
            raise InputError(f"{source}: '{section}.{key}' must be at least {least}")
    dev_images = out["eval"]["dev_images"]
    if dev_images is not None:
        if not isinstance(dev_images, int) or isinstance(dev_images, bool) or dev_images < 1:
            raise InputError(f"{source}: 'eval.dev_images' must be a positive number of images or "
                             f"null, got {dev_images!r}")
        if out["eval"]["protocol"] != "full":
            raise InputError(f"{source}: 'eval.dev_images' needs eval.protocol 'full', got "
                             f"{out['eval']['protocol']!r}")
    if not all(isinstance(m, int) and not isinstance(m, bool) for m in out["optim"]["milestones"]):
        raise InputError(f"{source}: 'optim.milestones' must be a list of epochs (integers)")
    for key in MODALITIES:
        if not out["data"][key]:
            raise InputError(f"{source}: 'data.{key}' (the {key} cache tag) is not set")
    return out


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                head: str | None = None, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Resolve a run config: ``base`` (e.g. a checkpoint's config) or the defaults, the file with
    its ``base:`` chain, ``--head`` and the ``--set`` overrides; validated, defaults filled in."""
    source = str(path) if path is not None else "config"
    config = copy.deepcopy(base) if base is not None else {}
    if path is not None:
        config = _merge(config, load_file(path))
    if head is not None:
        if config.get("head", {}).get("name") not in (None, head):
            # options of another head do not carry over
            config["head"] = {"name": head}
        config.setdefault("head", {})["name"] = head
    config = apply_overrides(config, overrides, source)
    return validate(config, source)


REFERENCE_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "base" / "reference.yaml"
"""The recipe a run without a config file starts from (the references' shared defaults)."""


def config_without_file(head: str, features: str | Path, dataset: str,
                        overrides: Iterable[str] = ()) -> dict[str, Any]:
    """``cli train-head --head NAME --features DIR --dataset NAME``: the reference recipe, the
    head's own defaults, and the caches under ``DIR/NAME/<train split>``. A cache tag that
    ``--set data.image=`` / ``data.text=`` does not give is the only one of its modality there."""
    defaults = {k: v for k, v in head_options(head).items()
                if v is None or isinstance(v, (bool, int, float, str))}
    config = _merge(load_file(REFERENCE_RECIPE), {"head": {"name": head, **defaults},
                                                  "data": {"features": str(features),
                                                           "dataset": dataset}})
    config = apply_overrides(config, overrides, "--head")
    data = config["data"]
    folder = Path(data["features"]) / data["dataset"] / data.get("train_split", "train")
    for modality in MODALITIES:
        if data.get(modality):
            continue
        tags = sorted(f.name[len(modality) + 1:-len(".h5")] for f in folder.glob(f"{modality}-*.h5")
                      if ".shard-" not in f.name)
        if len(tags) != 1:
            found = f"found {', '.join(tags)}" if tags else "found none"
            raise InputError(f"{folder}: expected one complete {modality} cache "
                             f"({modality}-<tag>.h5), {found}; choose with --set "
                             f"data.{modality}=TAG")
        data[modality] = tags[0]
    return validate(config, f"--head {head}")


def save_config(config: dict[str, Any], path: str | Path) -> None:
    """Write a resolved config as YAML (readable back with ``load_config``)."""
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))


def cache_paths(config: dict[str, Any], split: str) -> tuple[Path, Path]:
    """(image cache, text cache) paths of a split under the config's feature tree."""
    d = config["data"]
    return (default_cache_path(d["features"], d["dataset"], split, "image", d["image"]),
            default_cache_path(d["features"], d["dataset"], split, "text", d["text"]))


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 5e-4, ...}``: dotted keys of a nested config (for diffs)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
