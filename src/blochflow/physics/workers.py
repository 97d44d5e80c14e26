"""Independent batches of Bloch solves on several threads.

One batched LAPACK call on small matrices (tens to a few hundred beams) uses extra threads poorly;
independent sub-batches on separate threads, each single-threaded, scale almost linearly. Torch
releases the GIL inside its kernels, so plain Python threads suffice. Results come back in input
order, so sums over them are the same whatever the scheduling.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Sequence, Sized, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_pools: dict[int, ThreadPoolExecutor] = {}
_lock = threading.Lock()
_fixed: list[int] = []


def solver_workers() -> int:
    """Threads for independent solves: torch's intra-op thread count (``--threads``, set_num_threads),
    unless :func:`fixed_workers` says otherwise."""
    return _fixed[-1] if _fixed else max(1, torch.get_num_threads())


@contextmanager
def fixed_workers(n: int):
    """Run solves on ``n`` worker threads inside the block (1: one batched call per chunk using torch's
    own threads, the baseline the benchmarks compare with)."""
    _fixed.append(max(1, int(n)))
    try:
        yield
    finally:
        _fixed.pop()


def transforms_active() -> bool:
    """True inside a torch.func transform (vmap, jvp, grad): its state is per thread, so the work
    must stay on the calling thread."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _pool(n: int) -> ThreadPoolExecutor:
    with _lock:
        if n not in _pools:
            _pools[n] = ThreadPoolExecutor(n, thread_name_prefix="blochflow-solve")
        return _pools[n]


@contextmanager
def single_threaded():
    """Torch single-threaded inside the block, so that the workers together use the threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def add_rows(out: torch.Tensor, pieces: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``out[rows] += vals`` for each (rows, vals) in order, repeated rows summed, on one thread:
    index_put_'s accumulation (5-50x faster than index_add on a CPU) sums repeated float32 rows on
    several threads in an order that changes from call to call, and a refinement's decisions with them
    (the paper's synthetic quartz from start 03 ended 0.0004 or 0.0010-0.0013 A off, run to run)."""
    with single_threaded():
        for rows, vals in pieces:
            out.index_put_((rows,), vals, accumulate=True)
    return out


def parallel_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None,
                 grad: bool | None = None) -> list[R]:
    """``[fn(x) for x in items]`` on ``workers`` threads (default :func:`solver_workers`), each running
    torch single-threaded; ``grad`` sets autograd recording in the workers (default: the caller's).
    ``items`` may be a generator: each item goes to the workers as this thread makes it, with at
    most two per worker waiting, so that making overlaps solving and made items do not pile up."""
    workers = solver_workers() if workers is None else workers
    grad = torch.is_grad_enabled() if grad is None else grad
    if workers <= 1 or (isinstance(items, Sized) and len(items) <= 1) or transforms_active():
        with torch.set_grad_enabled(grad):
            return [fn(x) for x in items]

    def call(x):
        with torch.set_grad_enabled(grad):
            return fn(x)

    with single_threaded():
        if isinstance(items, Sized):
            return list(_pool(workers).map(call, items))
        pool, pending, out = _pool(workers), [], []
        for x in items:
            pending.append(pool.submit(call, x))
            while len(pending) > 2 * workers:
                out.append(pending.pop(0).result())
        return out + [f.result() for f in pending]


def pipeline(make: Callable[[T], object], solve: Callable[[object], R], items: Sequence[T],
             workers: int | None = None) -> list[R]:
    """``[solve(make(x)) for x in items]`` with ``make`` on the calling thread (e.g. forward-mode AD,
    which torch keeps process-global) and ``solve`` on ``workers`` threads, overlapped (see
    :func:`parallel_map`)."""
    return parallel_map(solve, (make(x) for x in items), workers)


def split_evenly(n: int, parts: int) -> list[slice]:
    """``parts`` contiguous slices covering range(n), sizes differing by at most one (none empty)."""
    parts = max(1, min(parts, n))
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
