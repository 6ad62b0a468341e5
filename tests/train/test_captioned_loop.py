"""The whole loop on your own captioned photos (a CSV with one to five captions per photo, split
by the path hash): ``cli extract --dataset csv``, ``cli train-head`` with cache, tail and e2e
sources, ``cli eval`` (the report states the captions per photo), ``cli export-backbone`` and
``cli index`` / ``cli search`` with the trained run. Tiny random DINOv2 / BERT saved to a temp
folder (`tests.heads.tail_world.save_backbones`)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from cache.store import ImageCache
from extract.demo_data import write_example_csv
from tests.extract.cli_helpers import run_cli
from tests.heads.tail_world import LAYER, save_backbones, train_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAME = "mine"


@dataclass(frozen=True)
class OwnPhotos:
    csv: Path
    photos: Path
    models: dict[str, Path]
    features: Path

    def extract(self, *extra: object) -> tuple[int, str]:
        return run_cli("extract", "--backbone", "dinov2", "--weights", self.models["dinov2"],
                       "--resolution", 32, "--text-encoder", "bert", "--text-weights",
                       self.models["bert"], "--dataset", "csv", "--data-path", self.csv,
                       "--images", self.photos, "--name", NAME, "--max-length", 48, "--out",
                       self.features, "--device", "cpu", "--workers", 0, *extra)

    def overrides(self, image: str, text: str, tags: tuple[str, str]) -> list[str]:
        return [f"data.features={self.features}", f"data.dataset={NAME}",
                f"data.image={tags[0]}", f"data.text={tags[1]}", f"data.image_source={image}",
                f"data.text_source={text}", "data.preload=none", "run.device=cpu",
                "run.tensorboard=false", "head.name=linear", "head.embed_dim=16",
                "loss.name=infonce", "optim.epochs=1", "optim.batch_size=16", "optim.lr=0.01",
                "optim.milestones=[]"]


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> OwnPhotos:
    root = tmp_path_factory.mktemp("own")
    csv = write_example_csv(root / "example", num_images=48, side=32, seed=0)
    words = csv.read_text().replace(",", " ").replace(":", " ").split()
    world = OwnPhotos(csv, root / "example" / "photos", save_backbones(root / "models", words),
                      root / "features")
    for extra in (("--layer", LAYER, "--text-layer", LAYER, "--tag", f"dinov2_l{LAYER}",
                   "--text-tag", f"bert_l{LAYER}"), ()):
        code, output = world.extract(*extra)
        assert code == 0, output
    return world


def evaluated(run: Path) -> dict:
    code, output = run_cli("eval", "--checkpoint", run / "best.pt", "--split", "test",
                           "--device", "cpu")
    assert code == 0, output
    report = json.loads((run / "eval-test.json").read_text())
    counts = report["captions_per_image"]
    assert counts["min"] >= 1 and counts["max"] <= 5 and counts["min"] < counts["max"]
    assert f"{counts['min']}-{counts['max']} captions per photo (mean " in output
    return report


@pytest.mark.parametrize("sources", [("cache", "cache", ""), ("tail", "tail", f"_l{LAYER}"),
                                     ("e2e", "e2e", "")], ids=lambda s: s[0])
def test_train_and_eval_with_every_source(own, tmp_path, sources):
    image, text, suffix = sources
    run = tmp_path / "run"
    code, output = train_cli(run, own.overrides(image, text,
                                                (f"dinov2{suffix}", f"bert{suffix}")))
    assert code == 0, output
    report = evaluated(run)
    assert report["images"] == len(ImageCache(own.features / NAME / "test" / "image-dinov2.h5"))


def test_export_the_tuned_backbone_and_extract_with_it(own, tmp_path):
    run = tmp_path / "run"
    code, output = train_cli(run, own.overrides("e2e", "cache", ("dinov2", "bert")))
    assert code == 0, output
    code, output = run_cli("export-backbone", run / "best.pt", "--side", "image", "--out",
                           tmp_path / "tuned")
    assert code == 0, output
    code, output = run_cli("extract", "--backbone", "dinov2", "--weights", tmp_path / "tuned",
                           "--resolution", 32, "--dataset", "csv", "--data-path", own.csv,
                           "--images", own.photos, "--name", NAME, "--split", "test", "--tag",
                           "dinov2_tuned", "--out", tmp_path / "features", "--device", "cpu",
                           "--workers", 0)
    assert code == 0, output
    assert ImageCache(tmp_path / "features" / NAME / "test" / "image-dinov2_tuned.h5").attrs \
        .weights_note


def test_index_and_search_the_photos_with_the_trained_run(own, tmp_path):
    run = tmp_path / "run"
    code, output = train_cli(run, own.overrides("cache", "cache", ("dinov2", "bert")))
    assert code == 0, output
    code, output = run_cli("index", own.photos, "--checkpoint", run / "best.pt", "--out",
                           tmp_path / "index", "--device", "cpu", "--no-progress")
    assert code == 0, output
    code, output = run_cli("search", tmp_path / "index", "a red circle", "-k", 3, "--html",
                           tmp_path / "page.html", "--device", "cpu")
    assert code == 0, output
    page = (tmp_path / "page.html").read_text()
    assert page.count("scene_000") >= 3


def test_an_e2e_run_reads_the_photos_inside_webdataset_shards(own, tmp_path):
    from extract.formats import DatasetRequest, dataset_format
    from extract.wds import write_shards

    indexes = dataset_format("csv").load("csv", DatasetRequest(
        (str(own.csv),), ["train", "dev", "test"], str(own.photos))).indexes
    data = [part for split, index in indexes.items()
            for part in ("--data-path", f"{split}={write_shards(index, tmp_path / split, 16)}")]
    shards = OwnPhotos(own.csv, own.photos, own.models, tmp_path / "features")
    code, output = run_cli("extract", "--backbone", "dinov2", "--weights", own.models["dinov2"],
                           "--resolution", 32, "--text-encoder", "bert", "--text-weights",
                           own.models["bert"], "--dataset", "wds", *data, "--name", NAME,
                           "--max-length", 48, "--out", shards.features, "--device", "cpu",
                           "--workers", 0)
    assert code == 0, output
    run = tmp_path / "run"
    code, output = train_cli(run, shards.overrides("e2e", "cache", ("dinov2", "bert")))
    assert code == 0, output
    assert ".tar/" in ImageCache(shards.features / NAME / "test" / "image-dinov2.h5").paths[0]
    evaluated(run)


def test_the_karpathy_layout_as_a_csv_gives_the_same_caches_and_numbers(own, tmp_path):
    """Five captions per photo, read from the f30k layout and from a CSV of the same rows: the
    same caches, and ``cli eval`` reads the same recall from either (one code path)."""
    import numpy as np

    from cache.store import open_cache
    from extract.captioned import write_csv
    from extract.datasets import load_split
    from extract.demo_data import generate_demo_data

    data = tmp_path / "demo"
    generate_demo_data(data, num_images=36, side=32, seed=5)
    lines = []
    for split in ("train", "dev", "test"):
        part = write_csv(load_split("f30k", data, split, data / "images"), tmp_path / f"{split}.csv")
        lines += part.read_text(encoding="utf-8").splitlines()[0 if not lines else 1:]
    (tmp_path / "all.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = ["--backbone", "dinov2", "--weights", own.models["dinov2"], "--resolution", 32,
              "--text-encoder", "bert", "--text-weights", own.models["bert"], "--max-length", 48,
              "--out", tmp_path / "features", "--device", "cpu", "--workers", 0]
    for source in (["--dataset", "f30k", "--data-path", data],
                   ["--dataset", "csv", "--data-path", tmp_path / "all.csv", "--name", "as_csv"]):
        code, output = run_cli("extract", *source, "--images", data / "images", *common)
        assert code == 0, output
    for split in ("train", "dev", "test"):
        for name in ("image-dinov2.h5", "text-bert.h5"):
            a = open_cache(tmp_path / "features" / "f30k" / split / name)
            b = open_cache(tmp_path / "features" / "as_csv" / split / name)
            np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
            if name.startswith("text"):
                assert a.captions == b.captions
                np.testing.assert_array_equal(a.image_index, b.image_index)

    run = tmp_path / "run"
    sets = [s.replace(f"data.features={own.features}", f"data.features={tmp_path / 'features'}")
            .replace(f"data.dataset={NAME}", "data.dataset=f30k")
            for s in own.overrides("cache", "cache", ("dinov2", "bert"))]
    code, output = train_cli(run, sets)
    assert code == 0, output
    code, output = run_cli("eval", "--checkpoint", run / "best.pt", "--device", "cpu", "--json",
                           tmp_path / "f30k.json")
    assert code == 0 and "5 captions per photo" in output, output
    csv_test = tmp_path / "features" / "as_csv" / "test"
    code, output = run_cli("eval", "--checkpoint", run / "best.pt", "--device", "cpu",
                           "--image-cache", csv_test / "image-dinov2.h5",
                           "--text-cache", csv_test / "text-bert.h5",
                           "--json", tmp_path / "csv.json")
    assert code == 0, output
    reports = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("f30k", "csv")]
    assert reports[0]["metrics"] == reports[1]["metrics"]
    assert reports[0]["captions_per_image"] == {"min": 5, "max": 5, "mean": 5.0}
