"""Benchmark: the faiss index kinds of ``cli index --kind`` (flat, hnsw, ivf-pq) on synthetic
embeddings: build seconds, single-query latency p50 / p99 and recall@10 against the exact search,
each as a ratio against ``flat`` measured in the same run.

The vectors imitate head embeddings: ``--n`` L2-normalised 256-d points around 1,000 random
centres (a clustered cloud; uniform noise would be an unrealistically hard case for the
approximate kinds), queried by ``--queries`` fresh points of the same mixture, one query per call
as ``cli search`` does. Indexes are built by ``search.ann.faiss_index`` (the code of ``cli index``).

    python bench/index_kinds.py --n 1000000 --queries 1000 --threads 2
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from machine import print_machine
from search import ann


def clustered(rng: np.random.Generator, centres: np.ndarray, count: int,
              spread: float) -> np.ndarray:
    """``count`` L2-normalised points around random ``centres``."""
    points = centres[rng.integers(0, len(centres), count)]
    points = points + spread * rng.standard_normal(points.shape, dtype=np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def measure(kind: str, data: np.ndarray, queries: np.ndarray, k: int) -> dict[str, object]:
    """Build seconds, per-query latencies (ms) and the top-k ids of every query."""
    began = time.perf_counter()
    index = ann.faiss_index(kind, data, np.arange(len(data)))
    build = time.perf_counter() - began
    latencies, found = [], []
    for query in queries:
        began = time.perf_counter()
        _, ids = ann.search(index, query[None], k)
        latencies.append(1e3 * (time.perf_counter() - began))
        found.append(ids[0])
    return {"build": build, "p50": float(np.percentile(latencies, 50)),
            "p99": float(np.percentile(latencies, 99)), "ids": np.stack(found)}


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top-k that a search found."""
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="indexed vectors")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="faiss threads (0: its default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print_machine()
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((min(1000, args.n), args.dim), dtype=np.float32)
    data = clustered(rng, centres, args.n, 0.6)
    queries = clustered(rng, centres, args.queries, 0.6)
    results = {kind: measure(kind, data, queries, args.k) for kind in ann.KINDS}
    exact = results["flat"]["ids"]
    flat = results["flat"]
    print(f"{args.n} vectors of {args.dim}, {args.queries} single queries, k = {args.k}, faiss "
          f"{faiss.__version__} with {faiss.omp_get_max_threads()} threads")
    print(f"{'kind':<8}{'build s':>10}{'p50 ms':>10}{'p99 ms':>10}{f'recall@{args.k}':>11}"
          f"{'build/flat':>12}{'p50/flat':>10}{'p99/flat':>10}")
    for kind, r in results.items():
        print(f"{kind:<8}{r['build']:>10.2f}{r['p50']:>10.3f}{r['p99']:>10.3f}"
              f"{recall(r['ids'], exact):>11.3f}{r['build'] / flat['build']:>12.2f}"
              f"{r['p50'] / flat['p50']:>10.3f}{r['p99'] / flat['p99']:>10.3f}")
    for kind in ("hnsw", "ivf-pq"):
        r = results[kind]
        print(f"ratio {kind}/flat: build {r['build'] / flat['build']:.2f}, p50 latency "
              f"{r['p50'] / flat['p50']:.3f}, recall@{args.k} {recall(r['ids'], exact):.3f}")
    print_machine("end")


if __name__ == "__main__":
    main()
