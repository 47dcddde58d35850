"""The SCU and the ``echo``/``send`` commands against real peers: dcmtk storescp and the node's own SCP."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from dicomnode.cli import echo as echo_command
from dicomnode.cli import send as send_command
from dicomnode.cli.exitcodes import ExitCode
from dicomnode.config import PeerSettings, SecuritySettings
from dicomnode.errors import DeliveryError
from dicomnode.scu import SendResult, echo, send
from tests.conftest import dcmtk, free_port
from tests.dicom_nodes import AE_TITLE, CALLING, Node, dcmtk_run, pydicom_file, wait_until

STORESCP_AE = "STORESCP"


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., tuple[PeerSettings, Path]]]:
    """Start dcmtk storescp (one process per association) writing into a fresh folder."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*options: str) -> tuple[PeerSettings, Path]:
        port, out = free_port(), tmp_path / f"storescp-{len(procs)}"
        out.mkdir()
        proc = subprocess.Popen(
            [dcmtk("storescp"), "--fork", *options, "-aet", STORESCP_AE, "-od", str(out), str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its forked children share the group, stopped with it
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        procs.append(proc)
        wait_until(
            lambda: dcmtk_run("echoscu", "-aec", STORESCP_AE, "127.0.0.1", str(port)).returncode == 0, 10
        )
        return PeerSettings(name="storescp", ae_title=STORESCP_AE, host="127.0.0.1", port=port), out

    yield start
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def received(folder: Path) -> dict[str, pydicom.Dataset]:
    return {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, sorted(folder.iterdir()))}


def test_send_to_storescp_delivers_each_file_in_its_own_transfer_syntax(storescp: Callable) -> None:
    peer, out = storescp("+xa")  # accepts every transfer syntax it knows
    paths = [pydicom_file(n) for n in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "CT_small.dcm")]
    results = send(peer, CALLING, paths)
    originals = [pydicom.dcmread(p) for p in paths]
    assert results == [SendResult(ds.SOPInstanceUID, 0x0000) for ds in originals]
    got = received(out)
    assert set(got) == {ds.SOPInstanceUID for ds in originals}
    for ds in originals:
        assert got[ds.SOPInstanceUID].file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert got[ds.SOPInstanceUID].PixelData == ds.PixelData


def test_a_peer_accepting_only_uncompressed_gets_the_decoded_pixels(storescp: Callable) -> None:
    peer, out = storescp()  # storescp's default: uncompressed transfer syntaxes only
    path = pydicom_file("JPEG-LL.dcm")
    (result,) = send(peer, CALLING, [path])
    assert result.succeeded and result.status == 0x0000
    original = pydicom.dcmread(path)
    (got,) = received(out).values()
    assert got.SOPInstanceUID == original.SOPInstanceUID
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(got.pixel_array, original.pixel_array)  # lossless: same pixels


def test_one_unreadable_item_does_not_stop_the_others(node: Node, tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not DICOM at all")
    ct, cr = pydicom_file("CT_small.dcm"), pydicom_file("RG1_J2KR.dcm")
    results = send(node.peer(), CALLING, [ct, junk, pydicom.dcmread(cr)])
    assert [r.status for r in results] == [0x0000, None, 0x0000]
    assert results[1].error is not None and "junk.dcm" in results[1].error and not results[1].succeeded
    (assoc,) = node.associations()  # one association for all items
    rows = node.instances()
    assert {r.transfer_syntax_uid for r in rows} == {ExplicitVRLittleEndian, JPEG2000Lossless}
    assert all(r.association_id == assoc.id for r in rows)


def test_echo_our_scp_and_refusals(node: Node) -> None:
    assert echo(node.peer(), CALLING, timeout_s=5) == 0x0000
    with pytest.raises(DeliveryError, match="rejected the association"):
        echo(node.peer(ae_title="NOTUS"), CALLING, timeout_s=5)
    with pytest.raises(DeliveryError, match="rejected the association"):
        send(node.peer(), "INTRUDER", [pydicom_file("CT_small.dcm")], timeout_s=5)
    assert node.instances() == []


def test_echo_to_a_closed_port_raises_delivery_error() -> None:
    peer = PeerSettings(name="nobody", ae_title="NOBODY", host="127.0.0.1", port=free_port())
    with pytest.raises(DeliveryError, match="unreachable"):
        echo(peer, CALLING, timeout_s=2)
    with pytest.raises(DeliveryError, match="unreachable"):
        send(peer, CALLING, [pydicom_file("CT_small.dcm")], timeout_s=2)


def test_send_result_is_valid_once_built() -> None:
    with pytest.raises(ValueError, match="needs an error"):
        SendResult("1.2.3", None)
    with pytest.raises(ValueError, match="16-bit"):
        SendResult("1.2.3", 0x10000)
    assert SendResult("1.2.3", 0xB000).succeeded and not SendResult("1.2.3", 0xA700, "full").succeeded


# ---- TLS ----------------------------------------------------------------------------------------------


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all made with openssl."""
    f = {k: folder / f"{k}.pem" for k in ("ca", "ca_key", "server", "server_key", "client", "client_key")}

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        "req",
        "-x509",
        *key,
        "-keyout",
        str(f["ca_key"]),
        "-out",
        str(f["ca"]),
        "-subj",
        "/CN=test CA",
        "-days",
        "2",
    )
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        csr = folder / f"{name}.csr"
        openssl(
            "req", "-new", *key, "-keyout", str(f[f"{name}_key"]), "-out", str(csr), "-subj", f"/CN={name}"
        )
        extfile = folder / f"{name}.ext"
        extfile.write_text(ext + "\n")
        sign = ("-CA", str(f["ca"]), "-CAkey", str(f["ca_key"]), "-CAcreateserial", "-days", "2")
        openssl("x509", "-req", "-in", str(csr), *sign, "-out", str(f[name]), "-extfile", str(extfile))
    return f


def test_tls_with_client_certificates(start_node: Callable[..., Node], tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    node = start_node(
        security=f'tls_certificate = "{pki["server"]}"\ntls_private_key = "{pki["server_key"]}"\n'
        f'tls_ca_certificates = "{pki["ca"]}"\n'
    )
    peer = PeerSettings(name="node", ae_title=AE_TITLE, host="127.0.0.1", port=node.port, tls=True)
    ours = SecuritySettings(
        tls_certificate=pki["client"], tls_private_key=pki["client_key"], tls_ca_certificates=pki["ca"]
    )
    assert echo(peer, CALLING, timeout_s=5, security=ours) == 0x0000
    (result,) = send(peer, CALLING, [pydicom_file("CT_small.dcm")], security=ours)
    assert result.status == 0x0000 and len(node.instances()) == 1
    with socket.create_connection(("127.0.0.1", node.port)):  # a peer that connects and stays silent
        started = time.monotonic()
        assert echo(peer, CALLING, timeout_s=5, security=ours) == 0x0000  # others are still served
        assert time.monotonic() - started < 2
    anonymous = SecuritySettings(tls_ca_certificates=pki["ca"])
    with pytest.raises(DeliveryError):
        echo(peer, CALLING, timeout_s=5, security=anonymous)
    with pytest.raises(DeliveryError):  # plain TCP to a TLS port
        echo(
            PeerSettings(name="plain", ae_title=AE_TITLE, host="127.0.0.1", port=node.port),
            CALLING,
            timeout_s=5,
        )


# ---- The commands ---------------------------------------------------------------------------------------


def run_command(module: object, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dicomnode")
    module.register(parser.add_subparsers())  # type: ignore[attr-defined]
    args = parser.parse_args(argv)
    return int(args.func(args))


def client_config(folder: Path, node_port: int) -> Path:
    """A site file for the commands' side: our AE title is one the node allows, the node a peer."""
    path = folder / "client.toml"
    path.write_text(
        f'[node]\nae_title = "{CALLING}"\nstorage_dir = "{folder / "client-var"}"\n\n'
        f'[[peers]]\nname = "node"\nae_title = "{AE_TITLE}"\nhost = "127.0.0.1"\nport = {node_port}\n'
    )
    return path


def test_echo_command(node: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(client_config(tmp_path, node.port))
    assert run_command(echo_command, ["echo", "node", "-c", config]) == ExitCode.OK
    out = capsys.readouterr().out
    assert f"node (SVDRR@127.0.0.1:{node.port}): C-ECHO status 0x0000" in out
    adhoc = ["echo", "-c", config, "--host", "127.0.0.1", "--port", str(node.port), "--called-ae", AE_TITLE]
    assert run_command(echo_command, adhoc) == ExitCode.OK
    assert "adhoc (SVDRR@127.0.0.1" in capsys.readouterr().out
    closed = ["echo", "-c", config, "--host", "127.0.0.1", "--port", str(free_port()), "--called-ae", "X"]
    assert run_command(echo_command, [*closed, "--timeout", "2"]) == ExitCode.PEER_UNREACHABLE
    assert "no answer" in capsys.readouterr().err
    assert run_command(echo_command, ["echo", "nosuchpeer", "-c", config]) == ExitCode.NOT_FOUND
    assert run_command(echo_command, ["echo", "-c", config]) == ExitCode.USAGE


def test_send_command(node: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(client_config(tmp_path, node.port))
    folder = tmp_path / "study" / "series"
    folder.mkdir(parents=True)
    for name in ("CT_small.dcm", "JPEG-LL.dcm"):
        (folder / name).write_bytes(pydicom_file(name).read_bytes())
    assert (
        run_command(send_command, ["send", str(tmp_path / "study"), "--to", "node", "-c", config])
        == ExitCode.OK
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.endswith(" 0x0000") for line in lines)
    assert len(node.instances()) == 2
    (folder / "notes.txt").write_text("not DICOM")
    assert run_command(send_command, ["send", str(folder), "--to", "node", "-c", config]) == ExitCode.FAILURE
    out = capsys.readouterr().out
    assert "notes.txt: - not sent cannot read" in out and out.count(" 0x0000") == 2
    missing = ["send", str(tmp_path / "nothing-here"), "--to", "node", "-c", config]
    assert run_command(send_command, missing) == ExitCode.NOT_FOUND
    unreachable = ["send", str(folder / "CT_small.dcm"), "-c", config, "--host", "127.0.0.1"]
    unreachable += ["--port", str(free_port()), "--called-ae", "X", "--timeout", "2"]
    assert run_command(send_command, unreachable) == ExitCode.PEER_UNREACHABLE
