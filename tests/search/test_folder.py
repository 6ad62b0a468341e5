"""The folder walk: extensions in any case, hidden entries passed over, everything else it does not
use reported with a reason (special files, links that dangle, loop or leave the folder, HEIC
without pillow-heif), bad files recognised by their header, nothing ever blocks."""
from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cache.errors import InputError
from extract import datasets
from extract.datasets import HEIF_SUPPORTED, ImageDecodeError, load_rgb
from search.folder import decode_problem, header_problem, printable, scan_folder, sha256_of
from tests.hostile import hang_guard, png_header


def _photo(path: Path, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), (10, 200, 30)).save(path, fmt)


def test_walk_keeps_image_extensions_in_any_case_and_skips_hidden_and_loops(tmp_path: Path) -> None:
    _photo(tmp_path / "a.JPG")
    _photo(tmp_path / "sub" / "b.jpeg")
    _photo(tmp_path / "sub" / "deep" / "c.png", "PNG")
    _photo(tmp_path / "d.WebP", "WEBP")
    _photo(tmp_path / "e.bmp", "BMP")
    _photo(tmp_path / "f.gif", "GIF")
    _photo(tmp_path / "g.tif", "TIFF")
    _photo(tmp_path / "h.TIFF", "TIFF")
    _photo(tmp_path / ".hidden" / "x.jpg")
    _photo(tmp_path / ".y.jpg")
    (tmp_path / "readme.txt").write_text("no")
    os.symlink(tmp_path / "sub", tmp_path / "sub" / "deep" / "loop")      # a loop back up
    os.symlink(tmp_path / "a.JPG", tmp_path / "sub" / "same.jpg")         # inside: followed
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    os.symlink(tmp_path / "self.jpg", tmp_path / "self.jpg")              # a link to itself
    scan = scan_folder(tmp_path)
    assert [photo.path for photo in scan.photos] == [
        "a.JPG", "d.WebP", "e.bmp", "f.gif", "g.tif", "h.TIFF", "sub/b.jpeg", "sub/deep/c.png",
        "sub/same.jpg"]
    reasons = {bad.path: bad.reason for bad in scan.skipped}
    assert reasons.keys() == {"dangling.jpg", "self.jpg", "sub/deep/loop"}, reasons
    assert reasons["dangling.jpg"].startswith("dangling symbolic link")
    assert reasons["self.jpg"] == "symbolic link loop"
    assert "already walked" in reasons["sub/deep/loop"]
    assert load_rgb(tmp_path / "g.tif").size == (16, 12)


def test_links_out_of_the_folder_are_reported_unless_followed(tmp_path: Path) -> None:
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    _photo(photos / "in.jpg")
    _photo(elsewhere / "out.jpg")
    os.symlink(elsewhere / "out.jpg", photos / "link.jpg")
    os.symlink(elsewhere, photos / "trip")
    os.symlink("/etc", photos / "etc")
    scan = scan_folder(photos)
    assert [photo.path for photo in scan.photos] == ["in.jpg"]
    reasons = {bad.path: bad.reason for bad in scan.skipped}
    assert reasons.keys() == {"etc", "link.jpg", "trip"}
    assert all("outside the folder" in r and "--follow-links" in r for r in reasons.values())
    (photos / "etc").unlink()
    followed = scan_folder(photos, follow_links=True)
    assert [photo.path for photo in followed.photos] == ["in.jpg", "link.jpg", "trip/out.jpg"]
    assert not followed.skipped


def test_special_files_are_reported_and_never_opened_blocking(tmp_path: Path) -> None:
    _photo(tmp_path / "good.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock.png"))
    try:
        with hang_guard():
            scan = scan_folder(tmp_path)
            reasons = {bad.path: bad.reason for bad in scan.skipped}
            assert [p.path for p in scan.photos] == ["good.jpg"]
            assert reasons == {"pipe.jpg": "not a regular file (FIFO)",
                               "sock.png": "not a regular file (socket)"}
            for name in ("pipe.jpg", "sock.png"):            # even when asked directly
                with pytest.raises(OSError, match="not a regular file"):
                    sha256_of(tmp_path / name)
                assert header_problem(tmp_path / name).startswith("not a regular file")
                with pytest.raises(ImageDecodeError, match=f"{name}: not a regular file"):
                    load_rgb(tmp_path / name)
    finally:
        server.close()


def test_an_unreadable_file_is_a_bad_file_with_its_reason(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _photo(tmp_path / "locked.jpg")
    locked = str(tmp_path / "locked.jpg")
    if os.geteuid() != 0:
        os.chmod(locked, 0)
    else:   # root reads a mode-000 file: refuse it where the kernel would, at open(2)
        real_open = os.open

        def refusing_open(path, flags, *args, **kwargs):
            if os.fspath(path) == locked:
                raise PermissionError(13, "Permission denied", locked)
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(datasets.os, "open", refusing_open)
    assert [p.path for p in scan_folder(tmp_path).photos] == ["locked.jpg"]   # listed, then...
    with pytest.raises(PermissionError):
        sha256_of(Path(locked))
    assert header_problem(Path(locked)) == "cannot read: Permission denied"
    assert decode_problem(Path(locked)) == "cannot read image: permission denied"


def test_a_decompression_bomb_is_refused_and_a_large_photo_is_not_warned_about(
        tmp_path: Path) -> None:
    png_header(tmp_path / "bomb.png", 20000, 20000)
    problem = header_problem(tmp_path / "bomb.png")
    assert problem.startswith("image too large (a decompression bomb?)"), problem
    with pytest.raises(ImageDecodeError, match="bomb.png: cannot decode image: Image size"):
        load_rgb(tmp_path / "bomb.png")
    png_header(tmp_path / "large.png", 11000, 9100)           # 100 megapixels: a real camera's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert header_problem(tmp_path / "large.png") is None


def test_names_that_are_not_utf8_or_hold_control_characters_print_escaped(tmp_path: Path) -> None:
    odd = os.fsdecode(b"bad\xff\xfename.jpg")
    _photo(tmp_path / odd)
    _photo(tmp_path / "evil\x1b[31mred\nline.jpg")
    paths = [photo.path for photo in scan_folder(tmp_path).photos]
    assert paths == sorted([odd, "evil\x1b[31mred\nline.jpg"])
    assert printable(odd) == "bad\\xff\\xfename.jpg"
    assert printable("evil\x1b[31mred\nline.jpg") == "evil\\x1b[31mred\\nline.jpg"
    assert printable("été\u2028.jpg") == "été\\u2028.jpg"
    assert load_rgb(tmp_path / odd).size == (16, 12)


@pytest.mark.skipif(HEIF_SUPPORTED, reason="pillow-heif is installed: HEIC photos are indexed")
def test_heic_without_pillow_heif_is_reported_as_unsupported(tmp_path: Path) -> None:
    (tmp_path / "phone.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    (scan,) = scan_folder(tmp_path).skipped
    assert scan.path == "phone.HEIC" and "pillow-heif" in scan.reason


def test_bad_files_are_recognised_with_a_reason(tmp_path: Path) -> None:
    _photo(tmp_path / "good.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not an image")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.jpg", quality=95)
    whole = (tmp_path / "noise.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
    assert header_problem(tmp_path / "good.jpg") is None
    assert header_problem(tmp_path / "empty.jpg") == "empty file (0 bytes)"
    assert "not an image" in header_problem(tmp_path / "text.png")
    assert header_problem(tmp_path / "truncated.jpg") is None        # found when decoded
    assert "truncated" in decode_problem(tmp_path / "truncated.jpg")
    assert decode_problem(tmp_path / "good.jpg") is None


def test_a_missing_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="photo folder not found"):
        scan_folder(tmp_path / "nope")
