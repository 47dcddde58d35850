"""The STOW-RS client: store a series on a DICOMweb peer by one HTTP POST (PS3.18 10.5).

The request is ``multipart/related; type="application/dicom"``, one part per instance, the stored
bytes unchanged, POSTed to ``{url}/studies/{StudyInstanceUID}`` when every instance belongs to one
study (the origin server then refuses any that does not, PS3.18 10.5.1) and to ``{url}/studies``
otherwise. The response data set (JSON or XML, PS3.18 10.5.3 and Table 10.5.3-1) names each stored
instance in the Referenced SOP Sequence (0008,1199) and each refused one, with its Failure Reason
(0008,1197), in the Failed SOP Sequence (0008,1198). The answer becomes one :class:`SendResult` per
instance, as from a C-STORE, so the delivery loop treats both alike: Success 0x0000 (or the Warning
Reason), the Failure Reason code for a failed one, and no status at all for one the response does
not mention.

Whole-request failures raise: :class:`DeliveryRefused` for 3xx (not followed) and 4xx answers
other than 408 and 429 (bad credentials, not found, unsupported media: retrying cannot help),
:class:`DeliveryError` for 408, 429, 5xx, network errors and a 2xx answer without a response data
set (transient). Whenever the body is a STOW-RS response data set, it decides per instance,
whatever the HTTP status (Orthanc answers 400 with the stored instances listed when one part is not
DICOM). Credentials are never logged.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from pydicom import dcmread

from dicomnode.config import PeerSettings
from dicomnode.errors import ConfigError, DeliveryError, DeliveryRefused
from dicomnode.scu import SendResult

logger = logging.getLogger(__name__)

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
TRANSIENT_HTTP = frozenset({408, 429})
_NATIVE_DICOM = "{http://dicom.nema.org/PS3.19/models/NativeDICOM}"
# Failure Reasons of PS3.18 Table 10.5.3-2 / PS3.4 Table B.2-1 worth naming in an error message.
FAILURE_REASONS = {
    0x0110: "Processing failure",
    0x0122: "Referenced SOP Class not supported",
    0x0124: "Not authorized",
    0xA700: "Out of resources",
    0xA900: "Data set does not match SOP Class",
    0xC000: "Cannot understand",
    0xC122: "Referenced Transfer Syntax not supported",
}


@dataclass(frozen=True)
class _Part:
    """One instance to send: its bytes and the UIDs the response will name it by."""

    path: Path
    data: bytes
    SOPInstanceUID: str
    StudyInstanceUID: str


@dataclass(frozen=True)
class StowResponse:
    """The per-instance content of a STOW-RS response: stored UIDs (with any Warning Reason) and
    failed UIDs with their Failure Reason (None when the server gave none)."""

    referenced: Mapping[str, int | None]
    failed: Mapping[str, int | None]


def _read(path: Path) -> _Part | SendResult:
    try:
        data = path.read_bytes()
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "StudyInstanceUID"])
        return _Part(path, data, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID))
    except Exception as e:  # an unreadable file is that instance's failure only
        return SendResult("", None, f"cannot read {path}: {type(e).__name__}: {e}")


def multipart_body(parts: Sequence[bytes], boundary: str) -> bytes:
    """A ``multipart/related`` body (RFC 2387), each part ``Content-Type: application/dicom``."""
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return b"".join(head + part + b"\r\n" for part in parts) + f"--{boundary}--\r\n".encode()


def _json_value(item: Mapping[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def _from_json(body: Any) -> StowResponse | None:
    if isinstance(body, list) and len(body) == 1:  # some servers wrap the data set in an array
        body = body[0]
    if not isinstance(body, dict) or not ({REFERENCED_SOP_SEQUENCE, FAILED_SOP_SEQUENCE} & set(body)):
        return None
    found: list[dict[str, int | None]] = []
    for tag, reason in ((REFERENCED_SOP_SEQUENCE, WARNING_REASON), (FAILED_SOP_SEQUENCE, FAILURE_REASON)):
        items = body.get(tag, {}).get("Value") or []
        found.append({str(_json_value(i, REFERENCED_SOP_INSTANCE_UID)): _json_value(i, reason) for i in items})
    return StowResponse(*found)


def _xml_value(item: ET.Element, tag: str) -> str | None:
    for attribute in item.iter(f"{_NATIVE_DICOM}DicomAttribute"):
        if attribute.get("tag") == tag:
            value = attribute.find(f"{_NATIVE_DICOM}Value")
            return value.text if value is not None else None
    return None


def _from_xml(text: str) -> StowResponse | None:
    root = ET.fromstring(text)
    found: list[dict[str, int | None]] = [{}, {}]
    seen = False
    for attribute in root.findall(f"{_NATIVE_DICOM}DicomAttribute"):
        for n, (tag, reason) in enumerate(
            ((REFERENCED_SOP_SEQUENCE, WARNING_REASON), (FAILED_SOP_SEQUENCE, FAILURE_REASON))
        ):
            if attribute.get("tag") != tag:
                continue
            seen = True
            for item in attribute.findall(f"{_NATIVE_DICOM}Item"):
                code = _xml_value(item, reason)
                found[n][str(_xml_value(item, REFERENCED_SOP_INSTANCE_UID))] = int(code) if code else None
    return StowResponse(*found) if seen else None


def parse_response(content_type: str, body: bytes) -> StowResponse | None:
    """The STOW-RS response data set in ``body`` (DICOM JSON or Native DICOM XML, PS3.18 F and
    PS3.19 A), or None when the body is not one (an HTML error page, nothing)."""
    try:
        if "json" in content_type:
            return _from_json(json.loads(body))
        if "xml" in content_type:
            return _from_xml(body.decode("utf-8"))
    except (ValueError, ET.ParseError, AttributeError):
        return None
    return None


def _result(uid: str, response: StowResponse, http_status: int) -> SendResult:
    if uid in response.failed:
        code = response.failed[uid]
        if code is None:
            return SendResult(uid, None, f"in the Failed SOP Sequence without a Failure Reason (HTTP {http_status})")
        name = FAILURE_REASONS.get(code, "failure")
        return SendResult(uid, code, f"STOW-RS Failure Reason 0x{code:04X} ({name}), HTTP {http_status}")
    if uid in response.referenced:
        warning = response.referenced[uid]
        return SendResult(uid, warning if warning is not None else 0x0000)
    return SendResult(uid, None, f"not in the STOW-RS response (HTTP {http_status}): the server did not store it")


def _auth(peer: PeerSettings, env: Mapping[str, str]) -> tuple[Any, dict[str, str]]:
    try:
        credentials = peer.credentials(env)
    except ConfigError as e:
        raise DeliveryRefused(str(e)) from e
    if isinstance(credentials, tuple):
        return credentials, {}
    if credentials:
        return None, {"Authorization": f"Bearer {credentials}"}
    return None, {}


def store(
    peer: PeerSettings,
    paths: Sequence[Path],
    timeout_s: float = 60,
    *,
    env: Mapping[str, str] = os.environ,
) -> list[SendResult]:
    """POST every file to the DICOMweb ``peer`` in one STOW-RS request; one result per file, in order."""
    read = [_read(Path(p)) for p in paths]
    parts = [r for r in read if isinstance(r, _Part)]
    if not parts:
        return [r for r in read if isinstance(r, SendResult)]
    studies = {p.StudyInstanceUID for p in parts}
    base = peer.url.rstrip("/")
    url = f"{base}/studies/{studies.pop()}" if len(studies) == 1 else f"{base}/studies"
    auth, headers = _auth(peer, env)
    boundary = uuid.uuid4().hex
    headers.update(
        {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json, application/dicom+xml;q=0.9",
        }
    )
    verify: bool | str = str(peer.tls_ca_file) if peer.tls_verify and peer.tls_ca_file else peer.tls_verify
    try:
        response = requests.post(
            url,
            data=multipart_body([p.data for p in parts], boundary),
            headers=headers,
            auth=auth,
            verify=verify,
            timeout=timeout_s,
            allow_redirects=False,  # a redirected POST would be re-sent as a GET, or land on a login page
        )
    except requests.RequestException as e:
        raise DeliveryError(f"peer {peer.name} ({url}) unreachable: {type(e).__name__}: {e}") from e
    code = response.status_code
    parsed = parse_response(response.headers.get("Content-Type", ""), response.content)
    if parsed is None:
        summary = f"peer {peer.name}: HTTP {code} {response.reason} from {url}"
        if code in TRANSIENT_HTTP or code >= 500:
            raise DeliveryError(summary)
        if code >= 400:
            raise DeliveryRefused(summary)
        if code >= 300:
            raise DeliveryRefused(f"{summary}: redirects are not followed for STOW-RS")
        # PS3.18 10.5.3 requires the response data set; a 2xx page without one (a proxy, a portal)
        # proves nothing was stored, so it is no success. Retried: it may be a passing glitch.
        raise DeliveryError(f"{summary}: no STOW-RS response data set ({response.headers.get('Content-Type')})")
    by_uid = {p.SOPInstanceUID: _result(p.SOPInstanceUID, parsed, code) for p in parts}
    results = [r if isinstance(r, SendResult) else by_uid[r.SOPInstanceUID] for r in read]
    failed = sum(not r.succeeded for r in results)
    logger.info("peer %s: STOW-RS HTTP %d, %d instances, %d failed", peer.name, code, len(results), failed)
    return results
