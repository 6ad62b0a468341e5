"""Caption layouts, image decoding and the one-line errors for every kind of bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backbones.transforms import HALF_MEAN, HALF_STD, ImageTransform
from cache.errors import InputError
from extract.datasets import ImageDataset, ImageDecodeError, list_datasets, load_rgb, load_split

TRANSFORM = ImageTransform((32, 32), "bicubic", HALF_MEAN, HALF_STD)


def _jpeg_bytes(seed: int = 0, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_split(
    root: Path,
    captions: list[str],
    ids: list[str],
    mapping: dict[str, str] | None,
    split: str = "test",
    images: dict[str, bytes] | None = None,
) -> tuple[Path, Path]:
    """Write a split in the seed repos' layout; returns (data_path, images_root)."""
    data, images_root = root / "data", root / "images"
    data.mkdir(exist_ok=True)
    images_root.mkdir(exist_ok=True)
    (data / f"{split}_caps.txt").write_text("\n".join(captions) + "\n")
    (data / f"{split}_ids.txt").write_text("\n".join(ids) + "\n")
    if mapping is not None:
        (data / "id_mapping.json").write_text(json.dumps(mapping))
    for name, content in (images or {}).items():
        (images_root / name).write_bytes(content)
    return data, images_root


def _captions(num_images: int) -> list[str]:
    return [f"image {image} caption {k}" for image in range(num_images) for k in range(5)]


@pytest.fixture
def three_images(tmp_path) -> dict:
    ids = ["10", "20", "30"]
    return {
        "captions": _captions(3),
        "ids": ids,
        "mapping": {image_id: f"img_{image_id}.jpg" for image_id in ids},
        "images": {f"img_{image_id}.jpg": _jpeg_bytes(int(image_id)) for image_id in ids},
    }


# ------------------------------------------------------------------------------------ layouts


def test_ids_one_per_caption(tmp_path, three_images):
    per_caption = [image_id for image_id in three_images["ids"] for _ in range(5)]
    data, images = _write_split(
        tmp_path, three_images["captions"], per_caption, three_images["mapping"], images=three_images["images"]
    )
    split = load_split("f30k", data, "test", images)
    assert split.image_ids == ["10", "20", "30"]
    assert split.image_paths == ["img_10.jpg", "img_20.jpg", "img_30.jpg"]
    assert split.caption_image_index.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert split.captions[6] == "image 1 caption 1"
    assert split.image_file(2) == images / "img_30.jpg"


def test_ids_one_per_image_as_in_public_train_files(tmp_path, three_images):
    data, images = _write_split(
        tmp_path,
        three_images["captions"],
        three_images["ids"],
        three_images["mapping"],
        split="train",
        images=three_images["images"],
    )
    split = load_split("coco", data, "train", images)
    assert split.image_ids == ["10", "20", "30"]
    np.testing.assert_array_equal(split.caption_image_index, np.arange(15) // 5)


def test_images_in_first_appearance_order_with_uneven_caption_counts(tmp_path):
    ids = ["7"] * 6 + ["3"] * 4 + ["7"]
    captions = [f"caption {k}" for k in range(len(ids))]
    data, _ = _write_split(tmp_path, captions, ids, None)
    split = load_split("f30k", data, "test")
    assert split.image_ids == ["7", "3"]
    assert split.caption_image_index.tolist() == [0] * 6 + [1] * 4 + [0]
    assert split.image_paths is None


def test_windows_line_endings_and_unicode_separators(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    captions = [f"a caf\u00e9 {k}\u2028with a line separator" for k in range(5)]
    (data / "test_caps.txt").write_bytes("\r\n".join(captions).encode())  # no final newline
    (data / "test_ids.txt").write_bytes(b"1\r\n")
    split = load_split("f8k", data, "test")
    assert split.captions == captions and split.num_images == 1


def test_list_datasets():
    assert set(list_datasets()) == {"f30k", "coco", "f8k"}


# ---------------------------------------------------------------------------------- real files


def test_real_flickr8k_test_split(shared_data):
    split = load_split("f8k", shared_data / "f8k", "test", shared_data / "flickr8k-images")
    assert (split.num_images, split.num_captions) == (1000, 5000)
    assert len(set(split.image_ids)) == 1000
    np.testing.assert_array_equal(split.caption_image_index, np.arange(5000) // 5)
    dataset = ImageDataset(split, TRANSFORM)
    row, pixels = dataset[3]
    assert row == 3 and pixels.shape == (3, 32, 32)


def test_real_karpathy_caption_files(shared_data):
    karpathy = shared_data / "karpathy-captions"
    if not karpathy.is_dir():
        pytest.skip(f"../shared/data not found: {karpathy}")
    f30k = load_split("f30k", karpathy / "f30k", "dev")
    assert (f30k.num_images, f30k.num_captions) == (1014, 5070)
    assert f30k.image_paths is not None and f30k.image_paths[0].endswith(".jpg")
    coco = load_split("coco", karpathy / "coco", "testall")
    assert (coco.num_images, coco.num_captions, coco.image_paths) == (5000, 25000, None)
    with pytest.raises(InputError, match="image paths unknown"):
        coco.image_file(0)


# ----------------------------------------------------------------------------------- bad input


def test_unknown_dataset():
    with pytest.raises(InputError, match="unknown dataset 'flickr'.*f30k, coco, f8k"):
        load_split("flickr", ".", "test")


def test_counts_that_disagree(tmp_path):
    data, _ = _write_split(tmp_path, _captions(2), ["1"] * 7, None)
    with pytest.raises(InputError, match=r"test_ids.txt: 7 ids for the 10 captions of .*test_caps.txt"):
        load_split("f30k", data, "test")


def test_id_missing_from_mapping_names_ids_file_and_line(tmp_path):
    ids = ["1"] * 5 + ["2"] * 5 + ["3"] * 5
    data, _ = _write_split(tmp_path, _captions(3), ids, {"1": "a.jpg", "3": "c.jpg"})
    with pytest.raises(InputError, match=r"test_ids.txt:6: id '2' is not in .*id_mapping.json"):
        load_split("f30k", data, "test")


def test_missing_caption_or_id_file_lists_the_splits(tmp_path):
    data, _ = _write_split(tmp_path, _captions(1), ["1"], None, split="dev")
    with pytest.raises(InputError, match=r"test_caps.txt: file not found \(splits in .*: dev\)"):
        load_split("f30k", data, "test")
    (data / "dev_ids.txt").unlink()
    with pytest.raises(InputError, match=r"dev_ids.txt: file not found"):
        load_split("f30k", data, "dev")


def test_empty_caption_line(tmp_path):
    captions = _captions(1)
    captions[3] = "   "
    data, _ = _write_split(tmp_path, captions, ["1"], None)
    with pytest.raises(InputError, match=r"test_caps.txt:4: empty caption"):
        load_split("f30k", data, "test")


def test_invalid_utf8_names_the_line(tmp_path):
    data, _ = _write_split(tmp_path, _captions(1), ["1"], None)
    (data / "test_caps.txt").write_bytes(b"one\ntwo\nbad \xff byte\nfour\nfive\n")
    with pytest.raises(InputError, match=r"test_caps.txt:3: not valid UTF-8"):
        load_split("f30k", data, "test")


def test_broken_mapping_json(tmp_path):
    data, images = _write_split(tmp_path, _captions(1), ["1"], None)
    (data / "id_mapping.json").write_text("{not json")
    with pytest.raises(InputError, match=r"id_mapping.json: cannot read JSON"):
        load_split("f30k", data, "test", images)


def test_images_root_without_mapping(tmp_path):
    data, images = _write_split(tmp_path, _captions(1), ["1"], None)
    with pytest.raises(InputError, match=r"id_mapping.json: file not found"):
        load_split("f30k", data, "test", images)


def test_missing_image_is_found_before_any_decoding(tmp_path, three_images):
    del three_images["images"]["img_20.jpg"]
    data, images = _write_split(
        tmp_path, three_images["captions"], three_images["ids"], three_images["mapping"], images=three_images["images"]
    )
    with pytest.raises(InputError, match=r"img_20.jpg: image file not found \(row 1, id 20\)"):
        load_split("f30k", data, "test", images)


# ---------------------------------------------------------------------------------- decoding


def _dataset(tmp_path, images: dict[str, bytes]) -> ImageDataset:
    names = list(images)
    ids = [str(k) for k in range(len(names))]
    data, root = _write_split(tmp_path, _captions(len(names)), ids, dict(zip(ids, names)), images=images)
    return ImageDataset(load_split("f8k", data, "test", root), TRANSFORM)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_every_colour_mode_decodes_to_rgb(tmp_path):
    gradient = np.linspace(0, 255, 40 * 40).reshape(40, 40).astype(np.uint8)
    palette = Image.fromarray(gradient).convert("P")
    palette.info["transparency"] = 0
    images = {
        "cmyk.jpg": _encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"),
        "gray.png": _encode(Image.fromarray(gradient), "PNG"),
        "gray16.png": _encode(Image.fromarray(gradient.astype(np.uint16) * 257), "PNG"),
        "rgba.png": _encode(Image.new("RGBA", (20, 20), (0, 0, 255, 0)), "PNG"),
        "palette.png": _encode(palette, "PNG"),
        "gray.jpg": _encode(Image.fromarray(gradient), "JPEG"),
    }
    dataset = _dataset(tmp_path, images)
    for row, name in enumerate(images):
        assert load_rgb(dataset.files[row]).mode == "RGB", name
        got_row, pixels = dataset[row]
        assert got_row == row and pixels.shape == (3, 32, 32), name
    red = load_rgb(dataset.files[0]).getpixel((5, 5))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60  # CMYK (0, 255, 255, 0) is red
    assert load_rgb(dataset.files[3]).getpixel((5, 5)) == (255, 255, 255)  # transparent -> white
    bright16 = np.asarray(load_rgb(dataset.files[2]))
    np.testing.assert_allclose(bright16[..., 0], gradient, atol=1)  # 16-bit scaled, not clipped


def test_truncated_jpeg_names_the_file_and_row(tmp_path):
    whole = _jpeg_bytes(3, 64)
    dataset = _dataset(tmp_path, {"fine.jpg": whole, "truncated.jpg": whole[: len(whole) // 2]})
    assert dataset[0][1].shape == (3, 32, 32)
    with pytest.raises(ImageDecodeError, match=r"truncated.jpg: cannot decode image: .*\(row 1\)"):
        dataset[1]


def test_corrupt_file_names_the_file(tmp_path):
    dataset = _dataset(tmp_path, {"noise.jpg": b"this is not an image at all"})
    with pytest.raises(ImageDecodeError, match=r"noise.jpg: cannot decode image"):
        dataset[0]


def test_decode_error_crosses_dataloader_workers_as_one_line(tmp_path):
    whole = _jpeg_bytes(4, 64)
    dataset = _dataset(tmp_path, {"ok.jpg": whole, "half.jpg": whole[: len(whole) // 2]})
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1)
    with pytest.raises(ImageDecodeError) as caught:
        next(iter(loader))
    message = str(caught.value)
    assert "half.jpg: cannot decode image" in message and "(row 1)" in message
    assert "\n" not in message


def test_image_deleted_after_the_check(tmp_path):
    dataset = _dataset(tmp_path, {"gone.jpg": _jpeg_bytes()})
    Path(dataset.files[0]).unlink()
    with pytest.raises(ImageDecodeError, match=r"gone.jpg: image file not found \(row 0\)"):
        dataset[0]


def test_exif_orientation_turns_a_phone_photo_upright(tmp_path):
    path = tmp_path / "portrait.jpg"
    image = Image.new("RGB", (40, 24), (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, 8, 24))          # a blue band on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6                                    # Orientation: rotate 90 CW to view
    image.save(path, exif=exif.tobytes(), quality=95)
    upright = load_rgb(path)
    assert upright.size == (24, 40)                     # width and height swapped
    assert upright.getpixel((12, 2))[2] > 150           # the left band is now on top
    assert load_rgb(path).getexif().get(0x0112) in (None, 1)
