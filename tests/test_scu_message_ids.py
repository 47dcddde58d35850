"""Each C-STORE the node sends carries its own Message ID (PS3.7 9.3.1.1), seen by a real SCP."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE

from dicomnode.config import PeerSettings
from dicomnode.scu import MAX_MESSAGE_ID, message_ids, send
from tests.conftest import free_port
from tests.dicom_nodes import CALLING, pydicom_file

RECORDER_AE = "RECORDER"


@pytest.fixture
def recorder() -> Iterator[tuple[PeerSettings, list[tuple[int, str]]]]:
    """A pynetdicom Storage SCP on loopback that records (Message ID, SOP Instance UID) per request."""
    seen: list[tuple[int, str]] = []
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        request = event.request
        assert isinstance(request, C_STORE)
        with lock:
            seen.append((int(request.MessageID), str(request.AffectedSOPInstanceUID)))
        return 0x0000

    ae = AE(ae_title=RECORDER_AE)
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield PeerSettings(name="recorder", ae_title=RECORDER_AE, host="127.0.0.1", port=port), seen
    finally:
        server.shutdown()


def copies(n: int) -> list[Dataset]:
    """``n`` instances of pydicom-data's real chest CR, each with its own SOP Instance UID."""
    source = pydicom.dcmread(pydicom_file("RG1_UNCR.dcm"))
    datasets = []
    for _ in range(n):
        ds = source.copy()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        datasets.append(ds)
    return datasets


def test_each_c_store_of_an_association_has_its_own_message_id(recorder: tuple) -> None:
    peer, seen = recorder
    datasets = copies(4)
    results = send(peer, CALLING, datasets)
    assert [r.status for r in results] == [0x0000] * 4
    assert seen == [(i, ds.SOPInstanceUID) for i, ds in enumerate(datasets, 1)]
    # A new association starts again at 1 (Message IDs are unique within an association).
    send(peer, CALLING, copies(2))
    assert [msg_id for msg_id, _ in seen[4:]] == [1, 2]


def test_message_ids_wrap_from_65535_to_1_and_never_use_0() -> None:
    assert list(itertools.islice(message_ids(MAX_MESSAGE_ID - 1), 4)) == [MAX_MESSAGE_ID - 1, MAX_MESSAGE_ID, 1, 2]
    assert list(itertools.islice(message_ids(), 3)) == [1, 2, 3]
    with pytest.raises(ValueError, match="within 1..65535"):
        next(message_ids(0))
