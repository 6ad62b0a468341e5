"""Run configs: base inheritance, typed --set overrides, unknown keys, round trip."""
from __future__ import annotations

from pathlib import Path

import pytest

from cache.errors import InputError
from train.config import (DEFAULTS, TAIL_LR_MULT, apply_overrides, cache_paths, flatten,
                          load_config, longest_prefix, parse_override, save_config)

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture()
def config_file(tmp_path: Path) -> Path:
    _write(tmp_path / "base.yaml", "data:\n  dataset: f8k\n  image: efficientnet_lite0\n"
           "  text: minilm\noptim:\n  lr: 5e-4\n  milestones: [15]\n")
    return _write(tmp_path / "run.yaml", "base: base.yaml\nhead:\n  name: linear\n  embed_dim: 256\n"
                  "optim:\n  epochs: 3\n")


def test_base_chain_defaults_and_typed_overrides(config_file: Path) -> None:
    cfg = load_config(config_file, ["optim.lr=1e-3", "optim.milestones=[1, 2]",
                                    "data.preload=ram", "head.use_prefix=false",
                                    "optim.lr_mult.image_fc=0.1",
                                    "init.rename.image_fc=vision_proj"])
    assert cfg["optim"]["lr"] == 1e-3 and isinstance(cfg["optim"]["lr"], float)  # "1e-3" is a str in YAML
    assert cfg["optim"]["milestones"] == [1, 2] and cfg["optim"]["epochs"] == 3
    assert cfg["head"] == {"name": "linear", "embed_dim": 256, "use_prefix": False}
    assert cfg["data"]["image"] == "efficientnet_lite0"              # from the base file
    assert cfg["optim"]["gamma"] == DEFAULTS["optim"]["gamma"]       # from the schema
    assert cfg["optim"]["lr_mult"] == {"image_fc": 0.1}
    assert cfg["init"] == {"checkpoint": None, "rename": {"image_fc": "vision_proj"}}
    image, text = cache_paths(cfg, "dev")
    assert image == Path("features/f8k/dev/image-efficientnet_lite0.h5")
    assert text == Path("features/f8k/dev/text-minilm.h5")
    assert load_config(config_file)["optim"]["lr"] == 5e-4


def test_longest_prefix_names_a_parameter_or_its_parents() -> None:
    prefixes = ["image", "image.fc", "text_fc."]
    assert longest_prefix("image.fc.weight", prefixes) == "image.fc"
    assert longest_prefix("image.norm.bias", prefixes) == "image"
    assert longest_prefix("text_fc.bias", prefixes) == "text_fc."
    assert longest_prefix("images.weight", prefixes) is None    # a name prefix, not a parent


def test_head_flag_replaces_the_head(config_file: Path) -> None:
    assert load_config(config_file, head="linear")["head"]["embed_dim"] == 256
    cfg = load_config(config_file, head="vse")     # the linear options do not carry over
    assert cfg["head"] == {"name": "vse"}


@pytest.mark.parametrize("override, needle", [
    ("optim.lrr=0.1", "optim.lrr"),
    ("trainer.epochs=3", "trainer"),
    ("head.no_such_option=1", "head.no_such_option"),
    ("loss.margin_typo=0.1", "loss.margin_typo"),
    ("optim.epochs=ten", "optim.epochs"),
    ("optim.lr=fast", "optim.lr"),
    ("data.preload=gpu", "data.preload"),
    ("run.amp=1", "run.amp"),
    ("optim.lr.x=1", "optim.lr"),
    ("run.threads=-1", "run.threads"),
    ("eval.dev_images=0", "eval.dev_images"),
    ("eval.dev_images=half", "eval.dev_images"),
    ("init.rename.image_fc=3", "init.rename.image_fc"),
    ("init.rename=[image_fc]", "init.rename"),
])
def test_bad_overrides_name_the_key_and_the_file(config_file: Path, override: str,
                                                 needle: str) -> None:
    with pytest.raises(InputError) as err:
        load_config(config_file, [override])
    assert needle in str(err.value) and str(config_file) in str(err.value)


def test_unknown_key_in_a_file_names_that_file(config_file: Path, tmp_path: Path) -> None:
    _write(tmp_path / "base.yaml", "data:\n  image: x\n  text: y\n  token_dorp: 0.1\n")
    with pytest.raises(InputError, match=r"base\.yaml.*data\.token_dorp"):
        load_config(config_file)
    _write(tmp_path / "base.yaml", "base: run.yaml\n")
    with pytest.raises(InputError, match="circular"):
        load_config(config_file)
    with pytest.raises(InputError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    _write(tmp_path / "bad.yaml", "data: [1, 2\n")
    with pytest.raises(InputError, match="bad.yaml"):
        load_config(tmp_path / "bad.yaml")


def test_missing_essentials_are_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="head.name"):
        load_config(_write(tmp_path / "a.yaml", "data:\n  image: x\n  text: y\n"))
    with pytest.raises(InputError, match="data.image"):
        load_config(_write(tmp_path / "b.yaml", "head:\n  name: linear\n"))


def test_parse_override() -> None:
    assert parse_override("optim.milestones=[3, 5]") == (["optim", "milestones"], [3, 5])
    assert parse_override("data.image=dinov2_s14") == (["data", "image"], "dinov2_s14")
    assert parse_override("loss.hardest_after_epochs=null") == (["loss", "hardest_after_epochs"], None)
    for bad in ("optim.lr", "lr=1", "optim..lr=1"):
        with pytest.raises(InputError):
            parse_override(bad)
    assert apply_overrides({}, ["optim.lr_mult.text_fc=0.1"]) == {"optim": {"lr_mult": {"text_fc": 0.1}}}


def test_dev_images_needs_the_full_protocol(config_file: Path) -> None:
    with pytest.raises(InputError, match=r"'eval.dev_images' needs eval.protocol 'full', got "
                                         r"'coco1k'") as err:
        load_config(config_file, ["eval.dev_images=500", "eval.protocol=coco1k"])
    assert str(config_file) in str(err.value)


def test_resolved_config_round_trips(config_file: Path, tmp_path: Path) -> None:
    cfg = load_config(config_file, ["loss.name=infonce", "loss.temperature=0.05"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert flatten(cfg)["loss.temperature"] == 0.05


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_resolve(path: Path) -> None:
    cfg = load_config(path)
    assert cfg["head"]["name"] and cfg["data"]["image"] and cfg["data"]["text"]
    assert cfg["data"]["dev_split"] != cfg["data"]["test_split"]


def test_token_sources_default_to_the_cache_and_a_tail_to_lr_x01(config_file: Path) -> None:
    cfg = load_config(config_file)
    assert (cfg["data"]["image_source"], cfg["data"]["text_source"]) == ("cache", "cache")
    assert cfg["optim"]["lr_mult"] == {}                        # cache runs: as before
    cfg = load_config(config_file, ["data.text_source=tail", "optim.lr_mult.image_fc=2"])
    assert cfg["optim"]["lr_mult"] == {"image_fc": 2.0, "text_source": TAIL_LR_MULT}
    assert TAIL_LR_MULT == 0.1
    cfg = load_config(config_file, ["data.image_source=tail", "data.text_source=tail",
                                    "optim.lr_mult.text_source=0.3"])
    assert cfg["optim"]["lr_mult"] == {"text_source": 0.3, "image_source": 0.1}
    cfg = load_config(config_file, ["data.image_source=e2e"])
    assert cfg["optim"]["lr_mult"] == {"image_source": TAIL_LR_MULT}
    with pytest.raises(InputError, match=r"'data.image_source' must be one of cache, tail, e2e, "
                                         r"got 'full'"):
        load_config(config_file, ["data.image_source=full"])


@pytest.mark.parametrize(("override", "message"), [
    ("data.crop_scale=[0.6]", r"'data.crop_scale' must be \[low, high\]"),
    ("data.crop_scale=[0.9, 0.6]", r"'data.crop_scale' must be \[low, high\]"),
    ("data.text_augment=1.0", r"'data.text_augment' must be in \[0, 1\)"),
    ("optim.layer_decay=0", r"'optim.layer_decay' must be in \(0, 1\]"),
    ("optim.backbone_frozen_epochs=-1", r"'optim.backbone_frozen_epochs' must be at least 0"),
    ("data.epoch_over=steps", r"'data.epoch_over' must be one of auto, captions, images"),
    ("data.image_backbone.depth=3", r"'data.image_backbone' has unknown keys \['depth'\]"),
    ("run.grad_checkpointing=1", r"'run.grad_checkpointing' must be true or false"),
])
def test_recipe_keys_are_checked(config_file: Path, override: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_config(config_file, [override])


def test_recipe_keys_default_to_the_plain_recipe(config_file: Path) -> None:
    cfg = load_config(config_file, ["data.image_backbone.layer=3"])
    assert cfg["data"]["crop_scale"] == [0.6, 1.0] and cfg["data"]["text_augment"] == 0.2
    assert cfg["optim"]["layer_decay"] == 1.0 and cfg["optim"]["backbone_frozen_epochs"] == 0
    assert cfg["data"]["epoch_over"] == "auto" and cfg["run"]["grad_checkpointing"] is False
    assert cfg["data"]["image_backbone"] == {"layer": 3}


def test_a_file_naming_another_loss_or_head_replaces_that_section(tmp_path: Path) -> None:
    _write(tmp_path / "hinge.yaml", "data:\n  dataset: f8k\n  image: a\n  text: b\n"
           "head:\n  name: tgdt\n  embed_dim: 64\nloss:\n  name: hinge\n  margin: 0.3\n")
    same = load_config(_write(tmp_path / "same.yaml", "base: hinge.yaml\nloss:\n  margin: 0.1\n"
                              "head:\n  ff_dim: 32\n"))
    assert same["loss"] == {"name": "hinge", "margin": 0.1}
    assert same["head"] == {"name": "tgdt", "embed_dim": 64, "ff_dim": 32}
    other = load_config(_write(tmp_path / "infonce.yaml", "base: hinge.yaml\nloss:\n"
                               "  name: infonce\n  temperature: 0.05\nhead:\n  name: linear\n"))
    assert other["loss"] == {"name": "infonce", "temperature": 0.05}
    assert other["head"] == {"name": "linear"}
