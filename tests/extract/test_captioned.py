"""Your own captioned photos as CSV / TSV / JSONL / imagefolder: reading, grouping by photo, the
split column or the stable hash split, ``cli extract`` into a folder named after the file, and a
one-line exit-2 error for every kind of bad input (before any forward pass)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cache.errors import InputError
from cache.store import ImageCache, TextCache
from extract.captioned import TableOptions, assign_split, parse_ratio
from extract.demo_data import write_example_csv
from extract.formats import DatasetRequest, dataset_format
from tests.extract.cli_helpers import run_cli, save_tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPLITS = ["train", "dev", "test"]


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    """40 rendered 32-px scenes in photos/ and captions.csv (filepath, title; 1-5 captions each)."""
    root = tmp_path_factory.mktemp("example")
    write_example_csv(root, num_images=40, side=32, seed=0)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, example) -> dict[str, Path]:
    words = (example / "captions.csv").read_text().replace(",", " ").replace(":", " ").split()
    return save_tiny_models(tmp_path_factory.mktemp("tiny"), words)


def rows_of(example: Path) -> list[list[str]]:
    with (example / "captions.csv").open(encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def write_rows(path: Path, rows: list[list[str]], delimiter: str = ",") -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


def load(fmt: str, data: Path, images: Path | None = None, splits: list[str] = SPLITS,
         need_photos: bool = True, **table: object):
    request = DatasetRequest((str(data),), splits, None if images is None else str(images),
                             need_photos, table=TableOptions(**table))
    return dataset_format(fmt).load(fmt, request)


def csv_args(data: Path, images: Path, out: Path, tiny: dict[str, Path],
             *extra: object) -> list[object]:
    return ["extract", "--backbone", "dinov2", "--weights", tiny["dinov2"], "--resolution", 32,
            "--text-encoder", "bert", "--text-weights", tiny["bert"], "--dataset", "csv",
            "--data-path", data, "--images", images, "--out", out, "--device", "cpu",
            "--workers", 0, *extra]


# ------------------------------------------------------------------------------------------ reading


def test_rows_are_grouped_by_photo_with_one_to_five_captions(example):
    loaded = load("csv", example / "captions.csv", example / "photos")
    rows = rows_of(example)[1:]
    assert sum(i.num_captions for i in loaded.indexes.values()) == len(rows)
    assert sum(i.num_images for i in loaded.indexes.values()) == 40
    for index in loaded.indexes.values():
        counts = np.bincount(index.caption_image_index)
        for photo, count in zip(index.image_ids, counts):
            number = int(photo[len("scene_"):-len(".jpg")])
            assert count == 1 + number % 5
            assert [c for p, c in rows if p == photo] == [
                index.captions[i] for i in np.flatnonzero(index.caption_image_index
                                                          == index.image_ids.index(photo))]
        assert index.images_root == example / "photos" and index.image_paths == index.image_ids
    assert [i.num_images for i in loaded.indexes.values()] == [31, 5, 4]


def test_the_hash_split_keeps_old_photos_where_they_were(example, tmp_path):
    rows = rows_of(example)
    before = load("csv", example / "captions.csv", example / "photos").indexes
    shutil.copy(example / "photos" / "scene_00000.jpg", example / "photos" / "zz_new.jpg")
    try:
        grown = [rows[0], ["zz_new.jpg", "a new photo"]] + rows[:0:-1]   # new row, reversed order
        after = load("csv", write_rows(tmp_path / "grown.csv", grown), example / "photos").indexes
    finally:
        (example / "photos" / "zz_new.jpg").unlink()
    for split in SPLITS:
        assert set(before[split].image_ids) <= set(after[split].image_ids)
    other = load("csv", example / "captions.csv", example / "photos", seed=1).indexes
    assert any(set(other[s].image_ids) != set(before[s].image_ids) for s in SPLITS)
    assert assign_split("a.jpg", (1.0, 0.0, 0.0), 0) == "train"
    assert assign_split("a.jpg", (0.0, 0.0, 1.0), 0) == "test"
    assert parse_ratio("8,1,1") == pytest.approx((0.8, 0.1, 0.1))


def test_a_split_column_decides_and_val_means_dev(example, tmp_path):
    rows = rows_of(example)
    labelled = [rows[0] + ["split"]] + [
        row + [("train", "validation", "test")[int(row[0][6:11]) % 3]] for row in rows[1:]]
    indexes = load("csv", write_rows(tmp_path / "s.csv", labelled), example / "photos").indexes
    assert [len(indexes[s].image_ids) for s in SPLITS] == [14, 13, 13]
    assert all(int(p[6:11]) % 3 == 1 for p in indexes["dev"].image_ids)


def test_tsv_jsonl_keys_lists_and_absolute_paths(example, tmp_path):
    rows = rows_of(example)[1:]
    photos = example / "photos"
    tsv = write_rows(tmp_path / "pairs.tsv", [["pic", "words"]] + rows, delimiter="\t")
    one_split = dict(splits=["train"], split_ratio=(1.0, 0.0, 0.0))  # the split hash of an
    # absolute path moves with the temporary folder: a small split could come out empty
    by_tsv = load("tsv", tsv, photos, image_key="pic", caption_key="words", **one_split).indexes
    grouped: dict[str, list[str]] = {}
    for photo, caption in rows:
        grouped.setdefault(photo, []).append(caption)
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"file_name": str(photos / p), "text": c}) + "\n"
                             for p, c in grouped.items()), encoding="utf-8")
    by_jsonl = load("jsonl", jsonl, tmp_path, **one_split).indexes  # absolute: --images unused

    def captions_of(indexes) -> dict[str, list[str]]:
        return {Path(index.image_file(int(row))).name: [
            c for c, r in zip(index.captions, index.caption_image_index) if r == row]
            for index in indexes.values() for row in range(index.num_images)}

    assert captions_of(by_tsv) == captions_of(by_jsonl) == grouped
    assert all(Path(p).is_absolute() for i in by_jsonl.values() for p in i.image_paths)


def test_imagefolder_metadata_beside_the_photos_or_per_split(example, tmp_path):
    rows = rows_of(example)[1:]
    flat = Path(shutil.copytree(example / "photos", tmp_path / "flat"))
    grouped: dict[str, list[str]] = {}
    for photo, caption in rows:
        grouped.setdefault(photo, []).append(caption)
    (flat / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": p, "text": c if len(c) > 1 else c[0]}) + "\n"
        for p, c in grouped.items()), encoding="utf-8")
    flat_loaded = load("imagefolder", flat).indexes
    assert sum(i.num_captions for i in flat_loaded.values()) == len(rows)

    nested = tmp_path / "nested"
    for split, names in (("train", list(grouped)[:30]), ("validation", list(grouped)[30:35]),
                         ("test", list(grouped)[35:])):
        (nested / split).mkdir(parents=True)
        for name in names:
            shutil.copy(example / "photos" / name, nested / split / name)
        write_rows(nested / split / "metadata.csv",
                   [["file_name", "text"]] + [[n, c] for n in names for c in grouped[n]])
    indexes = load("imagefolder", nested).indexes
    assert [indexes[s].num_images for s in SPLITS] == [30, 5, 5]
    assert indexes["dev"].image_paths[0] == f"validation/{list(grouped)[30]}"
    assert dataset_format("imagefolder").name("imagefolder", DatasetRequest((str(nested),),
                                                                            SPLITS)) == "nested"


# ------------------------------------------------------------------------------------------ extract


def test_extract_writes_caches_named_after_the_file(example, tiny, tmp_path):
    out = tmp_path / "out"
    code, output = run_cli(*csv_args(example / "captions.csv", example / "photos", out, tiny))
    assert code == 0, output
    loaded = load("csv", example / "captions.csv", example / "photos").indexes
    for split in SPLITS:
        images = ImageCache(out / "captions" / split / "image-dinov2.h5")
        texts = TextCache(out / "captions" / split / "text-bert.h5")
        assert images.ids == loaded[split].image_ids and images.attrs.dataset == "captions"
        assert texts.captions == loaded[split].captions
        np.testing.assert_array_equal(texts.image_index, loaded[split].caption_image_index)
    code, output = run_cli(*csv_args(example / "captions.csv", example / "photos", out, tiny,
                                     "--name", "mine", "--split", "test"))
    assert code == 0 and (out / "mine" / "test" / "image-dinov2.h5").exists(), output


def test_a_missing_photo_is_named_before_any_work_or_skipped_and_counted(example, tiny, tmp_path):
    rows = rows_of(example)
    rows.insert(4, ["gone.jpg", "a photo that is not there"])
    data = write_rows(tmp_path / "pairs.csv", rows)
    out = tmp_path / "out"
    code, message = run_cli(*csv_args(data, example / "photos", out, tiny))
    assert code == 2
    assert message.startswith(f"{data}:5: photo 'gone.jpg' not found "
                              f"({example / 'photos' / 'gone.jpg'})"), message
    assert "--skip-missing" in message and not out.exists()

    code, output = run_cli(*csv_args(data, example / "photos", out, tiny, "--skip-missing"))
    assert code == 0, output
    assert f"skipped missing photo {data}:5: gone.jpg" in output
    assert "skipped 1 missing photo(s)" in output
    total = sum(len(ImageCache(out / "pairs" / s / "image-dinov2.h5")) for s in SPLITS)
    assert total == 40


def test_an_unreadable_photo_is_reported_with_its_row(example, tiny, tmp_path):
    photos = Path(shutil.copytree(example / "photos", tmp_path / "photos"))
    test = load("csv", example / "captions.csv", photos).indexes["test"]
    (photos / test.image_ids[2]).write_bytes(b"not a jpeg at all")
    code, message = run_cli(*csv_args(example / "captions.csv", photos, tmp_path / "out", tiny,
                                      "--split", "test"))
    assert code == 2
    assert message.startswith(f"{photos / test.image_ids[2]}: cannot decode image"), message
    assert message.endswith("(row 2)")


BAD_TABLES = {
    "no photo column": ([["photo", "caption"], ["a.jpg", "x"]],
                        "{f}: no photo column (looked for image, filepath, file_name, image_path, "
                        "file, path); columns found: photo, caption; name it with --image-key"),
    "no caption column": ([["image", "words"], ["a.jpg", "x"]],
                          "{f}: no caption column (looked for caption, text, title, captions); "
                          "columns found: image, words; name it with --caption-key"),
    "empty caption": ([["image", "caption"], ["scene_00000.jpg", "x"], ["scene_00001.jpg", " "]],
                      "{f}:3: empty caption in 'caption'"),
    "empty photo": ([["image", "caption"], ["", "x"]], "{f}:2: empty photo path in 'image'"),
    "two splits": ([["image", "caption", "split"], ["scene_00000.jpg", "x", "train"],
                    ["scene_00001.jpg", "y", "test"], ["scene_00000.jpg", "z", "dev"]],
                   "{f}:4: photo 'scene_00000.jpg' is in split 'dev' here but in 'train' at {f}:2"),
    "empty split": ([["image", "caption", "split"], ["scene_00000.jpg", "x", "train"],
                     ["scene_00001.jpg", "y", "test"]],
                    "{f}: split 'dev' has no photos (photos per split: train 1, test 1); choose "
                    "splits with --split or set --split-ratio"),
    "too many fields": ([["image", "caption"], ["scene_00000.jpg", "x", "y"]],
                        "{f}:2: more fields than the 2 columns of the header"),
    "header only": ([["image", "caption"]], "{f}: no rows"),
}


@pytest.mark.parametrize("problem", list(BAD_TABLES))
def test_bad_tables_name_file_and_line(example, tiny, tmp_path, problem):
    rows, expected = BAD_TABLES[problem]
    data = write_rows(tmp_path / "bad.csv", rows)
    code, message = run_cli(*csv_args(data, example / "photos", tmp_path / "out", tiny))
    assert code == 2 and message.startswith(expected.format(f=data)), message
    assert not (tmp_path / "out").exists()


def test_a_line_that_is_not_utf8_is_named(example, tiny, tmp_path):
    data = tmp_path / "bad.csv"
    data.write_bytes(b"image,caption\nscene_00000.jpg,fine\nscene_00001.jpg,caf\xe9\n")
    code, message = run_cli(*csv_args(data, example / "photos", tmp_path / "out", tiny))
    assert (code, message) == (2, f"{data}:3: not valid UTF-8")
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"image": "scene_00000.jpg", "caption": ["a", 3]}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl:1: caption in 'caption' is a int"):
        load("jsonl", jsonl, example / "photos")


def test_options_that_do_not_fit_the_dataset_are_refused(example, tiny, tmp_path):
    code, message = run_cli(*csv_args(example / "captions.csv", example / "photos",
                                      tmp_path / "out", tiny, "--split-ratio", "1,1"))
    assert code == 2 and message.startswith("--split-ratio '1,1': give three fractions"), message
    labelled = write_rows(tmp_path / "s.csv", [["image", "caption", "split"],
                                               ["scene_00000.jpg", "x", "train"]])
    with pytest.raises(InputError, match="--split-ratio applies only to data without one"):
        load("csv", labelled, example / "photos", ["train"], split_ratio=(1.0, 0.0, 0.0))
    code, message = run_cli("extract", "--text-encoder", "bert", "--text-weights", tiny["bert"],
                            "--dataset", "f30k", "--data-path", tmp_path, "--split-ratio",
                            "0.8,0.1,0.1")
    assert code == 2 and message.startswith("--split-ratio: only for your own captioned photos")
    code, message = run_cli("extract", "--text-encoder", "bert", "--dataset", "parquet",
                            "--data-path", tmp_path)
    assert code == 2 and "available: f30k, coco, f8k, csv, tsv, jsonl, imagefolder, wds" in message


def test_the_example_script_writes_photos_and_a_csv(tmp_path):
    import subprocess
    import sys

    from tests.extract.cli_helpers import REPO_ROOT

    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "example_captions.py"),
                           str(tmp_path / "mine"), "--count", "6", "--size", "32"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{tmp_path / 'mine' / 'captions.csv'}: 16 captions of 6 photos")
    rows = rows_of(tmp_path / "mine")
    assert rows[0] == ["filepath", "title"] and len(rows) == 1 + sum(1 + i % 5 for i in range(6))
    assert all((tmp_path / "mine" / "photos" / photo).is_file() for photo, _ in rows[1:])
