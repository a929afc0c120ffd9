"""The converter's per-matrix work spread over forked worker processes.

GPTQ and the layout table are sequences of small numpy steps that hold the GIL, one task per
matrix (or per group of matrices sharing an input), independent of each other: threads would take
turns, so the tasks run in forked processes, each with single-threaded BLAS. Forking lets the
workers inherit what the tasks read (the loaded source, the Hessians) without pickling it: the
caller passes it as `shared`, which task functions read with shared().
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

_SHARED: dict = {}  # what the forked workers read; set by forked_map before it forks


def shared() -> dict:
    """Inside a task: the `shared` dict given to forked_map."""
    return _SHARED


def forked_map(task: Callable, items: Iterable, shared: dict, processes: int | None = None) -> Iterator:
    """task(item) for every item, in the order they finish. task must be a module-level function
    (it is pickled by name) and reads `shared` through shared(). processes: default the CPUs this process
    may use (_core.default_threads: its affinity mask, at most its container's CPU quota),
    at most one per item; 1, or no fork on this platform: in this process. BLAS runs single-threaded
    in every process while the tasks run. A task's exception is raised here; a worker that dies (the
    kernel's out-of-memory killer, a signal) raises RuntimeError saying so, where multiprocessing.Pool
    waited for its task for ever. A caller that stops reading early (or an error) ends the workers."""
    from threadpoolctl import threadpool_limits

    from .. import _core

    items = list(items)
    processes = min(processes or _core.default_threads(), len(items))
    _SHARED.clear()
    _SHARED.update(shared)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            if processes > 1 and "fork" in multiprocessing.get_all_start_methods():
                yield from _in_forked_workers(task, items, processes)
            else:
                for item in items:
                    yield task(item)
    finally:
        _SHARED.clear()


def _in_forked_workers(task: Callable, items: list, processes: int) -> Iterator:
    """forked_map's results from `processes` forked workers (concurrent.futures: a worker's death
    breaks the pool, which raises, rather than losing the task)."""
    before = set(multiprocessing.active_children())
    executor, finished = None, False
    # the workers are forked by the first submit, in this thread, with these signals blocked: none can
    # reach a handler inherited from this process before _default_signals runs (then a pending one acts)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
    try:
        try:
            executor = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"),
                                           initializer=_default_signals, initargs=(os.getpid(),))
            futures = [executor.submit(task, item) for item in items]
        finally:  # a Ctrl-C or SIGTERM that came meanwhile acts here, inside the `try` that ends the workers
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for future in as_completed(futures):
            try:
                result = future.result()
            except BrokenProcessPool as e:
                if e.__cause__ is not None:  # (concurrent.futures: reading a worker's answer failed; the
                    # cause is that traceback's text, whose last line says why)
                    why = [line for line in str(e.__cause__).splitlines() if line.strip(" '")][-1:]
                    raise RuntimeError("a task's result or error could not be read back from its worker process "
                                       f"of the conversion: {''.join(why)[:500]}") from e
                raise RuntimeError(f"a worker process of the conversion died ({e}): killed by the system for "
                                   "lack of memory, or by a signal; try fewer processes or more memory") from e
            yield result
        finished = True
    finally:
        if executor is not None:
            executor.shutdown(wait=finished, cancel_futures=True)
        if not finished:  # early exit or error: a running task is not waited for
            workers = [p for p in multiprocessing.active_children() if p not in before]
            for worker in workers:
                worker.terminate()  # SIGTERM: _default_signals made it fatal
            for worker in workers:
                worker.join(5)
                if worker.is_alive():
                    worker.kill()
                    worker.join()


_WORKER_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _default_signals(parent: int) -> None:
    """In a forked worker, first thing: SIGTERM kills it at once again, and SIGINT is ignored (Ctrl-C
    reaches the whole process group; the parent's KeyboardInterrupt ends the workers). The CLI's handler
    (SystemExit, for the parent's cleanups) is inherited by fork, and a SIGTERM then met workers inside
    the pool's own locks: a worker could exit holding the task queue's lock and leave the pool's join
    waiting for ever (seen once in CI's test_lora_e2e). forked_map forks with both signals blocked, so
    one sent before this ran waited and acts now. Then the worker asks for SIGTERM when `parent` (the
    process that forked it) dies."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _end_with(parent)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_SIGNALS)


def _end_with(parent: int) -> None:
    """SIGTERM to this process when its parent dies (Linux's PR_SET_PDEATHSIG; elsewhere nothing). A
    parent killed outright (SIGKILL, the out-of-memory killer) ends no worker: they waited for ever on
    the pool's pipes, each holding its copy of the model's tensors (~640 MB each for SmolLM2)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # it died before the request: no signal will come
        os._exit(1)
