"""One intra-op torch thread for stretches of tiny forwards (OpenMP spin-waiting on a shared
2-core machine costs more than it gains); results are unchanged."""
from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block with one torch thread, then restore the previous count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
