"""``cli demo-data``: layout, determinism, and captions that truly describe the rendered scenes."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from extract.datasets import load_split
from extract.demo_data import (COLOURS, SHAPES, Item, _relation, generate_demo_data,
                               render_example, split_sizes)
from tests.extract.cli_helpers import run_cli


def test_layout_matches_the_flickr30k_files(tmp_path):
    sizes = generate_demo_data(tmp_path, num_images=24, side=64, seed=1)
    assert sizes == {"train": 20, "dev": 2, "test": 2}
    mapping = json.loads((tmp_path / "id_mapping.json").read_text())
    assert len(mapping) == 24 and len(list((tmp_path / "images").iterdir())) == 24
    first = 0
    for split, count in sizes.items():
        index = load_split("f30k", tmp_path, split, tmp_path / "images")  # checks every image exists
        assert index.num_images == count and index.num_captions == 5 * count
        assert index.image_ids == [str(i) for i in range(first, first + count)]
        assert len(set(index.captions)) == 5 * count  # five different wordings per image
        first += count
    with Image.open(tmp_path / "images" / mapping["0"]) as image:
        assert image.format == "JPEG" and image.size == (64, 64) and image.mode == "RGB"


def test_same_seed_same_bytes_other_seed_other_scenes(tmp_path):
    generate_demo_data(tmp_path / "a", num_images=12, side=48, seed=5)
    generate_demo_data(tmp_path / "b", num_images=12, side=48, seed=5)
    generate_demo_data(tmp_path / "c", num_images=12, side=48, seed=6)
    for path in sorted((tmp_path / "a").rglob("*.*")):
        twin = tmp_path / "b" / path.relative_to(tmp_path / "a")
        assert path.read_bytes() == twin.read_bytes(), path.name
    assert (tmp_path / "a" / "train_caps.txt").read_text() != (tmp_path / "c" / "train_caps.txt").read_text()


def test_every_caption_names_every_shape_and_the_pixels_agree():
    side = 96
    counts = set()
    for index in range(60):
        image, captions, scene = render_example(index, side=side, seed=0)
        pixels = np.asarray(image, dtype=np.int32)
        counts.add(len(scene.items))
        assert len(captions) == 5
        for item in scene.items:
            for caption in captions:
                assert f"{item.colour} {item.shape}" in caption, (caption, item)
            centre = pixels[int(item.y), int(item.x)]
            assert np.abs(centre - COLOURS[item.colour]).max() < 40, (index, item, centre)
        if len(scene.items) > 1:
            number = {2: "two", 3: "three"}[len(scene.items)]
            assert sum(c.startswith(number) for c in captions) == 2
    assert counts == {1, 2, 3}


def test_relations_follow_the_dominant_axis():
    a = Item("red", "circle", "small", 10, 50)
    assert _relation(a, Item("red", "star", "small", 60, 55)) == "to the left of"
    assert _relation(a, Item("red", "star", "small", -40, 45)) == "to the right of"
    assert _relation(a, Item("red", "star", "small", 15, 90)) == "above"
    assert _relation(a, Item("red", "star", "small", 15, 0)) == "below"
    assert set(SHAPES) >= {"circle", "square", "triangle", "star"}


def test_cli_demo_data_and_too_few_images(tmp_path):
    code, output = run_cli("demo-data", tmp_path / "d", "--count", 13, "--size", 40)
    assert code == 0 and "train 11 images, dev 1 images, test 1 images" in output
    assert (tmp_path / "d" / "test_ids.txt").read_text().splitlines() == ["12"] * 5
    code, message = run_cli("demo-data", tmp_path / "e", "--count", 2)
    assert code == 2 and "2 images are too few" in message
    with pytest.raises(Exception, match="too few"):
        split_sizes(1)
