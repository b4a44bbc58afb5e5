"""DICOM display steps beyond the pixels themselves: the Presentation LUT Shape (white = low values) and the
presentation intent (raw detector images refused). All DICOM files are synthetic, made here."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pydicom")

from test_dicom import _same_record_as_the_scan, _small, scan, small_clf, write_dicom  # noqa: E402,F401 (fixtures)
from _runtime_fixtures import bundle_dir  # noqa: E402,F401  (fixture)
from cxr_edge.dicom import DX_FOR_PRESENTATION  # noqa: E402
from cxr_edge.preprocess import InputRejected, load_gray  # noqa: E402



@pytest.mark.parametrize("photometric,shape,negative", [
    ("MONOCHROME2", "INVERSE", True),  # the file asks for its output inverted: stored as a negative
    ("MONOCHROME1", "INVERSE", True),  # the standard's pair for MONOCHROME1: one inversion, not two
    ("MONOCHROME1", "IDENTITY", True),  # MONOCHROME1 says it anyway
    ("MONOCHROME2", "IDENTITY", False),
    ("MONOCHROME2", None, False)])
def test_presentation_lut_shape(scan, tmp_path, photometric, shape, negative):
    """The stored values are the scan (or its negative where the tags say white = low): each file shows the scan."""
    v = _small(scan)
    for bits, pixels in ((8, v), (12, v.astype(np.uint16) * 16 + 8)):
        top = 2 ** bits - 1
        path = write_dicom(tmp_path / f"{photometric}-{shape}-{bits}.dcm", top - pixels if negative else pixels,
                           photometric=photometric, bits_stored=bits, PresentationLUTShape=shape)
        if bits == 12:  # through the LUT path too (a window over the whole range)
            path = write_dicom(path, top - pixels if negative else pixels, photometric=photometric,
                               bits_stored=bits, PresentationLUTShape=shape, WindowCenter=str((top + 1) // 2),
                               WindowWidth=str(top + 1))
        gray = load_gray(path, 64).astype(int)
        assert np.abs(gray - load_gray(Image.fromarray(v), 64).astype(int)).mean() < 1.0, (photometric, shape, bits)


FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"


@pytest.mark.parametrize("sop_class,intent,refused", [
    (DX_FOR_PRESENTATION, "FOR PROCESSING", "PresentationIntentType FOR PROCESSING"),
    (FOR_PROCESSING, "FOR PROCESSING", "PresentationIntentType FOR PROCESSING"),
    (FOR_PROCESSING, None, "Digital X-Ray Image Storage - For Processing"),
    (DX_FOR_PRESENTATION, "FOR PRESENTATION", None),
    (DX_FOR_PRESENTATION, None, None)])
def test_raw_detector_images_are_refused(scan, tmp_path, small_clf, sop_class, intent, refused):
    """A DX object for processing (the detector's raw values) is refused with its reason, before any pixel is
    decoded, and reported as a rejected record; for presentation (or untagged) it goes on."""
    path = write_dicom(tmp_path / "x.dcm", _small(scan), sop_class=sop_class, PresentationIntentType=intent,
                       BodyPartExamined="CHEST", ViewPosition="PA")
    if refused:
        with pytest.raises(InputRejected, match=rf"^not for presentation \({refused}: "):
            load_gray(path, 64)
        r = small_clf.classify(path)
        assert not r.ok and r.to_dict()["status"] == "rejected" and "for presentation" in r.to_dict()["reason"]
    else:
        _same_record_as_the_scan(small_clf, path, scan, tmp_path)


def _with_lut(path, keyword: str, descriptor: list[int], data, vr: str):
    """The DICOM file at ``path`` with one ``keyword`` (VOILUTSequence, ModalityLUTSequence) item."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = dcmread(path)
    item = Dataset()
    item.LUTDescriptor = descriptor
    item.LUTData = data
    item["LUTData"].VR = vr
    if keyword == "ModalityLUTSequence":
        item.ModalityLUTType = "US"
    setattr(ds, keyword, Sequence([item]))
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("case", ["8-bit entries", "8-bit entries, two to a word", "12-bit entries as OW",
                                  "16-bit entries", "first mapped 512", "modality LUT, 8-bit entries"])
def test_lookup_tables_show_the_scan(scan, tmp_path, case):
    """A 12-bit image (the scan's pixels x 16 + 8) through a LUT that maps it back: every form shows the scan.
    (pydicom's own VOI LUT step indexes an 8-bit LUT with 8-bit indices: that image came out as 0..15, blank.)"""
    v = _small(scan)
    stored = v.astype(np.uint16) * 16 + 8
    idx = np.arange(4096)
    path = write_dicom(tmp_path / "lut.dcm", stored, bits_stored=12)
    if case == "8-bit entries":
        _with_lut(path, "VOILUTSequence", [4096, 0, 8], (idx // 16).tolist(), "US")
    elif case == "8-bit entries, two to a word":
        lut = (idx // 16).astype(np.uint16)
        _with_lut(path, "VOILUTSequence", [4096, 0, 8], (lut[0::2] | (lut[1::2] << 8)).tolist(), "US")
    elif case == "12-bit entries as OW":
        _with_lut(path, "VOILUTSequence", [4096, 0, 12], idx.astype("<u2").tobytes(), "OW")
    elif case == "16-bit entries":
        _with_lut(path, "VOILUTSequence", [4096, 0, 16], (idx * 16).tolist(), "US")
    elif case == "first mapped 512":  # values under 512 take entry 0, the others entry (value - 512)
        lut = np.clip(np.arange(4096 - 512) + 512, 0, 4095) // 16
        _with_lut(path, "VOILUTSequence", [4096 - 512, 512, 8], lut.tolist(), "US")
        v = np.where(stored < 512, 512 // 16, v).astype(np.uint8)
    else:  # a modality LUT of 8-bit entries, no VOI step: shown over its 8-bit range
        _with_lut(path, "ModalityLUTSequence", [4096, 0, 8], (idx // 16).tolist(), "US")
    gray = load_gray(path, 64).astype(int)
    ref = load_gray(Image.fromarray(v), 64).astype(int)
    assert np.abs(gray - ref).mean() < 1.0, (case, np.abs(gray - ref).mean(), gray.min(), gray.max())
