"""Run a test body in N real processes (gloo, CPU) with a hard timeout, so a failure never hangs.

``run_workers(fn, *args, world_size=2)`` spawns ``fn(rank, world_size, *args)`` in fresh
interpreters with the torch.distributed environment variables set (MASTER_ADDR/PORT, RANK,
WORLD_SIZE, LOCAL_RANK), re-raising the first worker traceback in the test process. ``fn`` must be
importable (module level in a module under ``tests/``); it calls :func:`init_gloo` itself, or lets
``accelerate.Accelerator`` initialize the process group.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from datetime import timedelta

from .helpers import free_port


def init_gloo(timeout_s: float = 120.0) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))


def _entry(fn, rank: int, world_size: int, port: int, args: tuple, errors) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        fn(rank, world_size, *args)
    except BaseException:
        _report(errors, (rank, traceback.format_exc()), code=1)
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    finally:
        _report(errors, (rank, None), code=0)


def _report(errors, item, code: int) -> None:
    errors.put(item)
    errors.close()
    errors.join_thread()  # flush to the parent before exiting
    os._exit(code)  # skip interpreter teardown (gloo / DeepSpeed atexit hooks can hang)


def run_workers(fn, *args, world_size: int = 2, timeout: float = 240.0) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, world_size, port, args, errors), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    results: dict[int, str | None] = {}
    failure = None
    while len(results) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            failure = f"timed out after {timeout:.0f}s (finished ranks: {sorted(results)})"
            break
        try:
            rank, err = errors.get(timeout=min(remaining, 1.0))
        except Exception:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead and errors.empty():
                time.sleep(0.5)
                if errors.empty():
                    failure = f"worker exited with code {dead[0].exitcode} without a report"
                    break
            continue
        results[rank] = err
        if err is not None:
            failure = f"rank {rank} failed:\n{err}"
            break
    for p in procs:
        p.join(timeout=5 if failure is None else 0.5)
        if p.is_alive():
            p.kill()
            p.join()
    if failure:
        raise AssertionError(failure)
