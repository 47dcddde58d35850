"""Queue throughput: synthesis jobs per minute with 1 and 2 workers, with and without cross-job batching.

    python benchmarks/throughput.py                        # demo model, 8 jobs, CPU or the GPU
    python benchmarks/throughput.py --jobs 32 --views 2 --max-jobs-per-batch 8

Each scenario is a fresh site (SQLite file, store) in a temporary folder: ``--jobs`` copies of the
demo model's sample input (each its own SOP Instance UID) are received and queued as the SCP does,
then real worker processes (:class:`dicomnode.workers.WorkerPool`, the node's own pool) claim and
finish them through the leased queue: synthesis, derived instances written and recorded, deliveries
queued. The clock runs from starting the workers to the last job done, so it includes process
start-up and the model load, as a node's first minutes do; ``--warm-up`` jobs are finished first
and not counted when only the steady state is of interest. With several workers on a CUDA machine
each takes its own GPU (``device = "auto"``); on one GPU or the CPU they share it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from dicomnode.config import load_settings  # noqa: E402
from dicomnode.intake import Intake  # noqa: E402
from dicomnode.workers import WorkerPool  # noqa: E402
from storage.db import make_engine, session_factory, upgrade  # noqa: E402
from storage.instances import fields_from_dataset, record_instance  # noqa: E402
from storage.models import Job  # noqa: E402
from storage.store import InstanceStore  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "demo"
SAMPLE = MODEL / "sample" / "chest_pa_drr_phantom.dcm"
AZIMUTHS = [-90, -60, -30, 30, 60, 90]


def site(folder: Path, args: argparse.Namespace, workers: int, jobs_per_batch: int) -> Path:
    azimuths = AZIMUTHS[: args.views]
    text = f"""
[node]
ae_title = "BENCH"
storage_dir = "{folder / "var"}"
min_free_mb = 1
name = "bench"

[engine]
model = "{args.model}"
device = "{args.device}"
steps = {args.steps}
max_batch = {args.max_batch}

[scheduler]
settle_s = 0
poll_interval_s = 0.1
workers = {workers}
max_jobs_per_batch = {jobs_per_batch}

[[rules]]
name = "chest"
azimuths = {azimuths}
"""
    path = folder / "site.toml"
    path.write_text(text)
    return path


def queue_jobs(settings_path: Path, n: int) -> None:
    settings = load_settings(settings_path)
    engine = make_engine(settings.node.effective_database_url)
    upgrade(engine)
    store = InstanceStore(settings.node.storage_dir, 0)
    source = pydicom.dcmread(SAMPLE)
    sessions = session_factory(engine)
    intake = Intake(settings)
    for _ in range(n):
        ds = source.copy()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        stored = store.write_dataset(ds)
        with sessions.begin() as session:
            fields = fields_from_dataset(ds)
            fields.update(path=stored.path, sha256=stored.sha256, size_bytes=stored.size_bytes)
            intake(session, record_instance(session, origin="received", **fields), ds)
    engine.dispose()


def run(args: argparse.Namespace, workers: int, jobs_per_batch: int) -> tuple[float, int]:
    """Seconds from starting the workers until every counted job is done, and how many failed."""
    with tempfile.TemporaryDirectory(prefix="dicomnode-throughput-") as tmp:
        path = site(Path(tmp), args, workers, jobs_per_batch)
        settings = load_settings(path)
        sessions = session_factory(make_engine(settings.node.effective_database_url))
        queue_jobs(path, args.warm_up)
        pool = WorkerPool(settings, sessions, grace_s=30)
        pool.start()
        try:
            _wait_done(sessions, args.warm_up, args.timeout)
            queue_jobs(path, args.jobs)
            t = time.perf_counter()
            failed = _wait_done(sessions, args.warm_up + args.jobs, args.timeout)
            return time.perf_counter() - t, failed
        finally:
            pool.stop()


def _wait_done(sessions, total: int, timeout_s: float) -> int:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with sessions() as session:
            states = [s for (s,) in session.query(Job.state)]
        finished = sum(s in ("done", "failed") for s in states)
        if len(states) >= total and finished == len(states):
            return states.count("failed")
        time.sleep(0.1)
    raise TimeoutError(f"jobs not finished within {timeout_s} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=int, default=8, help="jobs timed per scenario")
    p.add_argument("--warm-up", type=int, default=0, help="jobs finished before the clock starts")
    p.add_argument("--views", type=int, default=2, choices=range(1, len(AZIMUTHS) + 1), help="views per job")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-batch", type=int, default=8, help="views denoised together (engine.max_batch)")
    p.add_argument("--max-jobs-per-batch", type=int, default=4, help="jobs claimed together when batching")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args(argv)
    if not (args.model / "model_index.json").is_file():
        print(f"no model at {args.model}", file=sys.stderr)
        return 1
    print(
        f"{args.jobs} jobs x {args.views} views, {args.steps} steps, max_batch {args.max_batch}, "
        f"model {args.model.name}, device {args.device}"
    )
    batched = f"jobs/min, {args.max_jobs_per_batch} jobs batched"
    print(f"{'workers':>7}  {'jobs/min, one job at a time':>28}  {batched:>28}")
    for workers in args.workers:
        cells = []
        for jobs_per_batch in (1, args.max_jobs_per_batch):
            seconds, failed = run(args, workers, jobs_per_batch)
            rate = args.jobs / seconds * 60
            cells.append(f"{rate:9.1f} ({seconds:6.1f} s{', ' + str(failed) + ' failed' if failed else ''})")
        print(f"{workers:>7}  {cells[0]:>28}  {cells[1]:>28}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
