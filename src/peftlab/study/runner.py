"""Running a study's cells: each under its lock, alone or in a pack, in this process, in
worker processes or as Ray tasks; a failure is recorded in the run's folder, never raised."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from peftlab.config import RunConfig
from peftlab.device import gpu_count, worker_gpus
from peftlab.errors import STORAGE_ERRNOS, PeftlabError, describe_os_error
from peftlab.files import write_json
from peftlab.locks import describe_holder, run_lock
from peftlab.records import CELL_FILE, SUMMARY, read_json
from peftlab.run import run, run_pack
from peftlab.study.planning import pack_name, packs
from peftlab.study.spec import Cell

log = logging.getLogger("peftlab")


def run_cells(configs: list[dict[str, Any]], labels: list[dict[str, Any]],
              progress: bool = False, pack_id: str | None = None) -> list[str]:
    """Run cells as one pack (peftlab.pack), each under its lock; a cell another process
    holds, or has finished since the grid was listed, is left out. A pack that fails is run
    again one cell at a time, so that a failure is recorded in the cell that caused it (a
    cell resumes alone from its pack's checkpoint: the files are the same)."""
    cfgs = [RunConfig.model_validate(c) for c in configs]
    statuses: list[str | None] = [None] * len(cfgs)
    with contextlib.ExitStack() as held:
        ready = []
        for i, cfg in enumerate(cfgs):
            run_dir = Path(cfg.output_dir)
            holder = held.enter_context(run_lock(run_dir))
            if holder is not None:
                statuses[i] = f"locked: {describe_holder(holder)}"
            elif (run_dir / SUMMARY).exists():
                statuses[i] = "skipped"  # another runner finished it since the grid was listed
            else:
                ready.append(i)
        if len(ready) > 1:
            try:
                for i in ready:
                    write_json(Path(cfgs[i].output_dir) / CELL_FILE, labels[i])
                summaries = run_pack([cfgs[i] for i in ready], progress=progress, locked=True,
                                     pack_id=pack_id)
                for i, summary in zip(ready, summaries):
                    statuses[i] = summary["status"]
                ready = []
            except OSError as e:
                if e.errno in STORAGE_ERRNOS:  # every later run would fail the same way: stop
                    raise PeftlabError(f"the study stopped at a pack of {len(ready)} cells: "
                                       f"{describe_os_error(e)}") from None
            except Exception as e:  # noqa: BLE001 - each cell alone records its own failure
                log.warning("a pack of %d cells failed (%s: %s); its cells run one by one",
                            len(ready), type(e).__name__, e)
        for i in ready:
            summary = Path(cfgs[i].output_dir) / SUMMARY
            statuses[i] = (read_json(summary).get("status", "failed") if summary.exists()
                           else _run_alone(cfgs[i], labels[i], progress))
    return [s or "failed" for s in statuses]


def _run_alone(cfg: RunConfig, labels: dict[str, Any], progress: bool) -> str:
    """One cell whose lock this process holds."""
    run_dir = Path(cfg.output_dir)
    try:
        write_json(run_dir / CELL_FILE, labels)
        return run(cfg, progress=progress, locked=True)["status"]
    except OSError as e:
        if e.errno in STORAGE_ERRNOS:  # every later run would fail the same way: stop
            raise PeftlabError(f"the study stopped at cell {run_dir}: "
                               f"{describe_os_error(e)}") from None
        return _record_failure(run_dir, cfg, e)
    except Exception as e:  # noqa: BLE001 - a failed run is a result, not the end of a study
        return _record_failure(run_dir, cfg, e)


def _record_failure(run_dir: Path, cfg: RunConfig, e: Exception) -> str:
    write_json(run_dir / SUMMARY, {
        "status": "failed", "method": cfg.method, "task": cfg.task,
        "train_size": cfg.train_size, "seed": cfg.seed, "learning_rate": cfg.learning_rate,
        "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=20),
    })
    return "failed"


def _exit_with_parent(parent: int) -> None:
    """A worker's watchdog: when the study's main process is gone (killed with SIGKILL, say)
    the worker is re-parented; it then exits at once instead of running the queue on alone.
    Its run folder's lock dies with it (peftlab.locks), and its files are atomic."""
    while True:
        if os.getppid() != parent:
            os._exit(3)
        time.sleep(0.5)


def _init_worker(gpu_queue: Any, parent: int) -> None:
    """Pin a worker process to one GPU (several workers may share it) before torch starts,
    and tie its life to the main process."""
    if gpu_queue is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_queue.get())
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def default_workers(cells: list[Cell], runs_per_gpu: int) -> int:
    """Runs (or packs) at a time when --workers is not given: runs_per_gpu per GPU; on CPU as
    many as the CPUs hold at the cells' own thread counts (1 each by default in a study), and
    no more than there are cells (packs are split to fill the workers: `packs`)."""
    gpus = gpu_count()
    if gpus:
        return gpus * runs_per_gpu
    threads = max((c.config.cpu_threads or 1 for c in cells), default=1)
    return max(1, min(len(cells), (os.cpu_count() or 1) // threads))


class StudyProgressLines:
    """Without a terminal the study's bar is off: a log line every `PEFTLAB_PROGRESS_SECONDS`
    (default 30) instead, from a timer thread, so a long pack still shows the study is alive
    (a job log showed nothing for 8 minutes between the plan and the final count)."""

    def __init__(self, total: int, counts: dict[str, int], enabled: bool):
        self.total, self.counts = total, counts
        self.began = time.perf_counter()
        self.stopped = threading.Event()
        self.every = float(os.environ.get("PEFTLAB_PROGRESS_SECONDS", "30"))
        self.thread = threading.Thread(target=self._loop, daemon=True) if enabled else None
        if self.thread is not None:
            self.thread.start()

    def line(self) -> str:
        done = sum(self.counts.values())
        elapsed = time.perf_counter() - self.began
        eta = (self.total - done) * elapsed / done if done else None
        statuses = ", ".join(f"{n} {status}" for status, n in sorted(self.counts.items()))
        return (f"study: {done}/{self.total} runs done" + (f" ({statuses})" if statuses else "")
                + f", {elapsed / 60:.1f} min so far, ETA "
                + (f"{eta / 60:.1f} min" if eta is not None else "-"))

    def _loop(self) -> None:
        while not self.stopped.wait(self.every):
            log.info(self.line())

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()


@dataclass
class Outcome:
    counts: dict[str, int]
    locked: list[str]  # "cell key: holder"


def execute(cells: list[Cell], workers: int = 1, backend: Literal["local", "ray"] = "local",
            address: str | None = None, runs_per_gpu: int = 1,
            progress: bool = True, pack: int = 1,
            groups: list[list[Cell]] | None = None) -> Outcome:
    """Run the cells, in packs of up to `pack` (see `packs`): a worker, a Ray task or a GPU
    slot runs one pack at a time. `groups`: the packs a caller already made of `cells` (and
    showed), run as they are. Returns how many ended in each status, and the cells other
    processes held."""
    from tqdm.auto import tqdm

    counts: dict[str, int] = {}
    locked: list[str] = []
    bar = tqdm(total=len(cells), desc="study", unit="run", disable=not progress or None)
    lines = StudyProgressLines(len(cells), counts, enabled=progress and bar.disable)

    def done(cell: Cell, status: str) -> None:
        if status.startswith("locked: "):
            locked.append(f"{cell.key} ({status.removeprefix('locked: ')})")
            status = "locked"
        counts[status] = counts.get(status, 0) + 1
        bar.update(1)
        bar.set_postfix(counts)

    def arguments(group: list[Cell]) -> tuple:
        return ([c.config.model_dump() for c in group], [c.labels for c in group])

    def finished(group: list[Cell], statuses: list[str]) -> None:
        for cell, status in zip(group, statuses):
            done(cell, status)

    try:
        if groups is None:
            groups = packs(cells, pack, slots=workers if backend == "local" else 1)
        _execute_groups(groups, workers, backend, address, runs_per_gpu, progress, arguments,
                        finished)
    finally:
        bar.close()
        lines.stop()
    return Outcome(counts, locked)


def _execute_groups(groups: list[list[Cell]], workers: int, backend: str, address: str | None,
                    runs_per_gpu: int, progress: bool, arguments: Callable,
                    finished: Callable) -> None:
    """Each group (pack) on the backend: in this process, in worker processes, or on Ray."""
    if backend == "ray":
        _execute_ray(groups, address, runs_per_gpu, finished)
    elif workers <= 1:
        for group in groups:
            finished(group, run_cells(*arguments(group), progress=progress,
                                      pack_id=pack_name(group)))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = mp.get_context("spawn")  # no forked torch state in the workers
        gpus = gpu_count()
        queue = None
        if gpus:
            queue = ctx.Queue()  # handed over at spawn: no manager process to outlive us
            visible = worker_gpus(gpus)
            for i in range(workers):
                queue.put(visible[i % gpus])  # runs_per_gpu workers per GPU
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(queue, os.getpid())) as pool:
            futures = {pool.submit(run_cells, *arguments(g), pack_id=pack_name(g)): g
                       for g in groups}
            for future in as_completed(futures):
                finished(futures[future], future.result())


# What a run reads from its environment: a Ray worker started elsewhere must see the same
# (the data folder a config leaves to $PEFTLAB_DATA_DIR, offline switches, caches).


FORWARDED_ENV = ("PEFTLAB_DATA_DIR", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_DATASETS_CACHE")


def _execute_ray(groups: list[list[Cell]], address: str | None, runs_per_gpu: int,
                 finished: Any) -> None:
    try:
        import ray
    except ImportError:
        raise PeftlabError("--backend ray needs Ray: pip install 'peftlab[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        env = {k: os.path.abspath(v) if k == "PEFTLAB_DATA_DIR" else v
               for k in FORWARDED_ENV if (v := os.environ.get(k))}
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env})
    gpus = ray.cluster_resources().get("GPU", 0)
    threads = max((c.config.cpu_threads or 1 for g in groups for c in g), default=1)
    remote = ray.remote(num_cpus=threads, num_gpus=(1 / runs_per_gpu) if gpus else 0)(run_cells)
    refs = {remote.remote([c.config.model_dump() for c in g], [c.labels for c in g],
                          pack_id=pack_name(g)): g for g in groups}
    pending_refs = list(refs)
    try:
        while pending_refs:
            ready, pending_refs = ray.wait(pending_refs, num_returns=1)
            finished(refs[ready[0]], ray.get(ready[0]))
    finally:
        if started_here:
            ray.shutdown()
