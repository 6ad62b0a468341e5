"""``cli search``: the table, JSON and gallery page of a text or photo query, a query longer than
the tokenizer's limit, re-ranking a shortlist of K with an interaction head
(``--fine-checkpoint``) whatever ``-k`` shows, and the errors of a moved run or photo folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import search
from heads.checkpoint import load_checkpoint
from search.index import build_index
from tests.extract.cli_helpers import run_cli
from tests.search.world import PhotoWorld, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def indexed(photo_world: PhotoWorld, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("index") / "index"
    build_index(photo_world.photos, photo_world.checkpoint, out, progress=False)
    return out


def test_text_query_prints_a_table_json_and_a_gallery(photo_world: PhotoWorld, indexed: Path,
                                                      tmp_path: Path) -> None:
    code, table = run_cli("search", indexed, "a red circle", "-k", 3, "--device", "cpu")
    assert code == 0, table
    lines = table.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "path"] and len(lines) == 4
    assert lines[1].split()[0] == "1" and str(photo_world.photos) in lines[1]

    code, output = run_cli("search", indexed, "a red circle", "-k", 3, "--json", "--html",
                           tmp_path / "page.html", "--device", "cpu")
    assert code == 0, output
    payload = json.loads(output[output.index("{"):])
    expected = search.open_index(indexed).query_text("a red circle", 3)
    assert [h["path"] for h in payload["hits"]] == [h.path for h in expected.hits]
    page = (tmp_path / "page.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 3 and expected.hits[0].path in page

    code, output = run_cli("search", indexed, "--image", photo_world.photos / photo_world.good[5],
                           "--json", "-k", 1, "--device", "cpu")
    assert code == 0 and json.loads(output)["hits"][0]["path"] == photo_world.good[5]


def test_a_query_over_the_tokenizer_limit_is_truncated_with_a_note(indexed: Path) -> None:
    opened = search.open_index(indexed)
    limit = opened.text_encoder.max_length
    long = " ".join(["red circle"] * limit)
    results = opened.query_text(long, k=2)
    assert len(results.hits) == 2 and "only the first" in results.notes[0]
    code, output = run_cli("search", indexed, long, "--device", "cpu")
    assert code == 0 and "note: the query is" in output
    code, message = run_cli("search", indexed, "  ")
    assert code == 2 and "empty" in message
    code, message = run_cli("search", indexed)
    assert code == 2 and "QUERY or --image" in message


def test_rerank_rescoring_the_shortlist_with_an_interaction_head(
        photo_world: PhotoWorld, indexed: Path, tmp_path: Path) -> None:
    fine = train(photo_world.tail, tmp_path / "scan", "scan", "head.embed_dim=16") / "best.pt"
    opened = search.open_index(indexed)
    coarse = opened.query_text("a red circle", k=6)
    reranked = opened.rerank(coarse, fine, 4)
    head = reranked.hits[:4]
    assert {h.path for h in head} == {h.path for h in coarse.hits[:4]}
    assert [h.score for h in head] == sorted((h.score for h in head), reverse=True)
    assert all(h.coarse is not None for h in head)
    assert [h.path for h in reranked.hits[4:]] == [h.path for h in coarse.hits[4:]]
    assert [h.rank for h in reranked.hits] == list(range(1, 7))
    code, output = run_cli("search", indexed, "a red circle", "-k", 6, "--rerank-topk", 4,
                           "--fine-checkpoint", fine, "--json", "--device", "cpu")
    assert code == 0, output
    assert [h["path"] for h in json.loads(output)["hits"]] == [h.path for h in reranked.hits]
    code, output = run_cli("search", indexed, "a red circle", "-k", 2, "--rerank-topk", 6,
                           "--fine-checkpoint", fine, "--json", "--device", "cpu")        # a shortlist of 6, show 2
    assert code == 0, output
    deep = opened.rerank(opened.query_text("a red circle", k=6), fine, 6)
    assert [h["path"] for h in json.loads(output)["hits"]] == [h.path for h in deep.hits[:2]]
    assert [h["coarse"] for h in json.loads(output)["hits"]] == [h.coarse for h in deep.hits[:2]]

    state = load_checkpoint(fine)
    state["features"]["image"]["layer"] = 1
    other = tmp_path / "other.pt"
    torch.save({k: v for k, v in state.items() if k != "path"}, other)
    code, message = run_cli("search", indexed, "a red circle", "--rerank-topk", 4,
                            "--fine-checkpoint", other, "--device", "cpu")
    assert code == 2 and "other image features than the index's cache" in message, message
    code, message = run_cli("search", indexed, "a red circle", "--rerank-topk", 4,
                            "--fine-checkpoint", photo_world.checkpoint, "--device", "cpu")
    assert code == 2 and "no interaction branch" in message


def test_a_run_with_tuned_tails_indexes_and_queries_through_them(photo_world: PhotoWorld,
                                                                  tmp_path: Path) -> None:
    world = photo_world.tail
    world.extract("--layer", 1, "--text-layer", 1, "--tag", "dinov2_l1", "--text-tag", "bert_l1")
    run = train(world, tmp_path / "tails", "linear", "head.embed_dim=16", "data.image=dinov2_l1",
                "data.text=bert_l1", "data.image_source=tail", "data.text_source=tail")
    out = tmp_path / "index"
    build_index(photo_world.photos, run / "best.pt", out, progress=False)
    opened = search.open_index(out)
    assert opened.manifest["image_features"]["layer"] == 1
    assert opened.model.tuned_sides() == ["image", "text"]
    for rel in photo_world.good[:3]:
        assert opened.query_image(photo_world.photos / rel, k=1).hits[0].path == rel
    assert len(opened.query_text("a red circle", k=4).hits) == 4


def test_an_e2e_run_indexes_and_queries_through_its_tuned_backbones(photo_world: PhotoWorld,
                                                                     tmp_path: Path) -> None:
    """Photos and queries reach an e2e run's tuned backbones as pixels and word pieces."""
    run = train(photo_world.tail, tmp_path / "e2e", "linear", "head.embed_dim=16",
                "data.image_source=e2e", "data.text_source=e2e")
    out = tmp_path / "index"
    build_index(photo_world.photos, run / "best.pt", out, progress=False)
    opened = search.open_index(out)
    assert opened.model.tuned_sides() == ["image", "text"]
    assert opened.model.image_source.reads == "pixels"
    for rel in photo_world.good[:3]:
        hit = opened.query_image(photo_world.photos / rel, k=1).hits[0]
        assert hit.path == rel and hit.score == pytest.approx(1.0, abs=1e-4)
    assert len(opened.query_text("a red circle", k=4).hits) == 4


def test_a_moved_run_or_photo_folder_gets_an_error_naming_what_to_do(
        photo_world: PhotoWorld, tmp_path: Path) -> None:
    checkpoint = Path(shutil.copy(photo_world.checkpoint, tmp_path / "best.pt"))
    photos = Path(shutil.copytree(photo_world.photos, tmp_path / "photos"))
    out = tmp_path / "index"
    build_index(photos, checkpoint, out, progress=False)
    moved = Path(shutil.move(checkpoint, tmp_path / "moved.pt"))
    code, message = run_cli("search", out, "a red circle", "--device", "cpu")
    assert code == 2 and "best.pt: the checkpoint the index" in message, message
    assert "pass its new place with --checkpoint" in message
    code, output = run_cli("search", out, "a red circle", "--checkpoint", moved, "--device", "cpu")
    assert code == 0, output

    shutil.move(photos, tmp_path / "elsewhere")
    for extra in ([], ["--html", tmp_path / "page.html"]):
        code, message = run_cli("search", out, "a red circle", "--checkpoint", moved, *extra)
        assert code == 2 and "photos: the photo folder of the index" in message, message
        assert f"cli index on its new place with --out {out}" in message


def test_the_python_api_loads_backbones_without_transformers_reports(
        indexed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``search.open_index`` keeps transformers' loggers at "error" while it loads, as the CLI."""
    from transformers.utils import logging as hf_logging

    from search import model as model_module

    levels = []
    original = model_module.recorded_encoder

    def recording(*args, **kwargs):
        levels.append(hf_logging.get_verbosity())
        return original(*args, **kwargs)

    monkeypatch.setattr(model_module, "recorded_encoder", recording)
    hf_logging.set_verbosity_warning()
    opened = search.open_index(indexed)
    assert opened.query_text("a red circle", k=2).hits
    assert levels == [hf_logging.ERROR]
    assert hf_logging.get_verbosity() == hf_logging.WARNING          # restored afterwards
