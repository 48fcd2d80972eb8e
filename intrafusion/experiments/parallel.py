"""Grid cells, and the sensitivity profile's rungs of `compress`, computed in other processes:
`--workers N` local processes, or Ray tasks on a cluster (`--ray-address`). A worker only
computes, with its own copy of the data, checkpoint and traced graph, held by the object that
load(config) builds (grid.load_run, compress.load_profile_run): whole chunks of cells
(GridRun.compute) or of rungs (ProfileRun.compute: a group's rungs), or, for local workers and
plain grid cells, the accuracies of variants the driver pruned on its shard of the test batches
(LocalPool.evaluate). The driver records each chunk's results as they arrive (the grid's CSV, the
profile cache), so resuming and the comparability checks are the serial run's, and a crash loses
only the chunks in flight."""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ..errors import IntraFusionError, check_at_least
from .allocator import release_large_buffers

# Called with no argument in every worker process before it loads the grid; a picklable
# (module-level) function. Tests point it at one registering their small models, which a fresh
# process would not otherwise build.
worker_setup: Callable[[], None] | None = None

RETRIES = 3  # Ray: retries of a task whose worker died; local: pools broken in a row

_cached: tuple | None = None  # (config, GridRun) of this worker process


def worker_compute(config, cells: list[tuple], load: Callable, setup: Callable[[], None] | None = None
                   ) -> tuple[list[dict], float]:
    """Worker side: the rows of `cells` (run.compute) and the unpruned accuracy, with this
    process's run of `config` (worker_load)."""
    run = worker_load(config, load, setup)
    return run.compute(cells), run.base_accuracy


def worker_evaluate(config, payload: bytes, load: Callable, setup: Callable[[], None] | None,
                    shard: tuple[int, int]) -> tuple[list[float], float, int]:
    """Worker side: the accuracies of the variants in `payload` (pack_variants) and of the
    unpruned network on the test batches of `shard` (i, n), and their number of images."""
    run = worker_load(config, load, setup)
    evaluator = run.evaluator_of(shard)
    accuracies = evaluator.evaluate(unpack_variants(run.base.model, payload))
    return accuracies, evaluator.base_accuracy, len(evaluator.labels)


def worker_load(config, load: Callable, setup: Callable[[], None] | None = None):
    """This process's run of `config`, load(config) (a module-level function, e.g. grid.load_run:
    an object with compute(cells), base_accuracy, evaluator_of(shard) and base): made (after
    `setup`) by the first call, then kept."""
    global _cached
    if _cached is None or _cached[0] != config:
        release_large_buffers()  # as the CLI does in the driver
        if setup is not None:
            setup()
        _cached = (config, load(config))
    return _cached[1]


def _base_tensors(base: nn.Module) -> dict:
    return {(t.data_ptr(), t.shape, t.dtype): name for name, t in base.state_dict(keep_vars=True).items()
            if t.numel()}


def pack_variants(base: nn.Module, variants) -> bytes:
    """Pruned variants (Pruners) of `base` as bytes: their models and channel maps, pickled with
    every tensor that uses base's storage (evaluator.share_unchanged) named instead of copied, so
    that only what pruning changed travels; unpack_variants takes the named ones from the
    receiver's copy of base (the same checkpoint, folded the same way)."""
    named = _base_tensors(base)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, torch.Tensor) and obj.numel():
                return named.get((obj.data_ptr(), obj.shape, obj.dtype))
            return None
    buffer = io.BytesIO()
    Pickler(buffer, pickle.HIGHEST_PROTOCOL).dump([(v.model, v.channel_map) for v in variants])
    return buffer.getvalue()


def unpack_variants(base: nn.Module, payload: bytes) -> list[SimpleNamespace]:
    """The variants of pack_variants, each with `model` and `channel_map` (what the evaluator
    uses), sharing base's tensors where the sender's shared its base's."""
    state = base.state_dict(keep_vars=True)

    class Unpickler(pickle.Unpickler):
        def persistent_load(self, name):
            return state[name]
    return [SimpleNamespace(model=m, channel_map=c) for m, c in Unpickler(io.BytesIO(payload)).load()]


def merge_shards(parts: list[tuple[list[float], float, int]]) -> tuple[list[float], float]:
    """The accuracies of the variants and of the unpruned network on the whole test set from
    their shards' (accuracies, unpruned accuracy, images): correct images summed over all the
    images, the serial run's numbers exactly."""
    total = sum(n for *_, n in parts)

    def merged(values) -> float:
        return sum(round(a * n) for a, (*_, n) in zip(values, parts)) / max(total, 1)
    return [merged(column) for column in zip(*(p[0] for p in parts))], merged([p[1] for p in parts])


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
    one process would), started when the pool opens. When one dies (killed, out of memory), the
    pool is replaced and the unfinished tasks are sent again; after RETRIES broken pools in a row
    with no task finished in between, the run stops with an IntraFusionError (what finished
    is written: a rerun resumes)."""

    def __init__(self, config, load: Callable, workers: int, setup: Callable[[], None] | None, log=print):
        self.config, self.load, self.workers, self.setup, self.log = config, load, workers, setup, log
        self.threads = max(1, torch.get_num_threads() // workers)
        self.executor: ProcessPoolExecutor | None = None

    @property
    def parallelism(self) -> int:
        """How many chunks are computed at once."""
        return self.workers

    @property
    def shards(self) -> int:
        """Into how many parts the test batches may be split (`evaluate`), one per worker."""
        return self.workers

    def _executor(self) -> ProcessPoolExecutor:
        if self.executor is None:
            self.executor = ProcessPoolExecutor(self.workers, multiprocessing.get_context("spawn"),
                                                _start_local_worker, (self.threads, os.getpid()))
        return self.executor

    def results(self, chunks: Iterable[list[tuple]]) -> Iterator[tuple[list[tuple], list[dict], float]]:
        """(chunk, its rows, the unpruned accuracy) for every chunk, in the order they finish."""
        chunks = list(chunks)
        tasks = {i: (worker_compute, self.config, chunk, self.load, self.setup) for i, chunk in enumerate(chunks)}
        for i, (rows, base_accuracy) in self._run(tasks):
            yield chunks[i], rows, base_accuracy

    def evaluate(self, base: nn.Module, variants, shards: int) -> tuple[list[float], float]:
        """The accuracies of `variants` (pruned copies of base, sharing its unchanged tensors)
        and of base on the test set, each of `shards` workers evaluating all of them on its
        part of the test batches (worker_evaluate); merged exactly (merge_shards)."""
        payload = pack_variants(base, variants)
        tasks = {s: (worker_evaluate, self.config, payload, self.load, self.setup, (s, shards)) for s in range(shards)}
        parts = dict(self._run(tasks))
        return merge_shards([parts[s] for s in range(shards)])

    def _run(self, tasks: dict) -> Iterator[tuple]:
        """(key, result) of every task {key: (function, *args)}, in the order they finish."""
        left = dict(tasks)
        broken = 0
        while left:
            try:
                futures = {self._executor().submit(*task): key for key, task in left.items()}
                died = False
            except BrokenProcessPool:  # a worker died while idle, or while it loaded (__enter__)
                futures, died = {}, True
            for future in as_completed(futures):
                if isinstance(future.exception(), BrokenProcessPool):
                    died = True
                    continue
                key = futures[future]
                del left[key]
                yield key, future.result()
                broken = 0
            if died:
                self.close(kill=True)
                broken += 1
                if broken == RETRIES:
                    raise IntraFusionError(
                        f"a worker process died {RETRIES} times in a row (killed, or out of memory?) "
                        f"with {len(left)} tasks left; what finished is saved, rerun "
                        "the same command to resume (with fewer --workers if memory is short)")
                self.log(f"a worker process died (killed, or out of memory?); the {len(left)} "
                         "unfinished tasks go to new processes")

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
            self._executor().submit(worker_load, self.config, self.load, self.setup)
        return self

    def __exit__(self, kind, *_):
        self.close(kill=kind is not None)


class RayPool:
    """Chunks as Ray tasks on the cluster at `address` ("auto": the one started on this machine;
    an existing connection of this process is used as it is), each asking for one CPU and
    `gpus` GPUs (Ray sets the task's CUDA_VISIBLE_DEVICES; without GPUs it computes on the CPU).
    A task whose worker dies is run again, up to RETRIES times. Every node needs intrafusion
    installed and the data and checkpoint at the driver's paths."""

    def __init__(self, config, load: Callable, address: str, gpus: float, setup: Callable[[], None] | None):
        self.config = dataclasses.replace(config, device="cuda" if gpus else "cpu")
        self.load = load
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

    def results(self, chunks: Iterable[list[tuple]]) -> Iterator[tuple[list[tuple], list[dict], float]]:
        """(chunk, its rows, the unpruned accuracy) for every chunk, in the order they finish."""
        import ray
        self.pending = {self.task.remote(self.config, chunk, self.load, self.setup): chunk for chunk in chunks}
        while self.pending:
            (ref,), _ = ray.wait(list(self.pending), num_returns=1)
            chunk = self.pending.pop(ref)
            try:
                rows, base_accuracy = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the cells' own error, e.g. an IntraFusionError
                raise exc.cause from None
            except ray.exceptions.RayError as exc:
                raise IntraFusionError(
                    f"Ray could not compute {chunk[0][:3]} after {RETRIES} retries "
                    f"({str(exc).splitlines()[0]}); what finished is saved, rerun the "
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


def check_pool(config) -> None:
    """IntraFusionError for pool settings of `config` (workers, ray_address, gpus_per_worker, as
    --workers, --ray-address and --gpus-per-worker) that cannot work, before anything is loaded."""
    check_at_least(("--workers", config.workers, 1), ("--gpus-per-worker", config.gpus_per_worker, 0))
    if config.ray_address is None:
        if config.gpus_per_worker:
            raise IntraFusionError("--gpus-per-worker is for Ray tasks (with --ray-address); "
                                   "local --workers compute on the --gpu_id device")
    elif config.workers != 1:
        raise IntraFusionError("--workers is for local processes; with --ray-address the cluster's "
                               "free CPUs (and GPUs) decide how many tasks run at once")
    elif not config.ray_address.strip():
        raise IntraFusionError("--ray-address must be a Ray cluster address or 'auto'")
    elif importlib.util.find_spec("ray") is None:
        raise IntraFusionError('--ray-address needs Ray: pip install "intrafusion[ray]"')


def open_pool(config, load: Callable, log=print):
    """The context manager of the pool that computes `config`'s cells away from the driver, each
    worker holding load(config) (worker_load): a
    RayPool with `ray_address`, a LocalPool with more than one worker, else None (the driver
    computes them itself). `log` takes the pool's one-line news."""
    if config.ray_address:
        return RayPool(config, load, config.ray_address, config.gpus_per_worker, worker_setup)
    if config.workers > 1:
        return LocalPool(config, load, config.workers, worker_setup, log)
    return nullcontext()
