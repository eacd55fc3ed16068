"""The Ray engine: the local engine's shards scored by a pool of Ray actors, one model per actor.

Everything but the computing is the local engine's (engines.local): the driver validates every structure and
checks the output before Ray is touched (the same errors as `--engine local`), keeps the manifest and the shard
store, writes each shard the moment an actor returns it (so a killed driver or worker loses only the shards in
flight, and a rerun resumes, refusing changed settings or inputs by name), and makes the one ordered output file
(or, as_folder, the folder of shards). Shards of a local run and of a Ray run hold the same structures, keys and
values (floats to round-off: an actor's torch thread count changes the order of sums), and either engine resumes
the other's work folder.

Why actors with a task queue rather than Ray Data: the unit of work, of resume and of output is our shard, whose
records the driver has already read and validated, so there is nothing for a Ray Data reader to do; its blocks
are Arrow tables, in which ASE structures would only be pickled objects; an exception in a map_batches UDF fails
the whole dataset and drops results in flight, where this queue writes every shard that finishes and drains the
in-flight ones before raising; and Ray Data has no resume, so a manifest would decide what to run anyway. What Ray
Data's ActorPoolStrategy would give (n actors holding one model each, num_gpus, backpressure) is the ~60 lines
below: at most IN_FLIGHT shards queued per actor, so the object store holds O(actors) shards, never the input.

Each actor gets num_cpus=1 and, when the cluster has GPUs, num_gpus=gpus_per_worker (default 1: one model per
GPU; 0.5 puts two actors on a GPU) and runs on cuda. GPU actors cannot be tested on the CPU-only machines here.
The actors are kept for the next run in the same Ray session (`release_workers` stops them). A killed worker
is restarted and its shard retried by Ray (MAX_RETRIES); a worker that raises stops the run after the shards
in flight are written, with the worker's exception.
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from ase import Atoms

from atomuq.core.errors import InputError
from atomuq.core.io import Record
from atomuq.core.schema import Provenance
from atomuq.core.validate import DEFAULT_MIN_DISTANCE
from atomuq.engines.local import Executor, ScoreRun, check_score, check_shard_output, score_run, score_settings_record
from atomuq.models.protocol import AtomisticModel
from atomuq.models.provenance import model_provenance
from atomuq.uq.ensemble import Member
from atomuq.workflows.score import ScoreSettings, score_shard

#: shards queued on one actor at a time (one computing, one arriving): keeps actors busy, bounds the object store
IN_FLIGHT = 2
#: restarts of a killed actor, and retries of the shard it was computing
MAX_RETRIES = 3
#: seconds a stopped run waits for its cancelled shards to end (each within one batch)
CANCEL_WAIT = 60.0


def _ray() -> Any:
    """The ray module, or an InputError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise InputError("--engine ray needs Ray: pip install 'atomuq[ray]'") from exc
    return ray


def connect(address: str | None = None) -> bool:
    """Join the Ray cluster at address (None: RAY_ADDRESS, else a new local one), unless this process has already;
    True when this call connected (the caller then disconnects)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:
        options["include_dashboard"] = False
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InputError(f"--address {address}: cannot join a Ray cluster ({exc}); start one with `ray start "
                         "--head` or give its address") from exc
    return True


def plan_workers(resources: dict[str, float], num_workers: int | None, gpus_per_worker: float | None,
                 model: AtomisticModel) -> tuple[int, float, str]:
    """(actors, GPUs per actor, device) for a cluster with these resources: one actor per GPU (or per
    gpus_per_worker) where there are GPUs, else one per CPU; refused if the cluster cannot hold them now."""
    cpus, gpus = int(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus >= 1 else 0.0
    if gpus_per_worker < 0 or gpus_per_worker > 1 and gpus_per_worker != int(gpus_per_worker):
        raise InputError(f"GPUs per worker must be a fraction of one GPU or a whole number, got {gpus_per_worker}")
    if gpus_per_worker > 0 and gpus == 0:
        raise InputError(f"GPU workers asked for, but the Ray cluster has no GPUs ({cpus} CPUs)")
    if model.device.type == "cuda" and gpus_per_worker == 0:
        raise InputError("the model is on cuda but the Ray cluster has no GPUs; load it on the cpu")
    if num_workers is None:
        num_workers = int(gpus / gpus_per_worker + 1e-9) if gpus_per_worker > 0 else cpus
    if num_workers < 1:
        raise InputError(f"the number of workers must be at least 1, got {num_workers}")
    if num_workers > cpus or gpus_per_worker * num_workers > gpus + 1e-9:
        raise InputError(f"{num_workers} workers need {num_workers} CPUs and {gpus_per_worker * num_workers:g} GPUs; "
                         f"the Ray cluster has {cpus} CPUs and {gpus:g} GPUs: ask for fewer workers")
    return num_workers, gpus_per_worker, "cuda:0" if gpus_per_worker > 0 else "cpu"


class Scorer:
    """One Ray actor: one copy of the model (and ensemble) of the current job on its device, scoring the shards it
    is sent. The job is sent once per run (an object reference in a list, so that Ray does not fetch it per shard)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.job_id: str | None = None
        self.job: dict[str, Any] = {}

    def score(self, job_ref: list[Any], shard: Sequence[Record]) -> list[Atoms]:
        """The scored structures of one shard (workflows.score.score_shard)."""
        import ray

        if job_ref[0].hex() != self.job_id:
            self.job, self.job_id = {}, None  # the previous model is freed before the next is loaded
            job = ray.get(job_ref[0])
            for member in [job["model"], *(job["ensemble"] or [])]:
                if isinstance(member, torch.nn.Module) and str(member.device) != self.device:
                    member.to(self.device)
            self.job, self.job_id = job, job_ref[0].hex()
        job, context = self.job, ray.get_runtime_context()

        def stop_if_cancelled(n: int) -> None:  # after each batch: a cancelled shard ends within one batch
            if context.is_canceled():
                raise ray.exceptions.TaskCancelledError()

        return score_shard(shard, job["settings"], job["model"], job["ensemble"], job["names"], job["provenance"],
                           stop_if_cancelled)


#: the actors of this process's Ray session, kept between runs (starting one costs seconds: a process, torch)
_POOL: dict[str, Any] = {"session": None, "shape": None, "actors": []}


def _session() -> str:
    return _ray().get_runtime_context().get_job_id()


def workers(count: int, gpus_per_worker: float, device: str) -> list[Any]:
    """count Scorer actors of this shape: those of the previous run if they fit, else new ones."""
    ray = _ray()
    shape = (gpus_per_worker, device)
    if _POOL["session"] != _session() or _POOL["shape"] != shape:
        release_workers()
        _POOL.update(session=_session(), shape=shape, actors=[])
    actor_class = ray.remote(Scorer).options(num_cpus=1, num_gpus=gpus_per_worker, max_restarts=MAX_RETRIES,
                                             max_task_retries=MAX_RETRIES)
    actors = _POOL["actors"]
    while len(actors) < count:
        actors.append(actor_class.remote(device))
    for extra in actors[count:]:  # fewer this time: the others' CPUs are freed
        ray.kill(extra)
    del actors[count:]
    return list(actors)


def release_workers() -> None:
    """Stop the kept actors (they also stop with the Ray session, or this process)."""
    ray = _ray()
    if ray.is_initialized() and _POOL["session"] == _session():
        for actor in _POOL["actors"]:
            ray.kill(actor)
    _POOL.update(session=None, shape=None, actors=[])


def actor_executor(job: dict[str, Any], num_workers: int, gpus_per_worker: float, device: str,
                   progress: Callable[[int], None] | None = None) -> Executor:
    """An executor for engines.local.execute_shards: the shards go to num_workers Scorer actors, IN_FLIGHT at a time
    each, and come back as they finish; progress(n) after each written shard of n structures. If the run stops
    early (a worker's exception, an interrupt) the shards still queued are cancelled and it returns when no actor
    works for it any more."""
    ray = _ray()

    def execute(todo: Sequence[tuple[int, Sequence[Record]]]) -> Iterator[tuple[int, list[Atoms]]]:
        if not todo:
            return
        try:
            job_ref = [ray.put(job)]
        except Exception as exc:  # pickling: a model or calculator that cannot leave this process
            raise InputError(f"the model cannot be sent to Ray workers ({type(exc).__name__}: {exc}); use "
                             "--engine local") from exc
        actors = workers(min(num_workers, len(todo)), gpus_per_worker, device)
        queue, pending = deque(todo), {}

        def submit(actor: Any) -> None:
            k, shard = queue.popleft()
            pending[actor.score.remote(job_ref, list(shard))] = (k, len(shard), actor)

        try:
            for _ in range(IN_FLIGHT):
                for actor in actors:
                    if queue:
                        submit(actor)
            failure: BaseException | None = None
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                k, size, actor = pending.pop(ref)
                try:
                    structures = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # the worker's own exception, after the rest is written
                    failure = failure or (exc.cause if isinstance(exc.cause, BaseException) else exc)
                    continue
                except ray.exceptions.RayError as exc:  # an actor that died more often than it is restarted
                    failure = failure or exc
                    release_workers()
                    continue
                if failure is None and queue:
                    submit(actor)
                yield k, structures
                if progress is not None:
                    progress(size)
            if failure is not None:
                raise failure
        finally:
            if pending:  # stopped early: queued shards are dropped, those being computed end after their batch
                for ref in pending:
                    ray.cancel(ref)
                ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT)

    return execute


def score_file_ray(
    records: Sequence[Record],
    model: AtomisticModel,
    output: str | Path,
    settings: ScoreSettings | None = None,
    ensemble: Sequence[Member] | None = None,
    ensemble_names: Sequence[str] | None = None,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    shard_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    address: str | None = None,
    num_workers: int | None = None,
    gpus_per_worker: float | None = None,
    as_folder: bool = False,
) -> ScoreRun:
    """`atomuq score --engine ray`: engines.local.score_file with the shards scored by Ray actors (module doc).

    address: the Ray cluster (None: RAY_ADDRESS, else a local one); num_workers: actors (default one per GPU, or
    per CPU without GPUs); progress(n) per finished shard of n structures; as_folder: output is a folder of shards.
    """
    settings, shard_size = check_score(records, model, settings, min_distance, shard_size)
    check_shard_output(output, as_folder)
    connected = connect(address)
    try:
        workers, gpus, device = plan_workers(_ray().cluster_resources(), num_workers, gpus_per_worker, model)
        provenance: Provenance = model_provenance(model)
        record = {**score_settings_record(settings, model, ensemble, ensemble_names), "device": device}
        job = {"model": model, "ensemble": list(ensemble) if ensemble else None, "names": ensemble_names,
               "settings": settings, "provenance": provenance}
        execute = actor_executor(job, workers, gpus, device, progress)
        return score_run(records, execute, output, record, shard_size, progress, as_folder)
    finally:
        if connected:
            release_workers()
            _ray().shutdown()
