"""Thread control for the many small matrix operations of factorizing and fitting."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the previous setting.

    Factorization and fitting work on many small matrices (``d x r`` with ``r <= 64``),
    where intra-op threads add overhead and, on a busy machine, 10-100x outliers.
    """
    n = torch.get_num_threads()
    if n != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n != 1:
            torch.set_num_threads(n)
