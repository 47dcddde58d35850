"""The operator console over real HTTP (uvicorn on a free port) beside a real SCP: metrics, auth,
CSRF, audit, rule tester, health, configuration rules. The browser tour is test_console_browser.py."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicomnode.config import load_settings
from dicomnode.console.passwords import hash_password, verify_password
from dicomnode.console.ruletester import RuleTestError, explain
from dicomnode.errors import ConfigError
from storage.db import upgrade
from storage.deliveries import DeliveryTarget, create_deliveries, mark_failed
from storage.models import AuditEvent, Delivery
from tests.conftest import dcmtk
from tests.console_helpers import SAMPLE, Client, console_settings, dataset_bytes, running_edge, scrape
from tests.peers import run_cli, wait_for

TOKEN = "s3cret-token-for-tests-0123456789"


def storescu(port: int, *files: Path, called: str = "SVDRR") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("storescu"), "-aet", "TESTSCU", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_metrics_counters_move_by_exactly_what_was_sent(tmp_path: Path) -> None:
    ct = Path(get_testdata_file("CT_small.dcm"))
    with running_edge(console_settings(tmp_path)) as edge:
        before = scrape(edge.url)
        assert storescu(edge.scp.port, SAMPLE, ct).returncode == 0
        assert storescu(edge.scp.port, SAMPLE, called="NOTUS").returncode != 0  # rejected association
        rejected = ("dicomnode_associations_total", (("result", "rejected"),))
        # The SCP records and counts a rejection just after sending it: wait for it to land.
        wait_for(lambda: scrape(edge.url)[rejected] > before[rejected], 10, "the rejection to be counted")
        time.sleep(0.5)  # anything more that would (wrongly) arrive
        after = scrape(edge.url)
        stored = sorted(edge.store.root.rglob("*.dcm"))

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert moved("dicomnode_associations_total", result="accepted") == 1
    assert moved("dicomnode_associations_total", result="rejected") == 1
    assert moved("dicomnode_cstore_requests_total", status="0x0000") == 2
    # The data sets as they came over the wire, which the store keeps unchanged (dcmtk drops CT_small's
    # group length elements, so its file on disk here is smaller than pydicom-data's).
    assert len(stored) == 2
    assert moved("dicomnode_received_bytes_total") == sum(dataset_bytes(p) for p in stored)
    assert dataset_bytes(SAMPLE) in {dataset_bytes(p) for p in stored}
    assert after[("dicomnode_jobs", (("state", "queued"),))] == 1  # the chest DX; the CT matches no rule
    assert after[("dicomnode_jobs", (("state", "done"),))] == 0
    assert after[("dicomnode_storage_free_bytes", ())] > 0
    assert after[("dicomnode_job_duration_seconds_count", ())] == 0
    assert ("dicomnode_model_info", (("identity", "unknown"),)) in after


def test_a_duplicate_with_other_content_counts_under_its_failure_status(tmp_path: Path) -> None:
    other = tmp_path / "other.dcm"
    ds = pydicom.dcmread(SAMPLE)
    ds.PatientID = "CHANGED"
    ds.save_as(other)
    with running_edge(console_settings(tmp_path)) as edge:
        assert storescu(edge.scp.port, SAMPLE).returncode == 0
        storescu(edge.scp.port, other)
        samples = scrape(edge.url)
    assert samples[("dicomnode_cstore_requests_total", (("status", "0x0000"),))] == 1
    failures = {k[1]: v for k, v in samples.items() if k[0] == "dicomnode_cstore_requests_total" and v}
    assert len(failures) == 2, failures  # Success once, and one failure code (hex) for the conflicting resend


def test_token_protects_api_metrics_and_pages_but_not_health(tmp_path: Path) -> None:
    settings = console_settings(tmp_path, http=f'api_token = "{TOKEN}"')
    with running_edge(settings) as edge:
        anonymous = Client(edge.url)
        assert anonymous.get("/api/v1/overview")[0] == 401
        assert anonymous.get("/metrics")[0] == 401
        status, headers, _ = anonymous.get("/studies")
        assert status == 303 and headers["Location"] == "/login"
        assert anonymous.get("/healthz")[0] == 200
        assert anonymous.get("/readyz")[0] == 200
        assert Client(edge.url, "wrong-token-wrong-token").get("/api/v1/overview")[0] == 401
        status, overview = Client(edge.url, TOKEN).json("GET", "/api/v1/overview")
        assert status == 200 and overview["node"]["ae_title"] == "SVDRR" and overview["node"]["up"] is True
        status, config = Client(edge.url, TOKEN).json("GET", "/api/v1/config")
        assert config["http"]["api_token"] == "***" and TOKEN not in json.dumps(config)


def test_login_with_a_user_then_post_needs_the_csrf_token_and_is_audited(tmp_path: Path) -> None:
    settings = console_settings(tmp_path, http=f'username = "admin"\npassword_hash = "{hash_password("pw", 1000)}"')
    with running_edge(settings) as edge:
        with edge.ctx.sessions.begin() as session:
            from storage.instances import record_instance

            row = record_instance(
                session, sop_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                study_instance_uid="1.2.3", series_instance_uid="1.2.3.5", transfer_syntax_uid="1.2.840.10008.1.2.1",
                path="x.dcm", sha256="0" * 64, size_bytes=1, origin="derived", synthetic=True,
            )
            [delivery] = create_deliveries(session, row.id, [DeliveryTarget("pacs", "ORTHANC", "127.0.0.1", 1)])
            mark_failed(session, delivery.id, "refused", timedelta(seconds=1), max_attempts=1)
        browser = Client(edge.url)
        csrf = browser.csrf_from("/login")
        assert browser.post_form("/login", {"username": "admin", "password": "no", "csrf_token": csrf})[0] == 401
        status, headers, _ = browser.post_form("/login", {"username": "admin", "password": "pw", "csrf_token": csrf})
        assert status == 303 and headers["Location"] == "/"
        assert browser.get("/deliveries")[0] == 200
        assert browser.post_form(f"/deliveries/{delivery.id}/resend", {})[0] == 403  # no CSRF token
        csrf = browser.csrf_from("/deliveries")
        assert browser.post_form(f"/deliveries/{delivery.id}/resend", {"csrf_token": csrf})[0] == 303
        with edge.ctx.sessions() as session:
            assert session.get(Delivery, delivery.id).state == "pending"
            events = session.query(AuditEvent).order_by(AuditEvent.id).all()
        assert [(e.action, e.outcome, e.actor) for e in events] == [
            ("login", "refused", "admin"),
            ("login", "ok", "admin"),
            ("delivery.resend", "ok", "admin"),
        ]
        assert events[-1].remote_addr == "127.0.0.1" and events[-1].target == f"delivery {delivery.id}"
        status, body = Client(edge.url).json("POST", f"/api/v1/deliveries/{delivery.id}/resend")
        assert status == 401


def test_api_post_from_the_loopback_without_auth_still_needs_csrf(tmp_path: Path) -> None:
    with running_edge(console_settings(tmp_path)) as edge:
        client = Client(edge.url)
        assert client.request("POST", "/api/v1/deliveries/resend-failed")[0] == 403
        _, token = client.json("GET", "/api/v1/csrf")
        status, body = client.json(
            "POST", "/api/v1/deliveries/resend-failed", headers={"X-CSRF-Token": token["csrf_token"]}
        )
        assert status == 200 and body == {"resent": []}
        _, audit = client.json("GET", "/api/v1/audit")
        assert [(e["action"], e["actor"]) for e in audit["audit"]] == [("delivery.resend_failed", "local")]


def test_echo_of_an_unreachable_peer_reports_failure_and_round_trip(tmp_path: Path) -> None:
    with running_edge(console_settings(tmp_path)) as edge:
        client = Client(edge.url)
        _, token = client.json("GET", "/api/v1/csrf")
        status, result = client.json("POST", "/api/v1/peers/pacs/echo", headers={"X-CSRF-Token": token["csrf_token"]})
        assert status == 200 and result["ok"] is False and result["error"] and result["rtt_ms"] >= 0
        status, _ = client.json("POST", "/api/v1/peers/nobody/echo", headers={"X-CSRF-Token": token["csrf_token"]})
        assert status == 404


def test_readyz_is_503_with_the_reason_when_the_store_is_below_its_watermark(tmp_path: Path) -> None:
    with running_edge(console_settings(tmp_path, min_free_mb=2**40)) as edge:
        status, body = Client(edge.url).json("GET", "/readyz")
        assert Client(edge.url).get("/healthz")[0] == 200
    assert status == 503 and body["ready"] is False
    assert [r.split(":")[0] for r in body["reasons"]] == ["store"]
    assert "below the watermark" in body["reasons"][0]


def test_studies_api_and_thumbnail_of_the_stored_sample(tmp_path: Path) -> None:
    with running_edge(console_settings(tmp_path)) as edge:
        assert storescu(edge.scp.port, SAMPLE).returncode == 0
        client = Client(edge.url)
        _, studies = client.json("GET", "/api/v1/studies")
        [study] = studies["studies"]
        assert (study["rule"], study["state"], study["input"]["modality"]) == ("chest", "queued", "DX")
        assert study["input"]["patient"]["PatientName"] == "DEMO^PHANTOM"
        assert client.json("GET", "/api/v1/studies?state=done")[1]["studies"] == []
        ct = Path(get_testdata_file("CT_small.dcm"))  # no rule takes it: listed as not processed
        assert storescu(edge.scp.port, ct).returncode == 0
        _, listed = client.json("GET", "/api/v1/studies")
        assert [(s["job_id"], s["state"]) for s in listed["studies"]] == [
            (None, "not processed"), (study["job_id"], "queued")
        ]
        _, queued = client.json("GET", "/api/v1/studies?state=queued")
        assert [s["job_id"] for s in queued["studies"]] == [study["job_id"]]
        _, unprocessed = client.json("GET", "/api/v1/studies?state=not%20processed")
        assert [s["input"]["modality"] for s in unprocessed["studies"]] == ["CT"]
        assert client.json("GET", "/api/v1/studies?since=2999-01-01")[1]["studies"] == []
        assert client.get("/api/v1/studies?since=yesterday")[0] == 400
        status, headers, png = client.get(f"/thumbnails/{study['input']['id']}.png?size=128")
        assert status == 200 and headers["Content-Type"] == "image/png"
        from io import BytesIO

        from PIL import Image

        image = Image.open(BytesIO(png))
        assert max(image.size) == 128 and image.getextrema()[1] > image.getextrema()[0]
        cached = list(edge.ctx.thumbnail_dir.rglob("*.png"))
        assert len(cached) == 1
        assert client.get(f"/thumbnails/{study['input']['id']}.png?size=128")[2] == png
        status, job = client.json("GET", f"/api/v1/jobs/{study['job_id']}")
        assert job["association"]["calling_ae"] == "TESTSCU" and job["job"]["azimuths"] == [-30.0, 30.0]
        for page in ("/", "/studies", f"/jobs/{study['job_id']}", "/deliveries", "/peers", "/rules",
                     "/associations", "/config", "/audit"):
            status, _, html = client.get(page)
            assert status == 200, page
            assert b"2.25." not in client.get("/")[2] or page != "/"  # no UIDs needed on the overview
        assert b"DEMO^PHANTOM" in client.get("/studies")[2]


def test_rule_tester_explains_matches_misses_and_loop_prevention(tmp_path: Path) -> None:
    settings = console_settings(tmp_path)
    result = explain(settings, SAMPLE.read_bytes())
    assert result["matched"] == ["chest"]
    chest, knee = result["rules"]
    assert [v["azimuth"] for v in chest["views"]] == [-30.0, 30.0] and chest["destinations"] == ["pacs"]
    assert any("Modality (0008,0060) 'DX' is not in modalities ['CT']" in r for r in knee["reasons"])
    assert any("Body Part Examined" in r for r in knee["reasons"])
    derived = pydicom.dcmread(SAMPLE)
    derived.ImageType = ["DERIVED", "SECONDARY"]
    path = tmp_path / "derived.dcm"
    derived.save_as(path)
    result = explain(settings, path.read_bytes())
    assert result["matched"] == [] and "DERIVED" in result["loop_prevention"]
    assert all(r["reasons"][0].startswith("loop prevention:") for r in result["rules"])
    with pytest.raises(RuleTestError):
        explain(settings, b"not dicom at all")


def test_rule_tester_over_http_stores_nothing(tmp_path: Path) -> None:
    with running_edge(console_settings(tmp_path)) as edge:
        client = Client(edge.url)
        _, token = client.json("GET", "/api/v1/csrf")
        status, result = client.json(
            "POST", "/api/v1/rules/test", data=SAMPLE.read_bytes(),
            headers={"Content-Type": "application/dicom", "X-CSRF-Token": token["csrf_token"]},
        )
        assert status == 200 and result["matched"] == ["chest"]
        assert not list(edge.settings.node.storage_dir.rglob("*.dcm"))


def test_non_loopback_console_needs_authentication(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="http.bind_address"):
        console_settings(tmp_path, http='bind_address = "0.0.0.0"')
    assert console_settings(tmp_path, http=f'bind_address = "0.0.0.0"\napi_token = "{TOKEN}"').http.authentication
    assert console_settings(tmp_path, http='bind_address = "::1"').http.bind_address == "::1"
    with pytest.raises(ConfigError, match="http.password_hash"):
        console_settings(tmp_path, http='username = "admin"')
    with pytest.raises(ConfigError, match="http.api_token"):
        console_settings(tmp_path, http='api_token = "short"')
    plain = console_settings(tmp_path)
    with pytest.raises(ConfigError, match="not a loopback address"):
        load_settings(plain.source, env={"DICOMNODE_HTTP__BIND_ADDRESS": "10.1.2.3"})


def test_console_serves_https_with_the_node_certificate(tmp_path: Path) -> None:
    import ssl
    import urllib.request

    from tests.test_scu import make_pki

    pki = make_pki(tmp_path)
    security = f'tls_certificate = "{pki["server"]}"\ntls_private_key = "{pki["server_key"]}"'
    settings = console_settings(tmp_path, http=f'tls = true\napi_token = "{TOKEN}"', security=security)
    with running_edge(settings) as edge:
        context = ssl.create_default_context(cafile=str(pki["ca"]))
        request = urllib.request.Request(
            f"https://127.0.0.1:{edge.console.port}/api/v1/overview", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, context=context, timeout=10) as r:
            assert r.status == 200 and json.loads(r.read())["node"]["ae_title"] == "SVDRR"
        with pytest.raises(OSError):  # plain HTTP is not served
            urllib.request.urlopen(f"http://127.0.0.1:{edge.console.port}/healthz", timeout=10).read()


def test_password_hash_round_trip() -> None:
    encoded = hash_password("correct horse", 1000)
    assert encoded.startswith("pbkdf2_sha256$1000$")
    assert verify_password("correct horse", encoded)
    assert not verify_password("wrong", encoded)
    assert not verify_password("correct horse", "garbage")


def test_status_exits_non_zero_when_the_node_does_not_answer(tmp_path: Path) -> None:
    settings = console_settings(tmp_path)
    settings.node.storage_dir.mkdir(parents=True)
    upgrade(settings.node.effective_database_url)  # a node ran here once and is down now
    result = run_cli("status", "--config", str(settings.source))
    assert result.returncode == 4, result.stdout + result.stderr
    assert "NOT answering" in result.stdout


def test_the_shipped_orthanc_configuration_answers_and_stores_what_the_node_sends(tmp_path: Path) -> None:
    """config/orthanc.json, the tour's PACS, on free ports: C-ECHO and C-STORE from AE SVDRR work."""
    from dicomnode.config import PeerSettings
    from dicomnode.scu import echo, send
    from tests.conftest import free_port
    from tests.peers import ORTHANC

    shipped = json.loads((Path(__file__).resolve().parent.parent / "config" / "orthanc.json").read_text())
    assert (shipped["DicomAet"], shipped["DicomPort"], shipped["HttpPort"]) == ("ORTHANC", 4242, 8042)
    dicom_port, http_port = free_port(), free_port()
    config = {
        **shipped,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "StorageDirectory": str(tmp_path / "storage"),
        "IndexDirectory": str(tmp_path / "index"),
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log = (tmp_path / "orthanc.log").open("wb")
    proc = subprocess.Popen([ORTHANC, str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    try:
        peer = PeerSettings(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=dicom_port)

        def answers() -> bool:
            try:
                return echo(peer, "SVDRR", timeout_s=2) == 0
            except Exception:
                return False

        wait_for(answers, 30, "Orthanc on the shipped configuration")
        [result] = send(peer, "SVDRR", [SAMPLE])
        assert result.succeeded
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def test_the_node_refuses_to_start_when_the_console_port_is_taken(tmp_path: Path) -> None:
    import socket

    settings = console_settings(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", settings.http.port))
        taken.listen()
        with pytest.raises(ConfigError, match="http.port"), running_edge(settings):
            pass
