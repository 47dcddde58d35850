"""The console as an operator meets it, in a real browser: Debian's Chromium driven headless by
Playwright, a real node (``dicomnode serve``) with the shipped demo model, a real Orthanc as PACS,
the shipped sample sent with dcmtk's storescu.

Screenshots of every page visited are saved under the test's folder; with
``DICOMNODE_SCREENSHOTS=DIR`` they are also written to DIR (``docs/images`` for the README).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.console_helpers import SAMPLE, Client, dataset_bytes, scrape
from tests.peers import NodeProcess, Orthanc, node_config, storescu, wait_for

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"
AZIMUTHS = [-90.0, -60.0, -30.0, 30.0, 60.0, 90.0]  # the shipped rule's views


@pytest.fixture()
def browser() -> Any:
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (apt-get install chromium chromium-driver)")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def shoot(page: Any, folder: Path, name: str) -> None:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get("DICOMNODE_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)


def images_loaded(page: Any, selector: str) -> list[int]:
    """Natural widths of the images under ``selector`` once every one has finished loading."""
    page.wait_for_function(
        "sel => [...document.querySelectorAll(sel)].every(i => i.complete)", arg=selector, timeout=60_000
    )
    return page.eval_on_selector_all(selector, "imgs => imgs.map(i => i.naturalWidth)")


def _answers(base: str) -> bool:
    try:
        return Client(base).get("/healthz")[0] == 200
    except OSError:
        return False


def test_operator_tour_in_a_real_browser(tmp_path: Path, browser: Any) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    orthanc = Orthanc(tmp_path / "orthanc").start()
    http_port, port = free_port(), free_port()
    config = node_config(
        tmp_path, port=port, model=DEMO, pacs_port=orthanc.dicom_port, azimuths=str(AZIMUTHS), http_port=http_port
    )
    # The demo model at its shipped settings (config/dicomnode.toml), so the pages show its real views.
    text = config.read_text().replace("steps = 2\n", "steps = 20\n")
    text = text.replace("guidance_scale = 3.0", "guidance_scale = 1.5")
    config.write_text(text)
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    base = f"http://127.0.0.1:{http_port}"
    try:
        api = Client(base)
        wait_for(lambda: _answers(base), 30, "the console to answer")  # it starts just after the SCP
        assert api.get("/readyz")[0] == 200
        before = scrape(base)
        result = storescu(port, [SAMPLE], calling="MYSCU")
        assert result.returncode == 0, result.stderr

        def delivered() -> bool:
            [study] = api.json("GET", "/api/v1/studies")[1]["studies"] or [None]
            if study is None or study["state"] != "done":
                return False
            deliveries = api.json("GET", "/api/v1/deliveries")[1]["deliveries"]
            return len(deliveries) == len(AZIMUTHS) and all(d["state"] == "sent" for d in deliveries)

        wait_for(delivered, 240, "synthesis and delivery to Orthanc", interval_s=1)
        after = scrape(base)

        def moved(name: str, **labels: str) -> float:
            key = (name, tuple(sorted(labels.items())))
            return after.get(key, 0.0) - before.get(key, 0.0)

        assert moved("dicomnode_associations_total", result="accepted") == 1
        assert moved("dicomnode_cstore_requests_total", status="0x0000") == 1
        assert moved("dicomnode_received_bytes_total") == dataset_bytes(SAMPLE)
        assert after[("dicomnode_jobs", (("state", "done"),))] == 1
        assert after[("dicomnode_job_duration_seconds_count", ())] == 1
        assert after[("dicomnode_synthesis_seconds_per_view_count", ())] == len(AZIMUTHS)
        assert after[("dicomnode_deliveries_total", (("peer", "pacs"), ("result", "sent")))] == len(AZIMUTHS)
        [identity] = [dict(k[1])["identity"] for k in after if k[0] == "dicomnode_model_info"]
        assert len(identity) == 64 and identity != "unknown"

        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(base + "/")
        assert "SVDRR" in page.inner_text("header")
        shoot(page, shots, "overview")

        page.goto(base + "/studies")
        widths = images_loaded(page, "#studies img")
        assert len(widths) == 1 + len(AZIMUTHS) and all(w > 0 for w in widths), widths
        assert "DEMO^PHANTOM" in page.inner_text("#studies")
        assert "+30°" in page.inner_text("#studies") and "done" in page.inner_text("#studies")
        shoot(page, shots, "studies")

        page.click("#studies tr.study a")
        page.wait_for_url("**/jobs/*")
        widths = images_loaded(page, "#sheet img")
        assert len(widths) == 1 + len(AZIMUTHS) and all(w > 0 for w in widths), widths
        assert "MYSCU" in page.inner_text(".chain")  # the association that brought the input
        outputs = page.inner_text("#outputs")
        assert outputs.count("0x0000") == len(AZIMUTHS) and "ORTHANC" in outputs
        shoot(page, shots, "job")

        page.click("#outputs button.resend >> nth=0")
        page.wait_for_selector("#flash")
        assert "queued again" in page.inner_text("#flash")
        page.goto(base + "/audit")
        rows = page.inner_text("#audit")
        assert "delivery.resend" in rows and "local" in rows and "127.0.0.1" in rows
        shoot(page, shots, "audit")

        page.goto(base + "/rules")
        page.set_input_files("#rule-file", str(SAMPLE))
        page.click("#rule-test")
        page.wait_for_selector("#rule-result")
        assert page.locator("#rule-result tr.rule-match").count() == 1
        assert "chest" in page.inner_text("#rule-result tr.rule-match")
        shoot(page, shots, "rules")

        page.goto(base + "/peers")
        page.click("button.echo")
        page.wait_for_selector("#echo-result")
        echo = page.inner_text("#echo-result")
        assert "0x0000" in echo and "round trip" in echo
        shoot(page, shots, "peers")

        wait_for(lambda: all(d["state"] == "sent" for d in api.json("GET", "/api/v1/deliveries")[1]["deliveries"]),
                 60, "the resent instance to be acknowledged again")
        assert len(orthanc.get("/instances")) == len(AZIMUTHS)  # the resent view is stored once
    finally:
        node.stop()
        orthanc.stop()
