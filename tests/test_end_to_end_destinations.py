"""The node as a user meets it, with the new destinations: storescu -> node (subprocess) -> a real
Orthanc by C-STORE with Storage Commitment, and a second real Orthanc by STOW-RS with basic auth."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from storage.models import Delivery
from tests.peers import DICOMWEB_PLUGIN, NodeProcess, Orthanc, node_config, run_cli, storescu, wait_for
from tests.test_end_to_end import AZIMUTHS, chest_cr, sessions_for
from tests.tiny_model import make_tiny_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(DICOMWEB_PLUGIN).is_file(), reason="apt-get install orthanc-dicomweb"),
]
PASSWORD = "stow-s3cret-password"


def test_committed_by_dimse_and_sent_by_stow_rs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import free_port

    model = make_tiny_model(tmp_path / "model", resolution=64)
    port = free_port()
    pacs = Orthanc(tmp_path / "pacs", modalities={"node": ("SVDRR", "127.0.0.1", port)})
    web = Orthanc(
        tmp_path / "web",
        ae_title="WEBPACS",
        plugins=(DICOMWEB_PLUGIN,),
        extra={"AuthenticationEnabled": True, "RegisteredUsers": {"dicomnode": PASSWORD}},
    )
    node: NodeProcess | None = None
    try:
        pacs.start()
        web.start()
        config = node_config(tmp_path, port=port, model=model, pacs_port=pacs.dicom_port)
        text = config.read_text()
        text = text.replace(
            "[[rules]]",
            "storage_commitment = true\n\n"
            f'[[peers]]\nname = "web"\nkind = "dicomweb"\nurl = "{web.dicomweb_url}"\n'
            'username = "dicomnode"\npassword_env = "TEST_WEB_PASSWORD"\n\n[[rules]]',
        ).replace('destinations = ["pacs"]', 'destinations = ["pacs", "web"]')
        config.write_text(text)
        monkeypatch.setenv("TEST_WEB_PASSWORD", PASSWORD)
        node = NodeProcess(config, port, tmp_path / "node.log").start()
        (cr,) = chest_cr(tmp_path)
        source = pydicom.dcmread(cr)
        assert storescu(port, [cr]).returncode == 0

        def settled() -> dict[str, list[str]] | None:
            with sessions_for(tmp_path)() as session:
                rows = session.query(Delivery).all()
            by_peer = {p: sorted(d.state for d in rows if d.peer_name == p) for p in ("pacs", "web")}
            done = by_peer == {"pacs": ["committed"] * len(AZIMUTHS), "web": ["sent"] * len(AZIMUTHS)}
            return by_peer if done else None

        wait_for(settled, 180, "deliveries committed at the PACS and sent to the DICOMweb peer", interval_s=0.5)
        for orthanc in (pacs, web):
            studies = orthanc.get("/studies?expand")
            assert [s["MainDicomTags"]["StudyInstanceUID"] for s in studies] == [source.StudyInstanceUID]
            (series,) = [orthanc.get(f"/series/{s}") for s in studies[0]["Series"]]
            assert len(series["Instances"]) == len(AZIMUTHS)
            assert "SYNTHETIC" in series["MainDicomTags"]["SeriesDescription"]
        listing = run_cli("deliveries", "--config", str(config))
        assert listing.returncode == 0, listing.stderr
        states = [line.split()[1:3] for line in listing.stdout.splitlines()[1:]]
        assert sorted(states) == [["committed", "pacs"]] * len(AZIMUTHS) + [["sent", "web"]] * len(AZIMUTHS)
    finally:
        if node is not None:
            node.stop()
        pacs.stop()
        web.stop()
    assert node is not None and PASSWORD not in node.log()
    assert "storage commitment" in node.log()
