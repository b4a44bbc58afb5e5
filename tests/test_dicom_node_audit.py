"""What an audit of ``cxr-edge dicom-node`` as a PACS integrator would try found (2026-12-06), each case made
here with the node in this process and a pynetdicom destination (no Orthanc needed): a destination that does
not take the JPEG Secondary Capture ended every sender thread (no result was sent again), headers with values
the standard does not allow (PatientSex U, a dashed date) left their instance "received" for ever, the heatmap
lost the patient's issuer, and a spool write that fails left its temporary file on a full disk."""
from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pynetdicom = pytest.importorskip("pynetdicom", reason='the DICOM node needs pip install "cxr-edge[pacs]"')
pytest.importorskip("highdicom", reason='the DICOM node needs pip install "cxr-edge[pacs]"')
import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from cxr_edge import dicomresults, dicomspool  # noqa: E402
from cxr_edge.dicom import gray_to_dicom  # noqa: E402

SCAN = next((Path(__file__).resolve().parent / "data" / "chest_xray" / "test" / "PNEUMONIA").glob("*.jpeg"))
RECORD = {"label": "bacterial", "probabilities": {"normal": 0.1, "bacterial": 0.8, "viral": 0.1},
          "model": {"name": "m", "version": "1", "sha256": "0" * 64}}


def _film(**tags) -> pydicom.Dataset:
    gray = np.ascontiguousarray(np.asarray(Image.open(SCAN).convert("L"))[::4, ::4])
    study = tags.pop("StudyInstanceUID", generate_uid())
    return pydicom.dcmread(io.BytesIO(gray_to_dicom(gray, Modality="CR", StudyInstanceUID=study,
                                                    SeriesInstanceUID=generate_uid(), PatientID="P1", **tags)))


def test_results_from_a_header_with_values_the_standard_does_not_allow():
    """PatientSex U, a dashed birth date and a time with colons (sites write them): the result objects are made,
    those values empty (unknown), and the Secondary Capture carries the patient's issuer, age and the study
    description as the SR does; a JPEG one says it is lossy."""
    src = _film(PatientSex="U", PatientBirthDate="2020-01-01", StudyTime="10:15:00", IssuerOfPatientID="HOSP_A",
                PatientAge="004Y", StudyDescription="CHEST PA")
    uids = dicomresults.result_uids(src, "0" * 64)
    sr = dicomresults.structured_report(src, RECORD, uids)
    image = Image.fromarray(src.pixel_array.astype(np.uint8))
    for jpeg in (True, False):
        sc = dicomresults.secondary_capture(src, RECORD, uids, image, None, jpeg=jpeg)
        for ds in (sr, sc):
            assert not ds.PatientSex and not ds.PatientBirthDate and not ds.StudyTime
            assert (ds.PatientID, ds.IssuerOfPatientID, ds.PatientAge) == ("P1", "HOSP_A", "004Y")
        assert sc.StudyDescription == "CHEST PA" and sc.StudyInstanceUID == src.StudyInstanceUID
        assert sc.get("LossyImageCompression") == ("01" if jpeg else None)
    good = _film(PatientSex="F", PatientBirthDate="20200101", StudyTime="101500")
    kept = dicomresults.structured_report(good, RECORD, dicomresults.result_uids(good, "0" * 64))
    assert (kept.PatientSex, kept.PatientBirthDate, kept.StudyTime) == ("F", "20200101", "101500")


def test_a_failed_spool_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dicomspool.os, "fsync", full)
    with pytest.raises(OSError):
        dicomspool._fsync_write(tmp_path / "x.dcm", b"x" * 1000)
    assert list(tmp_path.iterdir()) == []


def test_one_instance_written_by_two_associations_at_once(tmp_path):
    """Each writer has its own temporary file: both complete, the file is one of the two whole copies."""
    path, errors = tmp_path / "x.dcm", []
    copies = [bytes([k]) * 200_000 for k in (1, 2)]

    def write(data):
        try:
            for _ in range(30):
                dicomspool._fsync_write(path, data)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(c,)) for c in copies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and path.read_bytes() in copies and [p.name for p in tmp_path.iterdir()] == ["x.dcm"]


class Destination:
    """A PACS that takes SR and Secondary Capture uncompressed only (storescp's default): no JPEG."""

    def __init__(self):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage, Verification
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        self.got: list = []
        ae = AE(ae_title="STORESCP")
        for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage, Verification):
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

        def store(event):
            self.got.append(event.dataset)
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
        self.port = self.server.server_address[1]


def _send(port: int, datasets) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", port)
    assert assoc.is_established
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()


def test_a_destination_without_jpeg_keeps_the_senders_alive(tmp_path):
    """The JPEG Secondary Capture has no accepted context: each try is logged with what to do and the result set
    stays in the spool; the senders live on, so an SR-only result (a refused lateral view) is still delivered,
    and an instance whose header lacks its series is journaled, not left "received"."""
    from cxr_edge.dicomnode import Node

    dest, lines = Destination(), []
    node = Node(tmp_path / "spool", f"STORESCP@127.0.0.1:{dest.port}", port=0, retry_max=0.2,
                log=lines.append).start()
    try:
        labelled = _film()
        _send(node.port, [labelled])
        deadline = time.monotonic() + 60
        while not any("--sc-uncompressed" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any("--sc-uncompressed" in line for line in lines), lines
        lateral, no_series = _film(ViewPosition="LL"), _film()
        del no_series.SeriesInstanceUID
        _send(node.port, [lateral, no_series])
        while time.monotonic() < deadline and not any(
                ds.Modality == "SR" and ds.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID
                == lateral.StudyInstanceUID for ds in dest.got):
            time.sleep(0.1)
        assert [t.name for t in node._threads if not t.is_alive()] == []
        assert any(ds.Modality == "SR" for ds in dest.got), lines
        status = dict((uid, s) for uid, s in node.spool.journal.pending())
        assert status.get(labelled.SOPInstanceUID) == "waiting"  # its results kept, tried again
        while no_series.SOPInstanceUID in status and time.monotonic() < deadline:
            time.sleep(0.1)
            status = dict((uid, s) for uid, s in node.spool.journal.pending())
        assert no_series.SOPInstanceUID not in status
        assert any("no SeriesInstanceUID" in line for line in lines), lines
    finally:
        node.stop()
        dest.server.shutdown()


def test_result_headers_leave_the_source_as_it_was():
    src = _film(PatientSex="U", StudyDate="2020-01-01")
    dicomresults.structured_report(src, RECORD, dicomresults.result_uids(src, "0" * 64))
    assert (src.PatientSex, src.StudyDate) == ("U", "2020-01-01")


def test_a_destination_down_is_tried_once_an_interval(tmp_path):
    """The senders share one back-off: with the destination down, each result set is tried about once per
    --retry-max interval (each sender backing off alone handed the same sets to the next: 4 tries an
    interval), and the log says so about once an interval."""
    import socket

    from cxr_edge.dicomnode import Node

    with socket.socket() as s:  # a port nothing listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lines: list = []
    node = Node(tmp_path / "spool", f"PACS@127.0.0.1:{port}", port=0, retry_max=0.5, log=lines.append).start()
    try:
        films = [_film() for _ in range(3)]
        _send(node.port, films)
        time.sleep(4.0)
        attempts = dict(node.spool.journal._run("SELECT sop_instance_uid, attempts FROM journal"))
    finally:
        node.stop()
    tries = [attempts[f.SOPInstanceUID] for f in films]
    assert all(1 <= t <= 10 for t in tries), tries  # 4 s / 0.5 s, with start-up and classification
    assert sum("waiting in the spool" in line for line in lines) <= 12, len(lines)
