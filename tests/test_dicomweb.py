"""STOW-RS delivery against a real Orthanc with its DICOMweb plugin (Debian ``orthanc-dicomweb``)."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from dicomnode.config import PeerSettings
from dicomnode.errors import ConfigError
from dicomnode.stow import multipart_body, parse_response
from storage.deliveries import resend
from tests.conftest import free_port
from tests.delivery_sites import make_site
from tests.peers import DICOMWEB_PLUGIN, Orthanc

pytestmark = pytest.mark.skipif(not Path(DICOMWEB_PLUGIN).is_file(), reason="apt-get install orthanc-dicomweb")


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    started: list[Orthanc] = []

    def start(**extra: object) -> Orthanc:
        pacs = Orthanc(tmp_path / f"orthanc-{len(started)}", plugins=(DICOMWEB_PLUGIN,), extra=dict(extra))
        started.append(pacs)
        return pacs.start()

    yield start
    for pacs in started:
        pacs.stop()


def web_peer(url: str, auth: str = "") -> str:
    return f'[[peers]]\nname = "web"\nkind = "dicomweb"\nurl = "{url}"\n{auth}\n'


def orthanc_series(pacs: Orthanc, SeriesInstanceUID: str) -> list[str]:
    """SOP Instance UIDs Orthanc holds in that series."""
    found = pacs.post("/tools/lookup", SeriesInstanceUID.encode())
    if not found:
        return []
    instances = pacs.get(f"/series/{found[0]['ID']}/instances")
    return sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in instances)


def test_stow_delivers_a_derived_series_into_its_study(tmp_path: Path, orthanc: Callable[..., Orthanc]) -> None:
    pacs = orthanc()
    site = make_site(tmp_path, web_peer(pacs.dicomweb_url))
    series = site.derived_series(3)
    assert site.deliver() == 3
    deliveries = site.deliveries()
    assert {(d.state, d.status_code, d.attempts, d.peer_port) for d in deliveries.values()} == {
        ("sent", 0x0000, 1, pacs.http_port)
    }
    assert orthanc_series(pacs, series[0].SeriesInstanceUID) == sorted(ds.SOPInstanceUID for ds in series)
    # In the study of the source radiograph, and byte for byte what the node stored.
    study = pacs.post("/tools/lookup", series[0].StudyInstanceUID.encode())
    assert [s["Type"] for s in study] == ["Study"]
    uid = series[1].SOPInstanceUID
    orthanc_id = pacs.post("/tools/lookup", uid.encode())[0]["ID"]
    with site.sessions() as session:
        from storage.instances import find_instance

        row = find_instance(session, uid)
        assert row is not None
        assert hashlib.sha256(pacs.get(f"/instances/{orthanc_id}/file")).hexdigest() == row.sha256
    assert pacs.get(f"/instances/{orthanc_id}/simplified-tags")["SeriesDescription"].startswith("SYNTHETIC")


def test_an_instance_orthanc_refuses_fails_alone_and_is_retried(
    tmp_path: Path, orthanc: Callable[..., Orthanc]
) -> None:
    site_folder = tmp_path / "site"
    site_folder.mkdir()
    site = make_site(site_folder, web_peer("http://127.0.0.1:1/dicom-web"))  # peer fixed below
    series = site.derived_series(3)
    # A site policy in Orthanc refuses exactly one instance (its Lua callback raises an error). The
    # DICOMweb plugin (1.7 on Orthanc 1.10) then leaves that part out of its answer, neither stored
    # nor failed, and stops reading the request there: the refused instance is the last one sent.
    refused = series[-1].SOPInstanceUID
    lua = tmp_path / "refuse.lua"
    lua.write_text(
        "function ReceivedInstanceFilter(dicom, origin, info)\n"
        f'  if dicom.SOPInstanceUID == "{refused}" then error("refused by site policy") end\n'
        "  return true\nend\n"
    )
    pacs = orthanc(LuaScripts=[str(lua)])
    site.settings = make_site(site_folder, web_peer(pacs.dicomweb_url)).settings
    assert site.deliver() == 2
    deliveries = site.deliveries()
    assert {uid: d.state for uid, d in deliveries.items()} == {
        ds.SOPInstanceUID: ("pending" if ds.SOPInstanceUID == refused else "sent") for ds in series
    }
    failed = deliveries[refused]
    assert failed.attempts == 1 and failed.status_code is None
    assert failed.last_error is not None and "not in the STOW-RS response" in failed.last_error
    assert orthanc_series(pacs, series[0].SeriesInstanceUID) == sorted(
        ds.SOPInstanceUID for ds in series if ds.SOPInstanceUID != refused
    )
    # Retried on the next due round (the refusal may be temporary); the others are not sent again.
    site.make_due()
    assert site.deliver() == 0
    again = site.deliveries()
    assert (again[refused].state, again[refused].attempts) == ("pending", 2)
    assert {again[ds.SOPInstanceUID].attempts for ds in series if ds.SOPInstanceUID != refused} == {1}


def test_orthanc_failed_sop_sequence_is_read_per_instance(tmp_path: Path, orthanc: Callable[..., Orthanc]) -> None:
    """A real partial answer: POSTed to one study, Orthanc refuses the instance of another study in
    the Failed SOP Sequence with a Failure Reason, in JSON and in XML alike."""
    pacs = orthanc()
    site = make_site(tmp_path, web_peer(pacs.dicomweb_url))
    series = site.derived_series(2)
    other = series[1].copy()
    other.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.424242"
    parts = []
    for ds in (series[0], other):
        path = tmp_path / f"{uuid.uuid4().hex}.dcm"
        ds.save_as(path, enforce_file_format=True)
        parts.append(path.read_bytes())
    for accept in ("application/dicom+json", "application/dicom+xml"):
        boundary = uuid.uuid4().hex
        response = requests.post(
            f"{pacs.dicomweb_url}/studies/{series[0].StudyInstanceUID}",
            data=multipart_body(parts, boundary),
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": accept,
            },
            timeout=30,
        )
        parsed = parse_response(response.headers.get("Content-Type", accept), response.content)
        assert parsed is not None, (accept, response.status_code, response.text[:300])
        assert set(parsed.failed) == {other.SOPInstanceUID}
        reason = parsed.failed[other.SOPInstanceUID]
        assert reason is not None and reason != 0
        assert set(parsed.referenced) <= {series[0].SOPInstanceUID}


def test_bad_credentials_fail_at_once_with_the_reason_then_resend_succeeds(
    tmp_path: Path, orthanc: Callable[..., Orthanc], monkeypatch: pytest.MonkeyPatch
) -> None:
    pacs = orthanc(AuthenticationEnabled=True, RegisteredUsers={"node": "s3cret-pw"})
    auth = 'username = "node"\npassword_env = "TEST_STOW_PASSWORD"'
    site = make_site(tmp_path, web_peer(pacs.dicomweb_url, auth))
    series = site.derived_series(2)
    monkeypatch.setenv("TEST_STOW_PASSWORD", "wrong")
    assert site.deliver() == 0
    deliveries = site.deliveries()
    for d in deliveries.values():
        assert (d.state, d.attempts) == ("failed", 1)  # deterministic: not retried
        assert d.last_error is not None and "HTTP 401" in d.last_error
        assert "wrong" not in d.last_error
    assert orthanc_series(pacs, series[0].SeriesInstanceUID) == []
    monkeypatch.setenv("TEST_STOW_PASSWORD", "s3cret-pw")
    with site.sessions.begin() as session:
        for d in deliveries.values():
            resend(session, d.id)
    assert site.deliver() == 2
    assert {d.state for d in site.deliveries().values()} == {"sent"}
    assert len(orthanc_series(pacs, series[0].SeriesInstanceUID)) == 2


def test_a_url_that_is_no_stow_rs_service_fails_at_once(tmp_path: Path, orthanc: Callable[..., Orthanc]) -> None:
    pacs = orthanc()
    site = make_site(tmp_path, web_peer(f"http://127.0.0.1:{pacs.http_port}/no-such-service"))
    site.derived_series(1)
    assert site.deliver() == 0
    (d,) = site.deliveries().values()
    assert (d.state, d.attempts) == ("failed", 1)
    assert d.last_error is not None and "HTTP 404" in d.last_error


def test_an_unreachable_server_is_transient(tmp_path: Path) -> None:
    site = make_site(tmp_path, web_peer(f"http://127.0.0.1:{free_port()}/dicom-web"))
    site.derived_series(2)
    assert site.deliver() == 0
    for d in site.deliveries().values():
        assert (d.state, d.attempts) == ("pending", 1)
        assert d.last_error is not None and "unreachable" in d.last_error


def test_dicomweb_peer_settings(tmp_path: Path) -> None:
    url = "https://pacs.example:8443/dicom-web"
    peer = PeerSettings(name="web", kind="dicomweb", url=url, bearer_token="s3cr3t-t0ken")
    assert (peer.host, peer.port, peer.ae_title) == ("pacs.example", 8443, "")
    assert "s3cr3t-t0ken" not in repr(peer)
    assert peer.credentials({}) == "s3cr3t-t0ken"
    env_peer = PeerSettings(name="web", kind="dicomweb", url="http://h/dw", username="u", password_env="PW")
    assert env_peer.credentials({"PW": "p"}) == ("u", "p")
    with pytest.raises(ConfigError, match=r"password_env: \$PW is not set"):
        env_peer.credentials({})
    bad = [
        ({"url": "ftp://h/x"}, r"peers\[web\]\.url: must be the STOW-RS base URL"),
        ({"url": "http://u:p@h/x"}, r"peers\[web\]\.url: put credentials in username/password keys"),
        ({"url": "http://h/x", "ae_title": "X"}, r"peers\[web\]\.ae_title: not for kind"),
        ({"url": "http://h/x", "username": "u"}, r"password: give exactly one"),
        ({"url": "http://h/x", "username": "u", "password": "p", "bearer_token": "t"}, r"not both"),
        ({"url": "http://h/x", "tls_ca_file": tmp_path / "none.pem"}, r"tls_ca_file: file not found"),
    ]
    for extra, message in bad:
        with pytest.raises(ConfigError, match=message):
            PeerSettings(name="web", kind="dicomweb", **extra)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"peers\[pacs\]\.url: only for kind"):
        PeerSettings(name="pacs", ae_title="P", host="h", port=104, url="http://h/x")
    with pytest.raises(ConfigError, match=r"peers\[pacs\]\.kind: must be one of"):
        PeerSettings(name="pacs", kind="http", ae_title="P", host="h", port=104)


def test_parse_response_of_a_non_dicom_body_is_none() -> None:
    assert parse_response("text/html", b"<html>401</html>") is None
    assert parse_response("application/dicom+json", b"not json") is None
    body = {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3"]}}]}}
    parsed = parse_response("application/dicom+json", json.dumps(body).encode())
    assert parsed is not None and dict(parsed.referenced) == {"1.2.3": None} and not parsed.failed


def test_config_check_shows_the_dicomweb_peer_without_its_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicomnode.cli import main

    auth = 'username = "node"\npassword = "in-file-s3cret"'
    site = make_site(tmp_path, web_peer("https://pacs.example.org/dicom-web", auth))
    assert main(["config", "check", "--config", str(site.settings.source)]) == 0
    out = capsys.readouterr().out
    assert "web: STOW-RS https://pacs.example.org/dicom-web" in out
    assert "in-file-s3cret" not in out and "in-file-s3cret" not in repr(site.settings)


def test_a_2xx_page_without_a_response_data_set_is_no_success(tmp_path: Path) -> None:
    """A portal or proxy answering 200 with HTML (Orthanc never does; a tiny local server plays it)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Portal(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b"<html>Welcome</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Portal)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        site = make_site(tmp_path, web_peer(f"http://127.0.0.1:{server.server_address[1]}/dicom-web"))
        site.derived_series(1)
        assert site.deliver() == 0
        (d,) = site.deliveries().values()
        assert (d.state, d.attempts) == ("pending", 1)
        assert d.last_error is not None and "no STOW-RS response data set" in d.last_error
    finally:
        server.shutdown()
