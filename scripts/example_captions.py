"""Write a tiny example of your own captioned photos: rendered demo scenes (no committed images)
and a CSV with one (photo, caption) row each, one to five captions per photo, no split column.

    python scripts/example_captions.py mine --count 60
    cli extract --backbone efficientnet_lite0 --text-encoder minilm --dataset csv \\
        --data-path mine/captions.csv --images mine/photos

See docs/datasets.md for the whole walk-through (train, evaluate, search).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.demo_data import write_example_csv  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="Output folder (photos/ and captions.csv).")
    parser.add_argument("--count", type=int, default=60, help="Number of photos.")
    parser.add_argument("--size", type=int, default=224, help="Photo side in pixels.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = write_example_csv(args.directory, args.count, args.size, args.seed)
    rows = sum(1 for _ in path.open(encoding="utf-8")) - 1
    print(f"{path}: {rows} captions of {args.count} photos in {args.directory / 'photos'}")


if __name__ == "__main__":
    main()
