"""Ingest throughput: the node against a real Orthanc, side by side, with dcmtk storescu on loopback.

    python benchmarks/ingest.py                        # 512² x 200 and 2048² x 50, 1 and 4 associations
    python benchmarks/ingest.py --quick                # a few images per cell: shows that it works
    python benchmarks/ingest.py --rss 20000            # also the node's RSS over 20,000 instances

Both servers are the real thing as a site runs it: ``dicomnode serve`` (SQLite; file, folder entry
and commit on stable storage before Success: one ``syncfs`` per group of commits) and Orthanc
(SQLite index, ``SyncStorageArea``), both with TCP_NODELAY,
each on its own loopback port. Every run sends fresh DX For Presentation files (new SOP Instance UIDs,
so no run is answered from a duplicate check) with ``/usr/bin/storescu`` over 1 or 4 concurrent
associations, the files split evenly; the two servers alternate which goes first in each round. The
files sent are generated on tmpfs (/dev/shm) where there is one (:func:`sender_folder`).
After each run the server's instance count must have grown by exactly the files sent.

Printed per cell: median images/s and MB/s (file bytes), the range over rounds, the ratio
node/Orthanc of the medians, and each server's CPU milliseconds per image (user + system time of the
``serve`` process with its receiving processes, and of the Orthanc process, all their threads).
Figures depend on the machine and its load: say where they were taken.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import free_port  # noqa: E402
from tests.peers import NodeProcess, Orthanc, wait_for  # noqa: E402

STORESCU = "/usr/bin/storescu"  # dcmtk's, not pynetdicom's console script of the same name
DX = "1.2.840.10008.5.1.4.1.1.1.1"
PLACEHOLDER = "2.25.1" + "9" * 58  # a 64-character UID replaced byte for byte in each file
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---- Files ------------------------------------------------------------------------------------------


def template(size: int) -> bytes:
    """A Part 10 DX For Presentation file, 16-bit, ``size`` x ``size``, with a placeholder instance UID."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX
    ds.file_meta.MediaStorageSOPInstanceUID = PLACEHOLDER
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = DX
    ds.SOPInstanceUID = PLACEHOLDER
    ds.StudyInstanceUID = "2.25.2" + "0" * 40
    ds.SeriesInstanceUID = "2.25.3" + "0" * 40
    ds.PatientID = "BENCH"
    ds.PatientName = "Benchmark^Phantom"
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = os.urandom(size * size * 2)
    ds["PixelData"].VR = "OW"
    path = Path(tempfile.mkstemp(suffix=".dcm")[1])
    try:
        ds.save_as(path, enforce_file_format=True)
        return path.read_bytes()
    finally:
        path.unlink()


def sender_folder(work: Path) -> Path:
    """Where the files sent are generated: on tmpfs when there is one, apart from the servers' disk.

    The sender stands for another machine. Its files, written and deleted in thousands per run, would
    otherwise load the filesystem the servers store on: on ext4 every new inode then skips the
    recently deleted ones (``recently_deleted``), measured at 0.6 ms of system CPU per stored image
    for either server after a few runs.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="ingest-files-", dir=shm))
    return work / "files"


def write_files(folder: Path, data: bytes, count: int, groups: int, nonce: int) -> list[Path]:
    """``count`` copies of ``data`` with fresh instance UIDs, in ``groups`` sub-folders (one per association)."""
    placeholder = PLACEHOLDER.encode()
    dirs = [folder / f"a{g}" for g in range(groups)]
    for d in dirs:
        d.mkdir(parents=True)
    for i in range(count):
        uid = f"2.25.1{nonce:018d}{i:040d}".encode()
        assert len(uid) == len(placeholder)
        (dirs[i % groups] / f"{i:06d}.dcm").write_bytes(data.replace(placeholder, uid))
    return dirs


# ---- Servers ------------------------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return found


@dataclass
class Server:
    name: str
    ae_title: str
    port: int
    pid: int
    count: Callable[[], int]  # instances held

    def cpu_s(self) -> float:
        """User + system time of the server and every process under it (the node's receivers)."""
        total = 0.0
        for pid in _tree(self.pid):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited meanwhile
                continue
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
        return total

    def rss_mib(self, pid: int | None = None) -> float:
        try:
            lines = Path(f"/proc/{pid or self.pid}/status").read_text().splitlines()
        except OSError:
            return float("nan")
        for line in lines:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def rss_line(self) -> str:
        """RSS of the server process, then of each process under it that serves associations."""
        names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in _tree(self.pid)}
        receivers = [pid for pid, cmd in names.items() if pid != self.pid and b"multiprocessing" in cmd]
        parts = [f"{self.rss_mib():.1f}"] + [f"{self.rss_mib(pid):.1f}" for pid in sorted(receivers)]
        return " + ".join(parts) + " MiB"


def start_node(folder: Path, receive_processes: int) -> tuple[NodeProcess, Server]:
    port = free_port()
    folder.mkdir(parents=True)
    (folder / "no-model").mkdir()  # a model still to come: the node receives and queues, synthesis waits
    config = folder / "dicomnode.toml"
    config.write_text(
        f'[node]\nae_title = "SVDRR"\nbind_address = "127.0.0.1"\nport = {port}\n'
        f'storage_dir = "{folder / "var"}"\nmin_free_mb = 0\nreceive_processes = {receive_processes}\n'
        f'\n[engine]\nmodel = "{folder / "no-model"}"\n'
        f"\n[http]\nport = {free_port()}\n"  # the console as a site runs it, on a port of its own
    )
    node = NodeProcess(config, port, folder / "node.log").start()
    assert node.proc is not None
    database = folder / "var" / "dicomnode.sqlite"

    def count() -> int:
        with sqlite3.connect(database) as db:
            return int(db.execute("select count(*) from instances").fetchone()[0])

    return node, Server("node", "SVDRR", port, node.proc.pid, count)


def start_orthanc(folder: Path) -> tuple[Orthanc, Server]:
    orthanc = Orthanc(folder).start()
    assert orthanc.proc is not None

    def count() -> int:
        return int(orthanc.get("/statistics")["CountInstances"])

    return orthanc, Server("orthanc", orthanc.ae_title, orthanc.dicom_port, orthanc.proc.pid, count)


# ---- Runs ---------------------------------------------------------------------------------------------


@dataclass
class Cell:
    size: int
    associations: int
    count: int
    file_mb: float
    seconds: dict[str, list[float]] = field(default_factory=lambda: {"node": [], "orthanc": []})
    cpu_ms: dict[str, list[float]] = field(default_factory=lambda: {"node": [], "orthanc": []})


def send(server: Server, dirs: list[Path]) -> float:
    """storescu over one association per folder, all at once; the wall time until all have finished."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    command = [STORESCU, "-aet", "BENCH", "-aec", server.ae_title, "127.0.0.1", str(server.port), "+sd"]
    started = time.perf_counter()
    procs = [
        subprocess.Popen([*command, str(d)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        for d in dirs
    ]
    outputs = [p.communicate(timeout=3600)[0] for p in procs]
    elapsed = time.perf_counter() - started
    for p, out in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"storescu to {server.name} failed ({p.returncode}):\n{out.decode(errors='replace')}")
    return elapsed


def run_cell(cell: Cell, servers: list[Server], rounds: int, work: Path, data: bytes) -> None:
    nonce = int(time.time() * 1000) % 10**12
    for r in range(rounds):
        order = servers if r % 2 == 0 else servers[::-1]
        for server in order:
            nonce += 1
            folder = work / f"{server.name}-{cell.size}-{cell.associations}-{r}"
            dirs = write_files(folder, data, cell.count, cell.associations, nonce)
            before, cpu = server.count(), server.cpu_s()
            elapsed = send(server, dirs)
            cell.cpu_ms[server.name].append((server.cpu_s() - cpu) * 1000 / cell.count)
            after = wait_for(lambda s=server, b=before: s.count() - b >= cell.count and s.count(), 30, "the count")
            if after - before != cell.count:
                raise SystemExit(f"{server.name}: {after - before} instances recorded for {cell.count} sent")
            cell.seconds[server.name].append(elapsed)
            shutil.rmtree(folder)


def report(cells: list[Cell], load: str) -> None:
    print(f"\ningest throughput, dcmtk storescu -> server on loopback, durable before Success, TCP_NODELAY ({load})")
    print(f"{'cell':<22}{'node img/s':>18}{'orthanc img/s':>20}{'ratio':>8}{'node MB/s':>11}{'orth MB/s':>11}"
          f"{'CPU ms/img node':>17}{'orthanc':>9}")
    for c in cells:
        rates = {k: [c.count / s for s in v] for k, v in c.seconds.items()}
        med = {k: statistics.median(v) for k, v in rates.items()}
        span = {k: f"{min(v):.1f}-{max(v):.1f}" for k, v in rates.items()}
        name = f"{c.size}² x {c.count}, {c.associations} assoc"
        print(
            f"{name:<22}{med['node']:>7.1f} ({span['node']:>9}){med['orthanc']:>8.1f} ({span['orthanc']:>9})"
            f"{med['node'] / med['orthanc']:>8.2f}{med['node'] * c.file_mb:>11.1f}{med['orthanc'] * c.file_mb:>11.1f}"
            f"{statistics.median(c.cpu_ms['node']):>17.1f}{statistics.median(c.cpu_ms['orthanc']):>9.1f}"
        )


def rss_run(node: Server, total: int, work: Path) -> None:
    """Send ``total`` small instances to the node in batches and print its RSS after each batch."""
    data = template(64)
    batch = max(total // 10, 1)
    print(f"\nnode RSS over {total} received instances (64² DX, 1 association per batch of {batch}):")
    print("  serving process + each process under it (receiving processes, synthesis worker):")
    print(f"  before: {node.rss_line()}")
    sent, nonce = 0, int(time.time()) % 10**9 * 1000
    while sent < total:
        n = min(batch, total - sent)
        nonce += 1
        dirs = write_files(work / f"rss-{sent}", data, n, 1, nonce)
        send(node, dirs)
        shutil.rmtree(work / f"rss-{sent}")
        sent += n
        print(f"  after {sent:>6}: {node.rss_line()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512,2048", help="image sizes (pixels per side)")
    parser.add_argument("--counts", default="200,50", help="images per run, one per size")
    parser.add_argument("--associations", default="1,4", help="concurrent associations per cell")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved runs per server and cell")
    parser.add_argument("--quick", action="store_true", help="20 and 4 images, 2 rounds: shows that it works")
    parser.add_argument("--rss", type=int, default=0, help="also send this many small instances and print RSS")
    parser.add_argument(
        "--receive-processes", type=int, default=4, help="node.receive_processes (the shipped file's 4)"
    )
    parser.add_argument("--work", type=Path, help="folder for the servers (default: a temporary one)")
    parser.add_argument(
        "--files", type=Path, help="folder for the files sent (default: a temporary one on /dev/shm, else in --work)"
    )
    args = parser.parse_args(argv)
    if not Path(STORESCU).exists():
        raise SystemExit(f"{STORESCU} is missing: apt-get install dcmtk")
    sizes = [int(s) for s in args.sizes.split(",")]
    counts = [int(c) for c in args.counts.split(",")]
    if args.quick:
        counts, args.rounds = [20, 4][: len(sizes)], 2
    associations = [int(a) for a in args.associations.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    files = args.files or sender_folder(work)
    load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at start"
    node_proc, node = start_node(work / "node", args.receive_processes)
    orthanc_proc, orthanc = start_orthanc(work / "orthanc")
    cells = []
    try:
        for size, count in zip(sizes, counts, strict=True):
            data = template(size)
            for n in associations:
                cell = Cell(size, n, count - count % n, len(data) / 1e6)
                run_cell(cell, [node, orthanc], args.rounds, files, data)
                cells.append(cell)
                print(f"  done: {size}² x {cell.count} over {n} association(s)", file=sys.stderr)
        report(cells, load)
        if args.rss:
            rss_run(node, args.rss, files)
    finally:
        node_proc.stop()
        orthanc_proc.stop()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        if args.files is None:
            shutil.rmtree(files, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
