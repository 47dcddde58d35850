"""The synthesis worker: claims jobs from the database and turns each into a derived series.

One worker per GPU, each in its own process (started by :mod:`dicomnode.workers`), so a crash in
the engine (CUDA error, out of memory, a segfault in a decoder) never takes the SCP down. The model
is loaded once, on the first job, and kept read-only. For each job, in one transaction after the
pixels are made: derived instances written to the store and recorded, one Output row per view, a
pending Delivery per destination, the job marked done. Re-running a job after a crash produces the
same UIDs (deterministic) and finds the instances already there, so nothing is duplicated.

Claims are leased (:mod:`storage.queue`): a heartbeat thread renews the lease while the job runs,
and the final transaction first fences on the lease, so a worker whose job was reclaimed or moved
meanwhile writes nothing, logs it and takes the next job. A worker whose parent process died exits
at once (no orphan keeps computing a job the restarted node already requeued).

Before any of that, the consistency gate (:mod:`dicomnode.gate`): an input outside the model's
intended inputs, or scored below its threshold, ends the job ``refused`` with the score and the
reason, nothing written. Deterministic failures (:func:`dicomnode.errors.is_permanent`) end the job
``failed`` at once; only transient ones (engine crash, out of memory, database busy) are retried.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dicomnode import __version__
from dicomnode.config import Settings
from dicomnode.derived import GeneratorInfo, build_derived_instances, device_uid_for
from dicomnode.derived_sweep import build_sweep_instance
from dicomnode.errors import InputRefused, ModelLoadError, NodeError, is_permanent
from dicomnode.gate import check_intended_input, check_score, model_meta_for
from dicomnode.log_config import quiet_libraries
from dicomnode.model_location import model_waiting_reason
from dicomnode.rules import facts_from_dataset, loop_reason
from storage.db import make_engine, session_factory
from storage.deliveries import DeliveryTarget, create_deliveries
from storage.heartbeats import beat, stopped
from storage.instances import fields_from_dataset, find_instance, record_instance
from storage.jobs import (
    claim_jobs,
    complete_job,
    fail_leased_job,
    get_job,
    lease_of,
    record_consistency,
    refuse_job,
    wait_for_model,
)
from storage.models import Instance, Job, utcnow
from storage.outputs import record_output
from storage.queue import JOBS, Lease, LeaseLost, RetryPolicy
from storage.store import InstanceStore

logger = logging.getLogger(__name__)

SAMPLER = "DPMSolverMultistep dpmsolver++ order 2"


PARENT_CHECK_S = 0.5


def backoff_s(attempt: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff: initial, 2x, 4x ... capped (attempt counts from 1); no jitter."""
    return RetryPolicy(1, initial_s, max_s).backoff_s(attempt)


def job_policy(settings: Settings) -> RetryPolicy:
    """The retry policy of synthesis jobs, from ``[scheduler]`` (a job's own max_attempts wins)."""
    s = settings.scheduler
    return RetryPolicy(s.max_attempts, s.backoff_initial_s, s.backoff_max_s, s.backoff_jitter)


def is_retryable(error: BaseException) -> bool:
    """Whether a failed attempt is worth repeating: only transient errors are
    (:func:`dicomnode.errors.is_permanent`: an undecodable input or a value the writer rejects fails
    the same way every time)."""
    return not is_permanent(error)


@dataclass
class LoadedModel:
    pipe: Any
    device: str
    dtype: str
    name: str
    identity: str
    max_batch: int = 8  # views per chunk, "auto" resolved at load
    steps: int = 20  # the engine's, or the model's recommended where the configuration sets none
    guidance_scale: float = 3.0

    @property
    def device_uid(self) -> str:
        return device_uid_for(self.identity)


class SynthesisWorker:
    """Claims and runs jobs until ``stop`` is set; finishes the job in hand before leaving."""

    def __init__(self, settings: Settings, worker_id: str, gpu_index: int | None = None):
        self.settings = settings
        self.worker_id = worker_id
        self.gpu_index = gpu_index
        self.store = InstanceStore(settings.node.storage_dir, settings.node.min_free_mb * 2**20)
        self.sessions: sessionmaker[Session] = session_factory(make_engine(settings.node.effective_database_url))
        self.model: LoadedModel | None = None
        self.lease: Lease | None = None  # of the job being processed
        self.leases: dict[int, Lease] = {}  # of every job claimed, renewed by the heartbeat
        self._batched: dict[int, Any] = {}  # job id -> its views, denoised with other jobs'
        self._stopping = threading.Event()

    # ------------------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event | Any) -> None:
        logger.info("worker %s started (pid %d)", self.worker_id, os.getpid())
        heart = threading.Thread(target=self._heartbeat_loop, args=(stop,), name="heartbeat", daemon=True)
        self._beat(started=True)
        heart.start()
        try:
            while not stop.is_set():
                if not self.run_once():
                    stop.wait(self.settings.scheduler.poll_interval_s)
        finally:
            self._stopping.set()
            with self.sessions.begin() as session:
                stopped(session, self.worker_id)
        logger.info("worker %s stopped", self.worker_id)

    def run_once(self) -> bool:
        """Claim and run due jobs (up to ``max_jobs_per_batch``, denoised together); False when none."""
        s = self.settings.scheduler
        jobs = claim_jobs(self.sessions, self.worker_id, limit=s.max_jobs_per_batch, now=utcnow(), lease_s=s.lease_s)
        if not jobs:
            return False
        self.leases = {job.id: lease_of(job) for job in jobs}
        try:
            if len(jobs) > 1 and not model_waiting_reason(self.settings.engine.model):
                self._batched = self._synthesize_together(jobs)
            for job in jobs:
                self._run_job(job)
        finally:
            self.leases, self._batched = {}, {}
        return True

    def _run_job(self, job: Job) -> None:
        self.lease = self.leases.get(job.id)
        log = logging.LoggerAdapter(logger, {"job": job.id})
        try:
            self._beat()  # status shows the job in hand at once
            if reason := model_waiting_reason(self.settings.engine.model):  # missing, or no model_index.json yet
                with self.sessions.begin() as session:
                    wait_for_model(session, job.id, reason, lease=self.lease)
                log.warning("job %d waits: %s", job.id, reason)
                return
            try:
                self.process(job.id)
            except LeaseLost:
                raise
            except InputRefused as e:  # the model cannot ground this input: terminal, nothing written
                with self.sessions.begin() as session:
                    refuse_job(session, job.id, e.reason[:2000], e.score, e.method, lease=self.lease)
            except Exception as e:  # the job wrapper is a boundary: every failure becomes a job state
                if is_permanent(e):  # deterministic: the same input fails the same way; one line, no retry
                    log.error("job %d failed, not retried: %s: %s", job.id, type(e).__name__, e)
                else:
                    log.exception("job %d failed (attempt %d)", job.id, job.attempts + 1)
                self._fail(job, e)
        except LeaseLost as e:  # the job moved (reclaimed, requeued, retried): drop it, write nothing
            log.warning("job %d dropped by %s: %s", job.id, self.worker_id, e)
        finally:
            self.leases.pop(job.id, None)
            self.lease = None

    def _synthesize(self, model: LoadedModel, requests: list[tuple[Any, list[float], list[float]]]) -> list[Any]:
        """Denoise the views of one or more prepared inputs with the engine settings.

        With ``max_jobs_per_batch`` > 1 every job goes through the fixed-size batches of
        :mod:`synthesis.batching`, alone or not, so its pixels never depend on its company.
        """
        engine = self.settings.engine
        if self.settings.scheduler.max_jobs_per_batch > 1:
            from synthesis.batching import BatchRequest, synthesize_many

            return synthesize_many(
                model.pipe,
                [BatchRequest(image, az, el, engine.seed) for image, az, el in requests],
                num_inference_steps=model.steps,
                guidance_scale=model.guidance_scale,
                max_batch=model.max_batch,
            )
        return [
            model.pipe(
                image,
                azimuths=az,
                elevations=el,
                num_inference_steps=model.steps,
                guidance_scale=model.guidance_scale,
                generator=engine.seed,
                max_batch=model.max_batch,
            )
            for image, az, el in requests
        ]

    def _synthesize_together(self, jobs: list[Job]) -> dict[int, Any]:
        """Denoise the claimed jobs' views in shared batches; each job then finishes on its own.

        A job whose input cannot be prepared is left out (it fails on its own in ``process``); if the
        shared run fails, every job runs alone, so one bad input cannot fail the others.
        """
        from synthesis.radiograph import prepare_radiograph

        model = self.load_model()
        engine = self.settings.engine
        meta = model_meta_for(engine.model, engine.consistency_threshold)
        if meta.gate.method == "identity-ssim":  # that gate needs each job's (0, 0) view in its own batch
            return {}
        ids, requests = [], []
        for job in jobs:
            try:
                with self.sessions() as session:
                    source_row = session.get_one(Instance, job.input_instance_id)
                    path = source_row.path
                source = self.store.open_dataset(path)
                check_intended_input(source, list(job.elevations), meta)  # refused ones are left out
                prepared = prepare_radiograph(source, model.pipe.resolution)
            except Exception as e:  # noqa: BLE001 - reported when the job runs alone
                logger.info("job %d left out of the shared batch: %s", job.id, e)
                continue
            ids.append(job.id)
            requests.append((prepared.image, list(job.azimuths), list(job.elevations)))
        if len(ids) < 2:
            return {}
        try:
            t = time.perf_counter()
            results = self._synthesize(model, requests)
        except Exception:  # noqa: BLE001 - each job retries alone and fails on its own
            logger.exception("shared batch of jobs %s failed; running them one by one", ids)
            return {}
        logger.info("jobs %s denoised together in %.2f s", ids, time.perf_counter() - t)
        return dict(zip(ids, results, strict=True))

    def _fail(self, job: Job, error: Exception) -> None:
        message = f"{type(error).__name__}: {error}"[:2000]
        assert self.lease is not None
        with self.sessions.begin() as session:
            fail_leased_job(session, self.lease, message, job_policy(self.settings), retryable=is_retryable(error))

    def _fence(self, session: Session) -> None:
        """Inside the final transaction, before any output is written: is the job still ours?"""
        if self.lease is not None:
            JOBS.fence(session, self.lease)

    def _beat(self, started: bool = False) -> None:
        lease = self.lease
        with self.sessions.begin() as session:
            beat(
                session, self.worker_id, node=self.worker_id.rsplit("/", 1)[0], role="worker",
                host=socket.gethostname(), pid=os.getpid(), job_id=lease.id if lease else None, started=started,
            )

    def _heartbeat_loop(self, stop: threading.Event | Any) -> None:
        """Every lease_s / 3: renew the lease of the job in hand and say we are alive."""
        interval = self.settings.scheduler.lease_s / 3
        while not self._stopping.wait(interval):
            for job_id, lease in list(self.leases.items()):
                try:
                    with self.sessions.begin() as session:
                        renewed = JOBS.heartbeat(session, lease, self.settings.scheduler.lease_s)
                    if self.leases.get(job_id) is lease:
                        self.leases[job_id] = renewed
                    if self.lease is lease:
                        self.lease = renewed
                except LeaseLost as e:
                    if job_id in self.leases:  # not just finished by this worker meanwhile
                        logger.warning("worker %s: %s (the job will be dropped)", self.worker_id, e)
                except Exception:  # a missed heartbeat is retried next interval; the lease has slack
                    logger.exception("worker %s: heartbeat of job %d failed", self.worker_id, job_id)
            try:
                self._beat()
            except Exception:
                logger.exception("worker %s: heartbeat failed", self.worker_id)

    # --------------------------------------------------------------------------------- model
    def load_model(self) -> LoadedModel:
        if self.model is None:
            from synthesis.device import resolve_device, resolve_dtype
            from synthesis.fastpath import FastPath, prepare_for_serving
            from synthesis.pipeline import SvdrrPipeline

            device = worker_device(resolve_device(self.settings.engine.device), self.gpu_index)
            dtype = resolve_dtype(self.settings.engine.dtype, device)
            t = time.perf_counter()
            pipe = SvdrrPipeline.from_pretrained(self.settings.engine.model, torch_dtype=dtype, device=device)
            pipe.set_progress_bar_config(disable=True)
            # Fast path (synthesis.fastpath): compile, size the batches, warm every shape the rules need.
            engine = self.settings.engine
            meta = model_meta_for(engine.model, engine.consistency_threshold)
            steps, guidance = meta.sampler(engine.steps, engine.guidance_scale)
            fast = FastPath.for_device(device, engine.compile, engine.cuda_graphs, engine.pad_batches)
            view_counts = [len(rule.azimuths) for rule in self.settings.rules if rule.enabled]
            max_batch, warm_s = prepare_for_serving(
                pipe, fast, engine.max_batch, guidance, view_counts, warm=engine.warm_up
            )
            self.model = LoadedModel(
                pipe=pipe,
                device=str(device),
                dtype=str(dtype).removeprefix("torch."),
                name=self.settings.engine.model.name,
                identity=pipe.model_identity,
                max_batch=max_batch,
                steps=steps,
                guidance_scale=guidance,
            )
            logger.info(
                "worker %s loaded model %s (identity %s) on %s in %.1f s (warm-up %.1f s, compiled %s, max_batch %d, "
                "%d steps, guidance %g)",
                self.worker_id,
                self.model.name,
                self.model.identity[:12],
                device,
                time.perf_counter() - t,
                warm_s,
                pipe.fast_path.compile,
                max_batch,
                steps,
                guidance,
            )
        return self.model

    # ----------------------------------------------------------------------------------- job
    def process(self, job_id: int) -> None:
        from synthesis.consistency import identity_ssim, score_input
        from synthesis.radiograph import prepare_radiograph, restore_views

        t0 = time.perf_counter()
        with self.sessions() as session:
            job = get_job(session, job_id)
            source_row = session.get(Instance, job.input_instance_id)
            if source_row is None:
                raise NodeError(f"job {job_id}: input instance {job.input_instance_id} is not recorded")
            source_path = source_row.path
            azimuths, elevations = list(job.azimuths), list(job.elevations)
            destinations, request_key = list(job.destinations), job.request_key
            rule_name = job.rule_name
        source = self.store.open_dataset(source_path)
        model = self.load_model()
        reason = loop_reason(
            facts_from_dataset(source), self.settings, {model.device_uid}, self.settings.output.manufacturer
        )
        if reason:  # the SCP checks too; here also our exact Device UID is known
            logger.info("job %d: input not processed: %s", job_id, reason)
            with self.sessions.begin() as session:
                complete_job(session, job_id, lease=self.lease)
            return
        engine = self.settings.engine
        # The gate, before anything is written: intended inputs from the header, then the score.
        meta = model_meta_for(engine.model, engine.consistency_threshold)
        check_intended_input(source, elevations, meta)
        prepared = prepare_radiograph(source, model.pipe.resolution)
        t1 = time.perf_counter()
        with_identity = meta.gate.method == "identity-ssim"
        if with_identity:  # the identity view (0, 0) is synthesised in the same batch, then dropped
            azimuths, elevations = [*azimuths, 0.0], [*elevations, 0.0]
        else:
            score = score_input(model.pipe, prepared.image, meta.gate.method)
            check_score(score.value, score.method, meta)
        # A job denoised in a shared batch (cross-job batching) takes its views from there; the
        # identity-view gate needs its (0, 0) view in its own batch, so it always runs alone.
        batched = None if with_identity else self._batched.pop(job_id, None)
        result = batched or self._synthesize(model, [(prepared.image, azimuths, elevations)])[0]
        synthesis_s = time.perf_counter() - t1
        images, result_views = result.images, list(result.views)
        if with_identity:
            score = identity_ssim(images[-1], prepared.image)
            check_score(score.value, score.method, meta)
            images, result_views = images[:-1], result_views[:-1]
        logger.info("job %d: consistency %s passes the gate", job_id, score.describe())
        restored = restore_views(images, prepared.placement)
        views = [(v.azimuth, v.elevation) for v in result_views]
        out = self.settings.output
        generator = GeneratorInfo(
            manufacturer=out.manufacturer,
            model_name=model.name,
            model_version=model.identity[:12],
            model_identity=model.identity,
            node_version=__version__,
        )
        datasets = build_derived_instances(
            source,
            restored.pixels,
            restored.bits_stored,
            restored.window_center,
            restored.window_width,
            views,
            generator,
            seed=engine.seed,
            steps=model.steps,
            guidance_scale=model.guidance_scale,
            series_number=out.series_number,
            series_description_prefix=out.series_description_prefix,
            modality=out.modality,
            source_lossy=prepared.lossy,
            # Steps and guidance change the pixels, so they are part of the UIDs' identity too.
            request_key=f"{request_key}|steps={model.steps}|guidance={model.guidance_scale:g}",
        )
        views = self._add_sweep(rule_name, datasets, views)
        targets = [self._target(name) for name in destinations]
        total_s = time.perf_counter() - t0
        with self.sessions.begin() as session:
            self._fence(session)
            for ds, (azimuth, elevation) in zip(datasets, views, strict=True):
                row = find_instance(session, ds.SOPInstanceUID)
                if row is None:  # a retried job finds what its first attempt already stored
                    stored = self.store.write_dataset(ds)
                    fields = fields_from_dataset(ds)
                    fields.update(path=stored.path, sha256=stored.sha256, size_bytes=stored.size_bytes, synthetic=True)
                    row = record_instance(session, origin="derived", **fields)
                    record_output(
                        session,
                        job_id=job_id,
                        instance_id=row.id,
                        azimuth=azimuth,
                        elevation=elevation,
                        seed=engine.seed,
                        model_name=model.name,
                        model_identity=model.identity,
                        model_version=generator.model_version,
                        steps=model.steps,
                        guidance_scale=model.guidance_scale,
                        sampler=SAMPLER,
                        device=model.device,
                        dtype=model.dtype,
                        series_instance_uid=ds.SeriesInstanceUID,
                        synthesis_s=synthesis_s / len(datasets),
                        total_s=total_s,
                    )
                create_deliveries(session, row.id, targets)
            record_consistency(session, job_id, score.value, score.method)
            complete_job(session, job_id, lease=self.lease)
        logger.info(
            "job %d done: %d views in %.2f s (synthesis %.2f s), series %s",
            job_id,
            len(datasets),
            time.perf_counter() - t0,
            synthesis_s,
            datasets[0].SeriesInstanceUID,
        )

    def _add_sweep(
        self, rule_name: str, datasets: list[Any], views: list[tuple[float, float]]
    ) -> list[tuple[float, float]]:
        """With ``sweep = true`` on the job's rule, append the rotation sweep of the views to
        `datasets`; returns the angles to record per dataset (the sweep's are its first frame's)."""
        rule = next((r for r in self.settings.rules if r.name == rule_name), None)
        if rule is None or not rule.sweep or len(datasets) < 2:
            return views
        out = self.settings.output
        datasets.append(
            build_sweep_instance(
                datasets,
                series_number=out.sweep_series_number,
                series_description_prefix=out.series_description_prefix,
                frame_time_ms=out.sweep_frame_time_ms,
            )
        )
        return [*views, min(views)]

    def _target(self, peer_name: str) -> DeliveryTarget:
        peer = self.settings.peer(peer_name)
        ae = peer.ae_title if peer.kind == "dimse" else "STOW-RS"  # a DICOMweb peer has no AE title
        return DeliveryTarget(peer_name=peer.name, peer_ae=ae, peer_host=peer.host, peer_port=peer.port)


def worker_device(device: Any, gpu_index: int | None) -> Any:
    """Worker i of several takes cuda:i when the engine runs on CUDA ("auto" or "cuda");
    an explicit "cuda:N" or the CPU is kept as configured."""
    import torch

    if device.type == "cuda" and gpu_index is not None and device.index is None:
        return torch.device("cuda", gpu_index)
    return device


def worker_main(
    settings: Settings,
    worker_id: str,
    gpu_index: int | None,
    stop: Any,
    log_level: int,
    parent_pid: int | None = None,
) -> None:
    """Entry point of a worker process (multiprocessing 'spawn').

    ``parent_pid`` is the node's main process: when it dies (``kill -9``, OOM killer) this worker
    exits at once instead of running on unsupervised. Its job's lease then runs out, or the
    restarted node requeues it; either way the fencing token keeps this worker from writing.
    """
    # The node alone decides when its workers stop (through ``stop``); a signal sent to the whole
    # process group (Ctrl-C, systemd, timeout) must not kill a worker in the middle of a job.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [%(processName)s]: %(message)s")
    quiet_libraries(show=log_level <= logging.DEBUG)  # as the CLI set it in the parent (spawn forgets)
    if parent_pid is not None:
        watch = threading.Thread(target=exit_with_parent, args=(parent_pid, worker_id), daemon=True)
        watch.start()
    try:
        SynthesisWorker(settings, worker_id, gpu_index).run(stop)
    except ModelLoadError:
        logger.exception("worker %s cannot load its model", worker_id)
        raise


def exit_with_parent(parent_pid: int, worker_id: str, interval_s: float = PARENT_CHECK_S) -> None:
    """Exit the process as soon as its parent is no longer ``parent_pid`` (the parent died)."""
    while True:
        if os.getppid() != parent_pid:
            logger.error("worker %s: node process %d is gone; exiting (its job is reclaimed)", worker_id, parent_pid)
            logging.shutdown()
            os._exit(EXIT_PARENT_GONE)
        time.sleep(interval_s)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # the node's to handle; its workers ignore them
EXIT_PARENT_GONE = 75  # EX_TEMPFAIL: nothing wrong with the job, the node went away
