"""``cli explain`` on real tiny checkpoints: the image and caption through the recorded backbones,
one picture per head branch (size and word panels checked), and the one-line errors; photos decoded
as cli extract and cli index decode them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertTokenizer

from cache.batch import as_cached
from heads.checkpoint import load_checkpoint, save_checkpoint
from viz.explain import DRAWERS, explain
from viz.figure import panel_shape, pixel_size
from tests.extract.cli_helpers import run_cli
from tests.hostile import png_header
from tests.viz.world import VizWorld


def caption_pieces(world: VizWorld, caption: str) -> list[str]:
    """The word pieces of ``caption`` under the world's BERT tokenizer (no [CLS] / [SEP])."""
    return BertTokenizer.from_pretrained(str(world.tail.models["bert"])).tokenize(caption)


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


# head, mode -> panels besides the word panels, and the words drawn (from the word pieces)
CASES = {
    ("linear", None): (1, lambda pieces: []),
    ("laps", None): (4, lambda pieces: []),
    ("caa", None): (4, lambda pieces: []),
    ("scan", None): (1, lambda pieces: ["[CLS]", *pieces, "[SEP]"]),   # use_prefix: all tokens
    ("tgdt", None): (1, lambda pieces: pieces),                        # local: [CLS]/[SEP] dropped
    ("tgdt", "global"): (1, lambda pieces: []),
}


@pytest.mark.parametrize("head, mode", list(CASES), ids=lambda value: str(value))
def test_explain_draws_each_head(viz_world: VizWorld, head: str, mode: str | None,
                                 tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    explained = explain(viz_world.run(head) / "best.pt", viz_world.image, viz_world.caption, out,
                        mode=mode)
    panels, words = CASES[head, mode]
    expected = words(caption_pieces(viz_world, viz_world.caption))
    assert explained.words == expected
    assert png_size(out) == pixel_size(*panel_shape(panels + len(expected)))


def test_the_cli_draws_one_word(viz_world: VizWorld, tmp_path: Path) -> None:
    out = tmp_path / "word.png"
    code, output = run_cli("explain", "--checkpoint", viz_world.run("tgdt") / "best.pt",
                           "--image", viz_world.image, "--caption", "a yellow circle", "--out",
                           out, "--word", "Circle")
    assert code == 0, output
    assert "(1 word panel)" in output and png_size(out) == pixel_size(*panel_shape(2))


def test_every_head_branch_has_a_drawer() -> None:
    heads = {"linear", "vse", "hrem", "laps", "caa", "scan", "tgdt", "aladin"}
    assert {key.split("/")[0] for key in DRAWERS} == heads
    assert {"tgdt/embedding", "tgdt/interaction", "aladin/embedding",
            "aladin/interaction"} <= set(DRAWERS)


def _explain(world: VizWorld, checkpoint: Path, out: Path, *args: str) -> tuple[int, str]:
    return run_cli("explain", "--checkpoint", checkpoint, "--image", world.image, "--caption",
                   world.caption, "--out", out, *args)


def test_bad_requests_stop_with_one_line(viz_world: VizWorld, tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    tgdt, laps = viz_world.run("tgdt") / "best.pt", viz_world.run("laps") / "best.pt"
    code, message = _explain(viz_world, tgdt, out, "--word", "zebra")
    assert code == 2 and "--word 'zebra' is not among the words" in message
    code, message = _explain(viz_world, laps, out, "--word", "circle")
    assert code == 2 and "draws no per-word evidence" in message
    code, message = _explain(viz_world, tgdt, out, "--mode", "sideways")
    assert code == 2 and "no inference mode 'sideways'" in message
    code, message = run_cli("explain", "--checkpoint", tgdt, "--image", tmp_path / "none.jpg",
                            "--caption", "a circle", "--out", out)
    assert code == 2 and "none.jpg: image file not found" in message
    png_header(tmp_path / "bomb.png", 20000, 20000)                     # a decompression bomb
    code, message = run_cli("explain", "--checkpoint", tgdt, "--image", tmp_path / "bomb.png",
                            "--caption", "a circle", "--out", out)
    assert code == 2 and "bomb.png: cannot decode image: Image size (400000000 pixels)" in message
    assert not out.exists()


def _altered(checkpoint: Path, tmp_path: Path, side: str, **fields: object) -> Path:
    """A copy of ``checkpoint`` whose recorded ``side`` features have other ``fields``."""
    state = load_checkpoint(checkpoint)
    state["features"][side].update(fields)
    state.pop("path")
    path = tmp_path / "altered.pt"
    save_checkpoint(state, path)
    return path


def test_changed_weights_and_region_features_are_refused(viz_world: VizWorld,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    best = viz_world.run("scan") / "best.pt"
    code, message = _explain(viz_world, _altered(best, tmp_path, "text", weights_hash="0" * 16),
                             out)
    assert code == 2 and "the text weights" in message and "changed since extraction" in message
    code, message = _explain(viz_world, _altered(best, tmp_path, "image", grid=None,
                                                 encoder="scan-precomp"), out)
    assert code == 2 and "without a grid (region features?)" in message
    assert not out.exists()


def test_the_image_is_drawn_as_the_backbone_saw_it(viz_world: VizWorld) -> None:
    from viz.inputs import load_pair

    big = Image.open(viz_world.image).resize((80, 48))
    path = viz_world.runs / "big.png"
    big.save(path)
    pair = load_pair(viz_world.run("linear") / "best.pt", path, viz_world.caption)
    assert pair.seen.size == (32, 32)                 # resized to the recorded resolution, no crop
    assert pair.image.tokens.shape == (1, 1 + 4 * 4, 32) and pair.image.mask.all()
    assert pair.image.tokens.dtype == torch.float32
    assert torch.equal(pair.image.tokens, pair.image.tokens.half().float())   # fp16 like a cache


def test_the_tokens_are_those_cli_extract_cached(viz_world: VizWorld) -> None:
    """An image and caption of the test split give the tokens of the test caches, so explain
    scores the pair as cli eval does."""
    from cache.store import ImageCache, TextCache
    from viz.inputs import load_pair

    folder = viz_world.tail.features / "f30k" / "test"
    images, texts = ImageCache(folder / "image-dinov2.h5"), TextCache(folder / "text-bert.h5")
    caption = texts.captions[0]
    pair = load_pair(viz_world.run("linear") / "best.pt",
                     viz_world.tail.data / "images" / Path(images.paths[0]).name, caption)
    cached_image, _ = images.read([0])
    cached_text, lengths = texts.read([0])
    torch.testing.assert_close(pair.image.tokens, torch.from_numpy(cached_image).float(),
                               atol=2e-3, rtol=0)
    torch.testing.assert_close(pair.text.tokens,
                               torch.from_numpy(cached_text[:, :int(lengths[0])]).float(),
                               atol=2e-3, rtol=0)


@pytest.mark.parametrize("run", ["tgdt", "linear_tail"])
def test_explain_scores_a_pair_as_eval_does(viz_world: VizWorld, run: str) -> None:
    """The score drawn for a test image and caption is the one the checkpoint's model gives the
    cached pair (a tail run rebuilds its tuned blocks from the stand-in caches)."""
    from cache.batch import TokenBatch
    from cache.store import ImageCache, TextCache
    from heads.model import create_model
    from viz.explain import encode
    from viz.inputs import load_pair

    best = viz_world.run(run) / "best.pt"
    state = load_checkpoint(best)
    folder, data = viz_world.tail.features / "f30k" / "test", state["config"]["data"]
    images = ImageCache(folder / f"image-{data['image']}.h5")
    texts = TextCache(folder / f"text-{data['text']}.h5")
    model = create_model(state, images, texts).eval()
    image_tokens, _ = images.read([0])
    text_tokens, lengths = texts.read([0])
    text_tokens = text_tokens[:, :int(lengths[0])]
    with torch.no_grad():
        cached = float(model.score_pairs(
            model.encode_images(TokenBatch(torch.from_numpy(image_tokens).float(),
                                           torch.ones(image_tokens.shape[:2], dtype=torch.bool))),
            model.encode_texts(TokenBatch(torch.from_numpy(text_tokens).float(),
                                          torch.ones(text_tokens.shape[:2], dtype=torch.bool)))))
    pair = load_pair(best, viz_world.tail.data / "images" / Path(images.paths[0]).name,
                     texts.captions[0])
    assert encode(pair).score == pytest.approx(cached, rel=1e-5, abs=1e-5)


def test_explain_runs_an_e2e_run_on_the_photo_and_the_word_pieces(viz_world: VizWorld,
                                                                  tmp_path: Path) -> None:
    """An e2e run's tuned backbones read the photo and the caption's word pieces; the score is
    the one its model gives the test pair read as ``cli eval`` reads it."""
    import numpy as np

    from cache.batch import IdsBatch, PixelBatch
    from cache.store import ImageCache, TextCache
    from heads.model import create_model
    from heads.model import input_batches
    from viz.explain import encode
    from viz.inputs import load_pair

    best = viz_world.run("linear_e2e") / "best.pt"
    folder = viz_world.tail.features / "f30k" / "test"
    images, texts = ImageCache(folder / "image-dinov2.h5"), TextCache(folder / "text-bert.h5")
    model = create_model(load_checkpoint(best), images, texts).eval()
    (_, image_batch), = list(input_batches(model, images, 1, np.array([0])))
    (_, text_batch), = list(input_batches(model, texts, 1, np.array([0])))
    with torch.no_grad():
        expected = float(model.score_pairs(model.encode_images(image_batch),
                                           model.encode_texts(text_batch)))
    pair = load_pair(best, viz_world.tail.data / "images" / Path(images.paths[0]).name,
                     texts.captions[0])
    assert isinstance(pair.image, PixelBatch) and isinstance(pair.text, IdsBatch)
    assert encode(pair).score == pytest.approx(expected, rel=1e-5, abs=1e-5)
    out = tmp_path / "e2e.png"
    code, output = _explain(viz_world, best, out)
    assert code == 0 and Image.open(out).size[0] > 0, output


def _odd_photos(folder: Path, source: Path) -> dict[str, Path]:
    """Photos that a naive ``Image.open(...).convert("RGB")`` decodes otherwise than extraction:
    an EXIF-rotated JPEG, a 16-bit grayscale PNG and a PNG whose transparent part is red."""
    base = Image.open(source).convert("RGB").resize((48, 32))
    exif = Image.Exif()
    exif[0x0112] = 6                                       # orientation: rotate 90 degrees
    base.save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    gray = np.asarray(base.convert("L"), np.uint16) * 257
    Image.fromarray(gray).save(folder / "deep.png")                 # mode I;16
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    pixels = np.asarray(rgba).copy()
    pixels[pixels[..., 3] < 128, :3] = (255, 0, 0)          # hidden red, shown as white
    Image.fromarray(pixels, "RGBA").save(folder / "alpha.png")
    return {name: folder / name for name in ("rotated.jpg", "deep.png", "alpha.png")}


def test_explain_decodes_a_photo_as_index_and_extract_do(viz_world: VizWorld,
                                                         tmp_path: Path) -> None:
    """EXIF orientation, 16-bit depth and alpha: explain's tokens are those cli index computes
    for the same file (its `FolderImages`), not those of a naive decode."""
    from backbones.recorded import recorded_encoder
    from search.folder import FolderImages
    from viz.inputs import load_pair

    checkpoint = viz_world.run("linear") / "best.pt"
    encoder = recorded_encoder("image", load_checkpoint(checkpoint)["features"]["image"],
                               str(checkpoint))
    for name, path in _odd_photos(tmp_path, viz_world.image).items():
        _, pixels, reason = FolderImages(tmp_path, [name], encoder.transform)[0]
        assert reason == ""
        naive = encoder.transform(Image.open(path).convert("RGB"))
        assert not torch.allclose(naive, pixels, atol=1e-2), name       # the decoders differ here
        with torch.no_grad():
            indexed = as_cached(encoder(pixels.unsqueeze(0))).tokens
        pair = load_pair(checkpoint, path, viz_world.caption)
        torch.testing.assert_close(pair.image.tokens, indexed, atol=0, rtol=0, msg=name)
