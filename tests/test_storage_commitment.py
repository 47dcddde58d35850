"""Storage commitment (PS3.4 J) with a real Orthanc as Storage Commitment SCP, the report arriving
on the node's own SCP as Orthanc sends it: a new association, Orthanc in the SCP role."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from sqlalchemy import select

from dicomnode import commitment
from dicomnode.cli import main
from dicomnode.scp import StorageSCP
from dicomnode.scu import send
from storage.models import Association, StorageCommitment
from tests.conftest import free_port
from tests.delivery_sites import Site, make_site
from tests.peers import Orthanc, wait_for


@dataclass
class Setup:
    site: Site
    pacs: Orthanc
    scp: StorageSCP


@pytest.fixture
def start(tmp_path: Path) -> Iterator:
    running: list[Setup] = []
    orthancs: list[Orthanc] = []

    def start(report_port: int | None = None, timeout_s: float = 30, max_attempts: int = 3) -> Setup:
        node_port = free_port()
        # Orthanc sends the N-EVENT-REPORT to the AE listed under the requesting AE title.
        pacs = Orthanc(
            tmp_path / "orthanc", modalities={"node": ("SVDRR", "127.0.0.1", report_port or node_port)}
        )
        orthancs.append(pacs)
        pacs.start()
        peer = (
            f'[[peers]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\n'
            f"storage_commitment = true\ncommitment_timeout_s = {timeout_s}\n"
        )
        site = make_site(
            tmp_path / "site",
            peer,
            node=f'bind_address = "127.0.0.1"\nport = {node_port}',
            max_attempts=max_attempts,
        )
        scp = StorageSCP(site.settings, site.store, site.sessions)
        scp.start()
        running.append(Setup(site, pacs, scp))
        return running[-1]

    (tmp_path / "site").mkdir()
    yield start
    for setup in running:
        setup.scp.stop()
    for pacs in orthancs:
        pacs.stop()


def states(site: Site) -> dict[str, str]:
    return {uid: d.state for uid, d in site.deliveries().items()}


def test_deliveries_become_committed_when_orthanc_reports(start, capsys: pytest.CaptureFixture[str]) -> None:
    s = start()
    series = s.site.derived_series(3)
    assert s.site.deliver() == 3
    wait_for(lambda: set(states(s.site).values()) == {"committed"}, 20, "the N-EVENT-REPORT")
    deliveries = s.site.deliveries()
    assert set(deliveries) == {ds.SOPInstanceUID for ds in series}
    assert all(d.committed_at is not None and d.status_code == 0 and d.attempts == 1 for d in deliveries.values())
    with s.site.sessions() as session:
        (request,) = session.scalars(select(StorageCommitment)).all()
        assert (request.state, request.n_instances, request.n_failed) == ("committed", 3, 0)
        # The report came on an association Orthanc opened to the node, recorded like any other.
        callers = session.scalars(select(Association.calling_ae)).all()
        assert "ORTHANC" in callers
    # Orthanc got the node's N-EVENT-REPORT response: its commitment job ends in Success.
    def orthanc_jobs() -> list[str] | None:
        jobs = [j["State"] for j in s.pacs.get("/jobs?expand") if j["Type"] == "StorageCommitmentScp"]
        return jobs if jobs and "Running" not in jobs and "Pending" not in jobs else None

    assert wait_for(orthanc_jobs, 20, "Orthanc's storage commitment job") == ["Success"]
    assert main(["deliveries", "--config", str(s.site.settings.source), "--state", "committed"]) == 0
    out = capsys.readouterr().out
    assert out.count(" committed ") == 3
    assert all(ds.SOPInstanceUID in out for ds in series)


def test_instances_orthanc_does_not_hold_are_not_committed(start) -> None:
    s = start()
    series = s.site.derived_series(3)
    peer = s.site.settings.peer("pacs")
    stored = [s.site.store.absolute(p) for p in _paths(s.site, [ds.SOPInstanceUID for ds in series[:2]])]
    assert all(r.succeeded for r in send(peer, "SVDRR", stored))
    ids = {uid: d.id for uid, d in s.site.deliveries().items()}
    commitment.request(s.site.settings, s.site.sessions, peer, [(ids[ds.SOPInstanceUID], 0) for ds in series])
    missing = series[2].SOPInstanceUID
    wait_for(lambda: "committing" not in states(s.site).values(), 20, "the N-EVENT-REPORT")
    deliveries = s.site.deliveries()
    assert states(s.site) == {ds.SOPInstanceUID: "committed" for ds in series[:2]} | {missing: "pending"}
    error = deliveries[missing].last_error
    assert error is not None and "Failure Reason 0x0112" in error  # No such object instance (PS3.4 J.3.3)
    with s.site.sessions() as session:
        (request,) = session.scalars(select(StorageCommitment)).all()
        assert (request.state, request.n_failed) == ("failed", 1)


def test_a_report_that_never_comes_stays_pending_then_is_retried_then_fails(start) -> None:
    s = start(report_port=free_port(), timeout_s=3.0, max_attempts=2)  # Orthanc reports to nobody
    series = s.site.derived_series(2)
    assert s.site.deliver() == 2
    assert set(states(s.site).values()) == {"committing"}
    time.sleep(0.5)
    assert s.site.deliver() == 0 and set(states(s.site).values()) == {"committing"}  # before the deadline
    time.sleep(2.5)
    s.site.deliver()  # past the deadline: the request expires, the deliveries are due again later
    deliveries = s.site.deliveries()
    assert {(d.state, d.attempts) for d in deliveries.values()} == {("pending", 1)}
    assert all("no N-EVENT-REPORT" in (d.last_error or "") for d in deliveries.values())
    s.site.make_due()
    assert s.site.deliver() == 2  # stored again, commitment requested again under a new Transaction UID
    assert set(states(s.site).values()) == {"committing"}
    time.sleep(3.0)
    s.site.deliver()
    assert {(d.state, d.attempts) for d in s.site.deliveries().values()} == {("failed", 2)}
    with s.site.sessions() as session:
        requests = session.scalars(select(StorageCommitment).order_by(StorageCommitment.id)).all()
        assert [r.state for r in requests] == ["expired", "expired"]
        assert len({r.transaction_uid for r in requests}) == 2
    assert {ds.SOPInstanceUID for ds in series} == set(deliveries)


def test_reports_are_parsed_per_ps3_4_table_j_3_2() -> None:
    info = commitment.action_request("1.2.3", [("1.2.840.10008.5.1.4.1.1.7", "1.2.3.1")])
    failed = Dataset()
    failed.ReferencedSOPClassUID, failed.ReferencedSOPInstanceUID, failed.FailureReason = "1.2", "1.2.3.2", 0x0112
    info.FailedSOPSequence = [failed]
    report = commitment.parse_report(2, info)
    assert (report.TransactionUID, report.committed) == ("1.2.3", ("1.2.3.1",))
    assert dict(report.failed) == {"1.2.3.2": 0x0112}
    with pytest.raises(ValueError, match="Event Type ID 3"):
        commitment.parse_report(3, info)
    assert str(StorageCommitmentPushModel) == "1.2.840.10008.1.20.1"


def _paths(site: Site, uids: list[str]) -> list[str]:
    from storage.instances import find_instance

    with site.sessions() as session:
        return [find_instance(session, uid).path for uid in uids]  # type: ignore[union-attr]


def test_a_report_on_the_same_association_is_taken_there(tmp_path: Path) -> None:
    """A Storage Commitment SCP that answers on the requesting association (PS3.4 J.3.3 allows it):
    a pynetdicom peer here, as Orthanc always opens a new association."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    def on_action(event: evt.Event) -> tuple[int, None]:
        request = event.action_information
        info = Dataset()
        info.TransactionUID = request.TransactionUID
        info.ReferencedSOPSequence = list(request.ReferencedSOPSequence)
        assoc = event.assoc

        def report() -> None:  # after the N-ACTION response, from another thread than the reactor
            time.sleep(0.05)
            assoc.send_n_event_report(info, 1, StorageCommitmentPushModel, commitment.STORAGE_COMMITMENT_INSTANCE)

        threading.Thread(target=report, daemon=True).start()
        return 0x0000, None

    scp = AE(ae_title="COMMITSCP")
    for context in AllStoragePresentationContexts:
        scp.add_supported_context(context.abstract_syntax)
    scp.add_supported_context(StorageCommitmentPushModel)
    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000), (evt.EVT_N_ACTION, on_action)],
    )
    try:
        peer = (
            f'[[peers]]\nname = "pacs"\nae_title = "COMMITSCP"\nhost = "127.0.0.1"\nport = {port}\n'
            "storage_commitment = true\n"
        )
        site = make_site(tmp_path, peer)  # no SCP of the node runs: only the same association can carry it
        site.derived_series(2)
        assert site.deliver() == 2
        assert set(states(site).values()) == {"committed"}
    finally:
        server.shutdown()


def test_the_scp_answers_reports_it_cannot_use(tmp_path: Path) -> None:
    """An unknown Transaction UID is acknowledged (nothing waits for it); an Event Type ID that is
    not a commitment result is refused with 0x0113 No such event type (PS3.7 10.1.1.1.8)."""
    from pynetdicom import AE, build_role

    node_port = free_port()
    site = make_site(tmp_path, "", node=f'bind_address = "127.0.0.1"\nport = {node_port}')
    scp = StorageSCP(site.settings, site.store, site.sessions)
    scp.start()
    try:
        ae = AE(ae_title="REPORTER")
        ae.dimse_timeout = 5
        ae.add_requested_context(StorageCommitmentPushModel)
        role = build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        assoc = ae.associate("127.0.0.1", node_port, ae_title="SVDRR", ext_neg=[role])
        assert assoc.is_established
        info = commitment.action_request("1.2.826.0.1.3680043.8.498.5", [("1.2.840.10008.5.1.4.1.1.7", "1.2.3")])
        try:
            status, _ = assoc.send_n_event_report(
                info, 1, StorageCommitmentPushModel, commitment.STORAGE_COMMITMENT_INSTANCE
            )
            assert status.Status == 0x0000
            status, _ = assoc.send_n_event_report(
                info, 5, StorageCommitmentPushModel, commitment.STORAGE_COMMITMENT_INSTANCE
            )
            assert status.Status == 0x0113
        finally:
            assoc.release()
    finally:
        scp.stop()
