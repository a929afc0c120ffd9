"""The converter's per-matrix work spread over forked worker processes.

GPTQ and the layout table are sequences of small numpy steps that hold the GIL, one task per
matrix (or per group of matrices sharing an input), independent of each other: threads would take
turns, so the tasks run in forked processes, each with single-threaded BLAS. Forking lets the
workers inherit what the tasks read (the loaded source, the Hessians) without pickling it: the
caller passes it as `shared`, which task functions read with shared().
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator

_SHARED: dict = {}  # what the forked workers read; set by forked_map before it forks


def shared() -> dict:
    """Inside a task: the `shared` dict given to forked_map."""
    return _SHARED


def forked_map(task: Callable, items: Iterable, shared: dict, processes: int | None = None) -> Iterator:
    """task(item) for every item, in the order they finish. task must be a module-level function
    (it is pickled by name) and reads `shared` through shared(). processes: default the CPUs this process
    may use (_core.default_threads: its affinity mask, at most its container's CPU quota),
    at most one per item; 1, or no fork on this platform: in this process. BLAS runs single-threaded
    in every process while the tasks run. A task's exception is raised here."""
    from threadpoolctl import threadpool_limits

    from .. import _core

    items = list(items)
    processes = min(processes or _core.default_threads(), len(items))
    _SHARED.clear()
    _SHARED.update(shared)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            if processes > 1 and "fork" in multiprocessing.get_all_start_methods():
                pool = multiprocessing.get_context("fork").Pool(processes, initializer=_default_signals)
                try:
                    yield from pool.imap_unordered(task, items)
                    pool.close()  # all done: the workers exit on their own
                    pool.join()
                finally:
                    pool.terminate()  # early exit or error: SIGTERM to the workers (a no-op after join)
            else:
                for item in items:
                    yield task(item)
    finally:
        _SHARED.clear()


def _default_signals() -> None:
    """In a forked worker: SIGTERM kills it at once again. The CLI's handler (SystemExit, for the
    parent's cleanups) is inherited by fork, and Pool.terminate's SIGTERM then met workers inside
    the pool's own locks: a worker could exit holding the task queue's lock and leave the pool's
    join waiting for ever (seen once in CI's test_lora_e2e)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
