"""Grid cells computed in other processes: `--workers N` local processes, or Ray tasks on a cluster
(`--ray-address`). A worker only computes (GridRun.compute on the chunks it is sent, or on its
shard of their test batches, with its own copy of the data, checkpoint and traced graph); the
driver records each chunk's rows as they arrive, so the CSV, resuming and the comparability checks
are the serial run's, and a crash loses only the chunks in flight."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import nullcontext
from typing import Callable, Iterable, Iterator

import torch

from ..errors import IntraFusionError

# Called with no argument in every worker process before it loads the grid; a picklable
# (module-level) function. Tests point it at one registering their small models, which a fresh
# process would not otherwise build.
worker_setup: Callable[[], None] | None = None

RETRIES = 3  # Ray: retries of a task whose worker died; local: pools broken in a row

_cached: tuple | None = None  # (config, GridRun) of this worker process


def worker_compute(config, cells: list[tuple], setup: Callable[[], None] | None = None,
                   shard: tuple[int, int] | None = None) -> tuple[list[dict], float, int]:
    """Worker side: the rows of `cells` (GridRun.compute) on the test batches of `shard` (i, n)
    (None: all), the unpruned accuracy on them and their number of images, with this process's
    GridRun for `config`, loaded by its first task (after `setup`) and kept for the next ones."""
    run = worker_load(config, setup)
    rows = run.compute(cells, shard)
    evaluator = run.evaluator_of(shard)
    return rows, evaluator.base_accuracy, len(evaluator.labels)


def worker_load(config, setup: Callable[[], None] | None = None):
    """This process's GridRun for `config`: loaded (after `setup`) by the first call, then kept."""
    global _cached
    if _cached is None or _cached[0] != config:
        from .grid import GridRun
        if setup is not None:
            setup()
        _cached = (config, GridRun(config, output=False))
    return _cached[1]


def merge_shards(parts: list[tuple[list[dict], float, int]]) -> tuple[list[dict], float]:
    """One chunk's rows and the unpruned accuracy from its shards' (rows, unpruned accuracy,
    images): each accuracy is the shards' correct images summed over all images, the serial
    run's number exactly; the rest of a row is the first shard's (prune_seconds the longest)."""
    total = sum(n for *_, n in parts)

    def merged(accuracies) -> float:
        return sum(round(a * n) for a, (*_, n) in zip(accuracies, parts)) / max(total, 1)
    rows = [dict(row, accuracy=merged([p[0][k]["accuracy"] for p in parts]),
                 prune_seconds=max(p[0][k]["prune_seconds"] for p in parts))
            for k, row in enumerate(parts[0][0])]
    return rows, merged([base for _, base, _ in parts])


def _start_local_worker(threads: int, driver: int) -> None:
    """A local worker's start: its share of the cores, Ctrl-C left to the driver, and an exit
    when the driver is gone (killed with -9, it cannot stop its workers)."""
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_without, args=(driver,), daemon=True).start()


def _exit_without(driver: int) -> None:
    while os.getppid() == driver:
        time.sleep(1)
    os._exit(1)


class LocalPool:
    """`workers` spawned processes with cores/workers torch threads each (N workers use the cores
    one process would), started on first use. When one dies (killed, out of memory), the pool is
    replaced and the unfinished chunks are sent again; after RETRIES broken pools in a row with no
    chunk finished in between, the run stops with an IntraFusionError (the finished rows are
    written: a rerun resumes)."""

    def __init__(self, config, workers: int, setup: Callable[[], None] | None, log=print):
        self.config, self.workers, self.setup, self.log = config, workers, setup, log
        self.threads = max(1, torch.get_num_threads() // workers)
        self.executor: ProcessPoolExecutor | None = None

    @property
    def parallelism(self) -> int:
        """How many chunks are computed at once."""
        return self.workers

    @property
    def shards(self) -> int:
        """Into how many parts a chunk's test batches may be split, one per worker."""
        return self.workers

    def _executor(self) -> ProcessPoolExecutor:
        if self.executor is None:
            self.executor = ProcessPoolExecutor(self.workers, multiprocessing.get_context("spawn"),
                                                _start_local_worker, (self.threads, os.getpid()))
        return self.executor

    def results(self, chunks: Iterable[list[tuple]], shards: int = 1
                ) -> Iterator[tuple[list[tuple], list[dict], float]]:
        """(chunk, its rows, the unpruned accuracy) for every chunk, in the order they finish;
        with shards > 1 each chunk is `shards` tasks, one per part of the test batches."""
        chunks = list(chunks)
        left = {(i, s): chunk for i, chunk in enumerate(chunks) for s in range(shards)}
        parts: dict[int, dict[int, tuple]] = {}
        broken = 0
        while left:
            try:
                futures = {self._executor().submit(worker_compute, self.config, chunk, self.setup,
                                                   (s, shards) if shards > 1 else None): (i, s)
                           for (i, s), chunk in left.items()}
                died = False
            except BrokenProcessPool:  # a worker died while idle, or while it loaded (__enter__)
                futures, died = {}, True
            for future in as_completed(futures):
                if isinstance(future.exception(), BrokenProcessPool):
                    died = True
                    continue
                i, s = futures[future]
                del left[i, s]
                parts.setdefault(i, {})[s] = future.result()
                broken = 0
                if len(parts[i]) == shards:
                    done = parts.pop(i)
                    yield chunks[i], *merge_shards([done[k] for k in range(shards)])
            if died:
                unfinished = len({i for i, _ in left})
                self.close(kill=True)
                broken += 1
                if broken == RETRIES:
                    raise IntraFusionError(
                        f"a worker process died {RETRIES} times in a row (killed, or out of memory?) "
                        f"with {unfinished} chunks of cells left; the finished rows are saved, rerun "
                        "the same command to resume (with fewer --workers if memory is short)")
                self.log(f"a worker process died (killed, or out of memory?); the {unfinished} "
                         "unfinished chunks of cells go to new processes")

    def close(self, kill: bool = False) -> None:
        """Stop the workers: once idle, or at once with `kill` (Ctrl-C, an error, a broken pool)."""
        if self.executor is not None:
            if kill:  # Python 3.14 has executor.terminate_workers() for this
                for process in list((self.executor._processes or {}).values()):
                    process.kill()
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None

    def __enter__(self):
        """Start the workers loading the grid (worker_load) now, while the driver loads its own
        copy; a failure there is met again, and reported, by the worker's first chunk."""
        for _ in range(self.workers):
            self._executor().submit(worker_load, self.config, self.setup)
        return self

    def __exit__(self, kind, *_):
        self.close(kill=kind is not None)


class RayPool:
    """Chunks as Ray tasks on the cluster at `address` ("auto": the one started on this machine;
    an existing connection of this process is used as it is), each asking for one CPU and
    `gpus` GPUs (Ray sets the task's CUDA_VISIBLE_DEVICES; without GPUs it computes on the CPU).
    A task whose worker dies is run again, up to RETRIES times. Every node needs intrafusion
    installed and the data and checkpoint at the driver's paths."""

    def __init__(self, config, address: str, gpus: float, setup: Callable[[], None] | None):
        self.config = dataclasses.replace(config, device="cuda" if gpus else "cpu")
        self.address, self.gpus, self.setup = address, gpus, setup
        self.task = None
        self.connected = False
        self.pending: dict = {}  # ObjectRef: chunk, of the tasks not yet recorded

    shards = 1  # a task computes whole cells: the cluster's nodes need not share a test set

    @property
    def parallelism(self) -> int:
        """How many chunks the cluster computes at once: its CPUs, or its GPUs' share."""
        import ray
        resources = ray.cluster_resources()
        tasks = resources.get("CPU", 1)
        if self.gpus:
            tasks = min(tasks, resources.get("GPU", 0) / self.gpus)
        return max(1, int(tasks))

    def results(self, chunks: Iterable[list[tuple]], shards: int = 1
                ) -> Iterator[tuple[list[tuple], list[dict], float]]:
        """(chunk, its rows, the unpruned accuracy) for every chunk, in the order they finish
        (`shards` is always 1 here)."""
        import ray
        self.pending = {self.task.remote(self.config, chunk, self.setup): chunk for chunk in chunks}
        while self.pending:
            (ref,), _ = ray.wait(list(self.pending), num_returns=1)
            chunk = self.pending.pop(ref)
            try:
                rows, base_accuracy, _ = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the cells' own error, e.g. an IntraFusionError
                raise exc.cause from None
            except ray.exceptions.RayError as exc:
                raise IntraFusionError(
                    f"Ray could not compute {chunk[0][:3]} after {RETRIES} retries "
                    f"({str(exc).splitlines()[0]}); the finished rows are saved, rerun the "
                    "same command to resume") from exc
            yield chunk, rows, base_accuracy

    def __enter__(self):
        """Connect (before the driver computes anything) and define the task."""
        import ray
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, logging_level=logging.WARNING)
            except ConnectionError as exc:
                raise IntraFusionError(f"cannot reach the Ray cluster at {self.address}: "
                                       f"{str(exc).splitlines()[0]}") from exc
            self.connected = True
        self.task = ray.remote(num_cpus=1, num_gpus=self.gpus, max_retries=RETRIES)(worker_compute)
        return self

    def __exit__(self, *_):
        """Cancel the tasks left by an error or Ctrl-C; disconnect if this pool connected."""
        import ray
        for ref in self.pending:
            ray.cancel(ref, force=True)
        if self.connected:
            ray.shutdown()


def split_lines(cells: list[tuple], parts: int) -> list[list[tuple]]:
    """`cells` dealt into at most `parts` parts of whole lines (the cells that differ only in
    their method), line by line in turn, so that cheap and costly groups and sparsities spread
    evenly over the workers."""
    lines = [list(line) for _, line in itertools.groupby(cells, key=lambda c: (*c[:3], *c[4:]))]
    return [sum(lines[i::parts], []) for i in range(min(parts, len(lines)))]


def open_pool(config, log=print):
    """The context manager of the pool that computes `config`'s cells away from the driver: a
    RayPool with `ray_address`, a LocalPool with more than one worker, else None (the driver
    computes them itself). `log` takes the pool's one-line news."""
    if config.ray_address:
        return RayPool(config, config.ray_address, config.gpus_per_worker, worker_setup)
    if config.workers > 1:
        return LocalPool(config, config.workers, worker_setup, log)
    return nullcontext()
