"""The SCP's own reading of a received data set's head against pydicom's, value for value.

``read_head`` serves Explicit VR Little Endian from the walked element headers and converts only what
the node needs and what could fail; ``read_head_exact`` parses the head with pydicom and converts every
element, as the node did before. They must agree: on every real file pydicom-data ships, on data sets
with sequences, character sets and odd values, and on thousands of corrupted heads (the same values,
or a refusal with the same status).
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.pixels.utils import get_expected_length
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from dicomnode.dataset_checks import check_c_store, expected_length
from dicomnode.dataset_head import Walked, fast_path, read_head, read_head_exact, walk
from dicomnode.rules import facts_from_dataset
from dicomnode.store_status import ELEMENT_INVALID, INVALID_UID, PIXEL_DESCRIPTION_INVALID, Refusal
from tests.dicom_nodes import body_of
from tests.test_scp_intake import DX, body, small_dx


def _outcome(read: object, walked: Walked) -> tuple[str, object]:
    try:
        return "values", read(walked)  # type: ignore[operator]
    except Refusal as e:
        return "refused", e.status


def _explicit_little_endian_files() -> list[tuple[str, bytes, UID]]:
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(get_testdata_files("*.dcm")):
            path = Path(name)
            try:
                ts = UID(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
                data = body_of(path)
            except Exception:  # pydicom-data also ships files that are broken on purpose
                continue
            if fast_path(ts):
                found.append((path.name, data, ts))
    return found


FILES = _explicit_little_endian_files()


def test_the_fast_path_reads_every_explicit_little_endian_file_pydicom_ships_as_pydicom_does() -> None:
    assert len(FILES) > 80  # native, JPEG, JPEG 2000, RLE, deflated...
    compared = 0
    for name, data, ts in FILES:
        try:
            walked = walk(data, ts)
        except Refusal:
            continue
        assert _outcome(read_head, walked) == _outcome(read_head_exact, walked), name
        compared += 1
    assert compared > 80


def test_corrupted_heads_get_the_same_values_or_the_same_refusal_both_ways() -> None:
    """Bytes overwritten at random before the pixel element (VR codes and digits among them)."""
    rng = random.Random(20261130)
    bases = [(d, ts) for _, d, ts in FILES if not ts.is_deflated][:40]
    kinds: dict[str, int] = {}
    for _ in range(3000):
        data, ts = rng.choice(bases)
        end = walk(data, ts).pixels_at or len(data)
        corrupt = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(end)
            roll = rng.random()
            if roll < 0.6:
                corrupt[pos] = rng.randrange(256)
            elif roll < 0.8:
                corrupt[pos : pos + 2] = rng.choice([b"IS", b"DS", b"US", b"SQ", b"UN", b"FL", b"UL", b"SS", b"FD"])
            else:
                corrupt[pos] = ord(rng.choice("0123456789.e+-\\ "))
        try:
            walked = walk(bytes(corrupt), ts)
        except Refusal:
            continue
        fast, exact = _outcome(read_head, walked), _outcome(read_head_exact, walked)
        assert fast == exact
        kinds[fast[0]] = kinds.get(fast[0], 0) + 1
    assert kinds.get("values", 0) > 500 and kinds.get("refused", 0) > 20, kinds


def _with(**attributes: object) -> Dataset:
    ds = small_dx()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _synthesizing_equipment(manufacturer: str) -> Sequence:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "109100", "DCM", "Synthesizing Equipment"
    item = Dataset()
    item.Manufacturer = manufacturer
    item.DeviceUID = "1.2.826.0.1.3680043.8.498.77"
    item.PurposeOfReferenceCodeSequence = Sequence([code])
    return Sequence([item])


@pytest.mark.parametrize(
    "ds",
    [
        _with(NumberOfFrames="1", ImageType=["DERIVED", "SECONDARY"], SyntheticData="YES"),
        _with(SpecificCharacterSet="ISO_IR 100", ContributingEquipmentSequence=_synthesizing_equipment("Ärzte AG")),
        _with(SpecificCharacterSet="ISO_IR 192", ContributingEquipmentSequence=_synthesizing_equipment("医院")),
        _with(PhotometricInterpretation="YBR_FULL_422", SamplesPerPixel=3),
        _with(BodyPartExamined="", ViewPosition=""),
    ],
    ids=["multi-valued and synthetic", "Latin-1 in a sequence", "UTF-8 in a sequence", "YBR_FULL_422", "empty"],
)
def test_values_and_facts_agree_on_sequences_character_sets_and_empty_values(ds: Dataset) -> None:
    walked = walk(body(ds), UID(ExplicitVRLittleEndian))
    fast, exact = read_head(walked), read_head_exact(walked)
    assert fast == exact
    assert facts_from_dataset(fast) == facts_from_dataset(exact)
    if "ContributingEquipmentSequence" in ds:
        manufacturer = ds.ContributingEquipmentSequence[0].Manufacturer
        assert facts_from_dataset(fast).contributing_manufacturers == (manufacturer,)


def _raw_element(tag: int, vr: bytes, value: bytes) -> bytes:
    return tag.to_bytes(4, "big")[1::-1] + tag.to_bytes(4, "big")[:1:-1] + vr + len(value).to_bytes(2, "little") + value


def _insert(data: bytes, element: bytes, before: bytes) -> bytes:
    at = data.index(before)
    return data[:at] + element + data[at:]


def test_values_pydicom_cannot_convert_are_refused_naming_the_element() -> None:
    ds = small_dx()
    data = body(ds)
    ts = UID(ExplicitVRLittleEndian)
    rows = b"\x28\x00\x10\x00US"
    at = data.index(rows)
    cases = {
        # (0028,0010) Rows with three bytes: not a whole number of US values
        "wrong-length US": (
            data[:at] + _raw_element(0x00280010, b"US", data[at + 8 : at + 10] + b"\x00") + data[at + 10 :],
            "(0028,0010) cannot be parsed: BytesLengthException",
        ),
        # (0028,0008) Number of Frames "1e400": an Integer String that overflows
        "overflowing IS": (
            _insert(data, _raw_element(0x00280008, b"IS", b"1e400 "), rows),
            "(0028,0008) cannot be parsed: OverflowError",
        ),
    }
    for name, (corrupt, comment) in cases.items():
        walked = walk(corrupt, ts)
        for read in (read_head, read_head_exact):
            with pytest.raises(Refusal) as refused:
                read(walked)
            assert (refused.value.status, refused.value.reason) == (ELEMENT_INVALID, comment), (name, read)
        with pytest.raises(Refusal, match="cannot be parsed"):
            check_c_store(corrupt, ts, DX, DX, ds.SOPInstanceUID)


def test_a_multi_valued_uid_or_an_unusable_image_description_is_refused() -> None:
    ts = UID(ExplicitVRLittleEndian)
    two = _with()
    two.StudyInstanceUID = [generate_uid(), generate_uid()]
    with pytest.raises(Refusal) as refused:
        check_c_store(body(two), ts, DX, DX, two.SOPInstanceUID)
    assert refused.value.status == INVALID_UID and "StudyInstanceUID invalid" in refused.value.reason
    no_frames = _with(NumberOfFrames="0")
    with pytest.raises(Refusal) as refused:
        check_c_store(body(no_frames), ts, DX, DX, no_frames.SOPInstanceUID)
    assert refused.value.status == PIXEL_DESCRIPTION_INVALID


@pytest.mark.parametrize("bits", [1, 8, 16, 32])
@pytest.mark.parametrize("photometric,samples", [("MONOCHROME2", 1), ("RGB", 3), ("YBR_FULL_422", 3)])
@pytest.mark.parametrize("frames", [1, 3])
def test_expected_length_is_pydicoms(bits: int, photometric: str, samples: int, frames: int) -> None:
    ds = Dataset()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = 5, 7, bits, samples
    ds.PhotometricInterpretation, ds.NumberOfFrames = photometric, frames
    values = {keyword: ds[keyword].value for keyword in ds.dir()}
    assert expected_length(values, frames) == get_expected_length(ds, unit="bytes")


def test_a_deflated_data_set_is_read_inflated(tmp_path: Path) -> None:
    ds = small_dx()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    path = tmp_path / "deflated.dcm"
    dcmwrite(path, ds, enforce_file_format=True)
    walked = walk(body_of(path), UID("1.2.840.10008.1.2.1.99"))
    assert read_head(walked) == read_head_exact(walked)
    assert read_head(walked)["SOPInstanceUID"] == ds.SOPInstanceUID
