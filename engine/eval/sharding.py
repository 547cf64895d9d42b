"""The adaptive evaluation sharded over worker processes or Ray tasks: whole batches per task, so every batch is
computed exactly as in one process (the merged report equals a one-process run, tested).

    raw = run_local(workers=2, load_kw=..., ...)      # local spawned processes, one torch thread each by default
    raw = run_ray("auto", load_kw=..., ...)           # Ray tasks (the `ray` extra)
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
from typing import Callable

import torch
from tqdm import tqdm

from ..data import classifier_for, load_dataset
from ..errors import require_extra
from ..models import preprocessing_of
from ..precision import DTYPES
from .suite import Suite, evaluate_batches, merge


def shard_task(load_kw: dict, defenses, eps_list, batches, seed, suite_dict, threads: int = 1,
               ticks=None) -> dict:
    """One worker's share (Ray task or local process): whole batches, computed exactly as in one process.
    `load_kw` rebuilds the classifier and images (model, pretrained, dataset, n_images, templates, device) and says
    how the defenses run (dtype name, backend). `ticks`: a queue that gets one label per finished (batch, attack)
    job (local workers' progress bar)."""
    torch.set_num_threads(threads)
    templates = load_kw["templates"]
    data = load_dataset(load_kw["dataset"], preprocessing_of(load_kw["model"]), load_kw["n_images"])
    clf = classifier_for(data, load_kw["model"], load_kw["pretrained"], templates, load_kw["device"])
    if load_kw.get("tau_reference") is not None:  # a fine-tuned model: TTC's gate on its frozen original
        clf.tau_reference = classifier_for(data, load_kw["model"], load_kw["tau_reference"]["pretrained"], templates,
                                           load_kw["device"])
    x_all, y_all = data.images.to(load_kw["device"]), data.targets.to(load_kw["device"])
    suite = Suite(**{**suite_dict, "attacks": tuple(suite_dict["attacks"]),
                     "checkpoints": tuple(suite_dict["checkpoints"])})
    return evaluate_batches(clf, defenses, eps_list, x_all, y_all, batches, seed, suite, progress=False,
                            on_job=None if ticks is None else ticks.put, dtype=DTYPES[load_kw["dtype"]],
                            backend=load_kw["backend"])


_TICKS = None  # in a local worker process: the queue its finished jobs are announced on (run_local)


def _init_worker(ticks) -> None:
    """A local worker: remember the progress queue; a thread lock for tqdm (its default, a multiprocessing lock,
    would be reported leaked when an interrupted run stops the worker; a worker draws no bar)."""
    global _TICKS
    _TICKS = ticks
    tqdm.set_lock(threading.RLock())


def _local_shard(*args) -> dict:
    return shard_task(*args, ticks=_TICKS)


@contextlib.contextmanager
def _sigint_ignored():
    """Processes started inside inherit an ignored SIGINT: Ctrl-C reaches the driver only, which stops them.
    (Only the main thread sets signal handlers; elsewhere the block runs unchanged.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def default_workers(device: str) -> int:
    """Local worker processes for `--workers auto`: one per usable CPU core on the CPU (one torch thread each;
    two threads in one process were measured no faster than one on this suite's small batches), one on a GPU."""
    if str(device).startswith("cuda"):
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def run_local(workers: int, load_kw: dict, defenses, eps_list, batches, seed, suite: Suite, progress,
              n_jobs: int, threads: int = 1, on_batch: Callable[[dict], None] | None = None) -> dict:
    """Batches over `workers` local processes (spawned, `threads` torch threads each), one task per batch so the
    pool balances itself; on_batch(part) gets each finished batch's results. Ctrl-C or SIGTERM (a
    KeyboardInterrupt here) stops the workers, which ignore SIGINT themselves, and goes on to the caller."""
    import multiprocessing
    import queue
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")
    ticks = ctx.Queue()
    stop = threading.Event()

    def drain():
        while not stop.is_set():
            try:
                label = ticks.get(timeout=0.2)
            except queue.Empty:
                continue
            bar.set_postfix_str(label)
            bar.update(1)

    def stop_reading():  # before any worker is stopped: one killed mid-message would block a read for ever
        stop.set()
        reader.join()

    parts = []
    with tqdm(total=len(batches) * n_jobs, desc=f"adaptive eval ({workers} workers)", disable=not progress) as bar:
        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(ticks,)) as pool:
                args = (load_kw, list(defenses), list(eps_list))
                suite_dict = dataclasses.asdict(suite)
                before = {p.pid for p in multiprocessing.active_children()}
                with _sigint_ignored():  # the workers start here
                    pending = [pool.submit(_local_shard, *args, [b], seed, suite_dict, threads) for b in batches]
                started = [p for p in multiprocessing.active_children() if p.pid not in before]
                try:
                    while pending:
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in done:
                            pending.remove(fut)
                            parts.append(fut.result())
                            if on_batch is not None:
                                on_batch(parts[-1])
                except KeyboardInterrupt:  # the pool then fails the pending batches, and its exit returns at once
                    stop_reading()
                    for process in started:
                        process.terminate()
                    raise
        finally:
            stop_reading()
            ticks.close()
    return merge(parts)


def run_ray(address: str, load_kw: dict, defenses, eps_list, batches, seed, suite: Suite, progress,
            on_batch: Callable[[dict], None] | None = None) -> dict:
    """Round-robin shards of whole batches over Ray tasks (one per CPU, or per GPU with a CUDA device);
    on_batch(part) gets each finished shard's results."""
    require_extra("ray", what="--ray")
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        # Ray starts its workers at niceness 15 by default: on a shared machine they then crawl behind every other
        # job while the driver waits. The workers are the evaluation here, so run them at the normal priority.
        os.environ.setdefault("RAY_worker_niceness", "0")
        if address == "auto" and not os.environ.get("RAY_ADDRESS"):
            ray.init(address="local", include_dashboard=False)
        else:
            ray.init(address=address)
    try:
        slots = int(ray.available_resources().get("GPU", 0)) if load_kw["device"].startswith("cuda") else 0
        slots = slots or max(1, int(ray.available_resources().get("CPU", 1)))
        # sanity batches (the first images) are spread like the others; shards = round-robin whole batches
        shards = [batches[i::slots] for i in range(min(slots, len(batches)))]
        resources = {"num_gpus": 1} if load_kw["device"].startswith("cuda") else {"num_cpus": 1}
        task = ray.remote(**resources)(shard_task)
        futures = [task.remote(load_kw, list(defenses), list(eps_list), shard, seed, dataclasses.asdict(suite))
                   for shard in shards]
        parts = []
        with tqdm(total=len(futures), desc=f"ray shards ({len(futures)} tasks)", disable=not progress) as bar:
            pending = list(futures)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                parts.append(ray.get(done[0]))
                if on_batch is not None:
                    on_batch(parts[-1])
                bar.update(1)
        return merge(parts)
    finally:
        if started_here:
            ray.shutdown()
