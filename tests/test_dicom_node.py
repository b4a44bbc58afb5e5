"""``cxr-edge dicom-node`` against a real PACS: Debian's Orthanc, started here with a generated configuration on
free loopback ports and a temporary storage folder (``benchmarks/orthanc.py``), and the node as a subprocess
(``python -m cxr_edge dicom-node``), so that it can be killed. Orthanc sends scans to the node with C-STORE
(``/modalities/<name>/store``), the node sends its SR and Secondary Capture back to Orthanc, and the tests read
them from Orthanc. Result objects are checked with ``dciodvfy`` (dicom3tools) when it is installed, and read
back with pydicom in any case."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from benchmarks.orthanc import Orthanc, free_port, is_up, orthanc_exe, wrap_scan

if orthanc_exe() is None:
    pytest.skip("Orthanc is not installed (apt-get install orthanc); the DICOM node tests skip",
                allow_module_level=True)
pynetdicom = pytest.importorskip("pynetdicom", reason='the DICOM node needs pip install "cxr-edge[pacs]"')
pytest.importorskip("highdicom", reason='the DICOM node needs pip install "cxr-edge[pacs]"')
import pydicom  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from cxr_edge.cli import cli  # noqa: E402
from cxr_edge.dicom import gray_to_dicom  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCANS = sorted((REPO / "tests" / "data" / "chest_xray" / "test").rglob("*.jpeg"))  # 3 full-size scans
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY = "1.2.826.0.1.3680043.10.1137.1"
FAULT_STUDY = "1.2.826.0.1.3680043.10.1137.2"


class Node:
    """``cxr-edge dicom-node`` in a subprocess, its log in a file."""

    def __init__(self, spool: Path, send_to: str, *args: str):
        self.port, self.log = free_port(), spool.with_suffix(".log")
        cmd = [sys.executable, "-m", "cxr_edge", "dicom-node", "--port", str(self.port), "--spool", str(spool),
               "--send-to", send_to, "--retry-max", "0.5", *args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while not is_up(self.port):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text()
            time.sleep(0.05)

    def text(self) -> str:
        return self.log.read_text()

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        self.proc.wait(30)


def journal(spool: Path) -> dict:
    """SOP Instance UID (or "refused-<id>") -> journal row, through ``cxr-edge journal --json``."""
    res = CliRunner().invoke(cli, ["journal", "--spool", str(spool), "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    return {r["sop_instance_uid"] or f"refused-{r['id']}": r for r in rows}


def wait_for(predicate, timeout: float = 60, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def results(pacs: Orthanc, study_uid: str) -> dict:
    """Source SOP Instance UID -> {"SR": [datasets], "OT": [datasets]} of the node's results in the study."""
    out: dict = {}
    for inst in pacs.instances(study_uid):
        ds = pydicom.dcmread(io.BytesIO(pacs.file(inst["ID"])))
        if ds.Modality == "SR":
            source = [i for i in ds.ContentSequence if i.ValueType == "IMAGE"][0].ReferencedSOPSequence[0]
            out.setdefault(source.ReferencedSOPInstanceUID, {"SR": [], "OT": []})["SR"].append(ds)
        elif ds.get("Manufacturer") == "cxr-edge":
            out.setdefault(ds.SourceImageSequence[0].ReferencedSOPInstanceUID if "SourceImageSequence" in ds
                           else ds.SOPInstanceUID, {"SR": [], "OT": []})["OT"].append(ds)
    return out


def sr_content(sr) -> dict:
    """{concept meaning: value} of the SR's top-level items (values: text, code meaning, number, UID)."""
    out = {}
    for item in sr.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        out[name] = (item.get("TextValue") or
                     (item.ConceptCodeSequence[0].CodeMeaning if "ConceptCodeSequence" in item else None) or
                     (float(item.MeasuredValueSequence[0].NumericValue) if "MeasuredValueSequence" in item else None))
    return out


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The test study as files: the 3 scans (CR, PA), one of them again as a lateral view, a CT slice."""
    folder = tmp_path_factory.mktemp("study")
    series = STUDY + ".1"
    files = {}
    for i, scan in enumerate(SCANS):
        files[scan.stem] = wrap_scan(scan, STUDY, series, SOPInstanceUID=f"{series}.{i + 1}", InstanceNumber=i + 1)
    files["lateral"] = wrap_scan(SCANS[0], STUDY, series, SOPInstanceUID=f"{series}.9", ViewPosition="LL")
    import numpy as np
    ct = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    files["ct"] = gray_to_dicom(ct, bits_stored=12, sop_class=CT_IMAGE_STORAGE, Modality="CT", StudyInstanceUID=STUDY,
                                SeriesInstanceUID=STUDY + ".2", SOPInstanceUID=STUDY + ".2.1", PatientID="CXR-TEST-1",
                                PatientName="Test^Chest", RescaleSlope=1, RescaleIntercept=-1024)
    paths = {}
    for name, data in files.items():
        paths[name] = folder / f"{name}.dcm"
        paths[name].write_bytes(data)
    return paths


@pytest.fixture(scope="module")
def node(pacs, tmp_path_factory):
    spool = tmp_path_factory.mktemp("node") / "spool"
    n = Node(spool, f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}", "--allow", pacs.aet, "--allow", "TESTSCU",
             "--workers", "2")
    pacs.add_modality("cxredge", "CXREDGE", "127.0.0.1", n.port)
    n.spool = spool
    yield n
    n.stop()


def test_end_to_end_results_in_the_study(pacs, node, study, tmp_path):
    ids = [pacs.upload(p.read_bytes()) for p in study.values()]
    pacs.send("cxredge", ids)
    counts = wait_for(lambda: (c := pacs.modality_counts(STUDY)).get("SR") == 5 and c.get("OT") == 3 and c,
                      what="5 SRs and 3 SCs in Orthanc")
    assert counts == {"CR": 4, "CT": 1, "SR": 5, "OT": 3}

    cli_out = CliRunner().invoke(cli, ["classify", "--json", *map(str, study.values())]).stdout
    expected = {pydicom.dcmread(r["path"], stop_before_pixels=True).SOPInstanceUID: r
                for r in map(json.loads, cli_out.splitlines())}
    found = results(pacs, STUDY)
    assert set(found) == set(expected)
    for uid, record in expected.items():
        (sr,), scs = found[uid]["SR"], found[uid]["OT"]
        content = sr_content(sr)
        assert sr.StudyInstanceUID == STUDY and sr.PatientID == "CXR-TEST-1" and sr.PatientName == "Test^Chest"
        assert "Not for diagnostic use" in content["Comment"]
        assert content["Algorithm Name"] == record["model"]["name"]
        assert content["Algorithm Version"] == record["model"]["version"]
        assert content["Algorithm Parameters"] == f"sha256={record['model']['sha256']}"
        if record.get("label") is not None:
            assert content["Finding"].lower().startswith(record["label"])
            for name, p in record["probabilities"].items():
                assert content[f"Probability of {name}"] == pytest.approx(p, abs=1e-6)
            (sc,) = scs
            assert sc.StudyInstanceUID == STUDY and sc.BurnedInAnnotation == "YES" and sc.PatientID == "CXR-TEST-1"
            assert sc.SamplesPerPixel == 3 and sc.pixel_array.shape[-1] == 3
        else:
            assert record["status"] == "rejected"
            assert content["Input refused"] == record["reason"] and "Finding" not in content and not scs
    labelled = [r for r in expected.values() if r.get("label")]
    refused = {r["reason"].split(" (")[0] for r in expected.values() if not r.get("label")}
    assert len(labelled) == 3 and refused == {"lateral view", "not a radiograph"}

    rows = journal(node.spool)
    for uid, record in expected.items():
        row = rows[uid]
        assert row["status"] == "sent" and row["calling_ae"] == pacs.aet and row["study_uid"] == STUDY
        assert row["label"] == record.get("label") and row["sent"] >= row["received"]
        assert len(row["result_uids"]) == (2 if record.get("label") else 1)
    assert not list((node.spool / "in").glob("*")) and not list((node.spool / "out").glob("*"))

    # A resend of a source instance replaces its results (same UIDs) instead of adding a second set.
    first = next(uid for uid, r in expected.items() if r.get("label"))
    before = rows[first]["sent"]
    pacs.send("cxredge", [next(i["ID"] for i in pacs.instances(STUDY)
                               if i["MainDicomTags"]["SOPInstanceUID"] == first)])
    wait_for(lambda: (r := journal(node.spool)[first])["status"] == "sent" and r["sent"] != before,
             what="the resent instance's results")
    assert pacs.modality_counts(STUDY) == counts

    # Every result object passes dciodvfy (dicom3tools) when it is installed.
    validator = shutil.which("dciodvfy")
    for uid in expected:
        for ds in found[uid]["SR"] + found[uid]["OT"]:
            for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                            "Manufacturer", "ContentDate", "ContentTime", "InstanceNumber", "SeriesNumber"):
                assert ds.get(keyword) not in (None, ""), keyword
            if validator:
                path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
                ds.save_as(path, enforce_file_format=True)
                out = subprocess.run([validator, str(path)], capture_output=True, text=True)
                errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
                assert not errors, errors


def _scu(node_port: int, aet: str = "TESTSCU"):
    from pynetdicom import AE
    from pynetdicom.sop_class import (BasicTextSRStorage, ComputedRadiographyImageStorage,
                                      DigitalXRayImageStorageForPresentation, Verification)

    ae = AE(ae_title=aet)
    for sop_class in (BasicTextSRStorage, ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                      Verification):
        ae.add_requested_context(sop_class)
    return ae.associate("127.0.0.1", node_port)


def test_bad_input_is_acknowledged_journaled_and_the_node_keeps_serving(pacs, node):
    import numpy as np

    series = "1.2.826.0.1.3680043.10.1137.3"
    good = np.full((64, 64), 100, np.uint8)
    truncated = pydicom.dcmread(io.BytesIO(gray_to_dicom(good, StudyInstanceUID=series, SeriesInstanceUID=series + ".1",
                                                         SOPInstanceUID=series + ".1.1", Modality="CR")))
    truncated.PixelData = truncated.PixelData[:1000]  # 4096 bytes expected
    no_pixels = pydicom.dcmread(io.BytesIO(gray_to_dicom(None, StudyInstanceUID=series, SeriesInstanceUID=series + ".1",
                                                         SOPInstanceUID=series + ".1.2", Modality="CR")))
    sr = pydicom.dcmread(io.BytesIO(gray_to_dicom(None, sop_class="1.2.840.10008.5.1.4.1.1.88.11", Modality="SR",
                                                  StudyInstanceUID=series, SeriesInstanceUID=series + ".2",
                                                  SOPInstanceUID=series + ".2.1", ValueType="CONTAINER")))
    assoc = _scu(node.port)
    assert assoc.is_established
    statuses = [assoc.send_c_store(ds).Status for ds in (truncated, no_pixels, sr)]
    assoc.release()
    assert statuses == [0x0000, 0x0000, 0x0000]  # acknowledged: the node has them

    refused = _scu(node.port, aet="STRANGER")
    assert refused.is_rejected  # calling AE title not in --allow
    assert refused.acceptor.primitive.result_source == 1 and refused.acceptor.primitive.diagnostic == 3

    def unreadable():
        rows = journal(node.spool)
        done = [rows.get(f"{series}.1.1"), rows.get(f"{series}.1.2"), rows.get(f"{series}.2.1")]
        stranger = any(r["status"] == "refused" and r["calling_ae"] == "STRANGER" for r in rows.values())
        return stranger and all(r and r["status"] == "unreadable" for r in done) and (rows, done)

    rows, (trunc_row, nopix_row, sr_row) = wait_for(unreadable, what="3 unreadable rows and a refused one")
    assert "pixel data" in trunc_row["reason"] and trunc_row["calling_ae"] == "TESTSCU"
    assert nopix_row["reason"].startswith("not an image") and "without pixel data" in nopix_row["reason"]
    assert sr_row["reason"].startswith("not an image") and sr_row["label"] is None
    assert "not in --allow" in next(r["reason"] for r in rows.values() if r["status"] == "refused")
    assert "refused" in node.text() and "unreadable" in node.text()
    assert pacs.study_id(series) is None  # no result was sent
    echo = _scu(node.port)  # still serving
    assert echo.is_established and echo.send_c_echo().Status == 0x0000
    echo.release()


class Relay:
    """A TCP relay from a loopback port to the PACS: the destination the node sends to is "down" until the
    relay starts (the PACS on the other side is the real Orthanc)."""

    def __init__(self, port: int, target: int):
        self.port, self.target = port, target
        self.sock = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def test_sigkill_and_destination_down_lose_nothing_and_duplicate_nothing(pacs, tmp_path):
    relay_port = free_port()
    send_to = f"{pacs.aet}@127.0.0.1:{relay_port}"  # nothing listens there yet: the destination is down
    spool = tmp_path / "spool"
    first = Node(spool, send_to, "--workers", "2")
    pacs.add_modality("cxrfault", "CXREDGE", "127.0.0.1", first.port)
    series = FAULT_STUDY + ".1"
    ids = [pacs.upload(wrap_scan(scan, FAULT_STUDY, series, SOPInstanceUID=f"{series}.{i + 1}"))
           for i, scan in enumerate(SCANS)]
    answer = pacs.send("cxrfault", ids)
    assert answer["FailedInstancesCount"] == 0  # every store acknowledged
    first.stop(signal.SIGKILL)  # acknowledged, results not sent (the destination is down)
    rows = journal(spool)
    assert len(rows) == 3 and all(r["status"] in ("received", "waiting") for r in rows.values())
    assert pacs.modality_counts(FAULT_STUDY) == {"CR": 3}

    second = Node(spool, send_to, "--workers", "2")
    relay = None
    try:
        wait_for(lambda: "waiting in the spool" in second.text(), what="the node's log of the wait")
        relay = Relay(relay_port, pacs.dicom_port)  # the destination comes back
        wait_for(lambda: pacs.modality_counts(FAULT_STUDY) == {"CR": 3, "SR": 3, "OT": 3}, what="3 SRs + 3 SCs")
        def all_sent():
            rows_now = journal(spool)
            return all(r["status"] == "sent" for r in rows_now.values()) and rows_now

        after = wait_for(all_sent, what="the journal's sent rows")  # Orthanc stores before the node reads its answer
        assert {u: r["received"] for u, r in after.items()} == {u: r["received"] for u, r in rows.items()}  # no resend
        found = results(pacs, FAULT_STUDY)
        assert sorted(found) == sorted(f"{series}.{i + 1}" for i in range(3))
        assert all(len(v["SR"]) == 1 and len(v["OT"]) == 1 for v in found.values())
        assert "resuming 3 spooled instance(s)" in second.text()
    finally:
        second.stop()
        if relay:
            relay.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_on_the_listening_port(tmp_path):
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from cxr_edge.dicomnode import Node as InProcessNode

    cert, key = tmp_path / "node.pem", tmp_path / "node.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    node = InProcessNode(tmp_path / "spool", "X@127.0.0.1:1", port=0, tls_cert=str(cert), tls_key=str(key),
                         log=lambda message: None).start()
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 5
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        assoc = ae.associate("127.0.0.1", node.port, tls_args=(client, "localhost"))
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
        plain = ae.associate("127.0.0.1", node.port)  # without TLS: no association
        assert not plain.is_established
    finally:
        node.stop()


def test_allow_adults_reaches_the_node(tmp_path):
    """``cxr-edge dicom-node --allow-adults``: an adult's study (PatientAge 034Y) is refused by default and
    classified with the population warning under the flag (the result objects carry the record's warning)."""
    from PIL import Image

    from _runtime_fixtures import image_files
    from cxr_edge.dicomnode import Node as InProcessNode

    gray = __import__("numpy").asarray(Image.open(image_files("test")[0]).convert("L"))
    path = tmp_path / "adult.dcm"
    path.write_bytes(gray_to_dicom(gray, PatientAge="034Y", Modality="CR"))
    got = {}
    for flag in (False, True):
        node = InProcessNode(tmp_path / f"spool{flag}", "X@127.0.0.1:1", port=0, allow_adults=flag)
        got[flag] = next(iter(node.classifiers[0].classify_many([str(path)]))).to_dict()
    assert got[False]["status"] == "rejected" and got[False]["reason"].startswith("adult patient (PatientAge 034Y)")
    assert got[True]["status"] == "ok" and got[True]["warning"].startswith("adult patient (PatientAge 034Y)")
    help_text = CliRunner().invoke(cli, ["dicom-node", "--help"]).output
    assert "--allow-adults" in help_text
