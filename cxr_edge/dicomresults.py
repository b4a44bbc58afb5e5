"""The result objects of ``cxr-edge dicom-node`` (:mod:`cxr_edge.dicomnode`), made with highdicom (extra
``cxr-edge[pacs]``), both in the source image's study (its Study Instance UID, patient and study modules):

1. a Comprehensive SR (:func:`structured_report`), document title "Diagnostic imaging report" (LOINC
   18748-4): a comment "Not for diagnostic use ...", the algorithm identification (TID 4019: model name,
   version, ``sha256=...`` and ``backend=...`` as parameters), the source image as "Source of Measurement",
   and then either the finding (DCM 121071 "Finding": the label as a SNOMED CT code) with one numeric
   probability per class (codes ``99CXREDGE P-<class>``, unit UCUM ``1``), or, for a gate refusal, the reason
   as text (``99CXREDGE REFUSED``) and no finding; a record's ``warning`` becomes one more text item;
2. for labelled scans only, a Secondary Capture (:func:`secondary_capture`): the scan with its heatmap
   overlay (``cxr_edge.heatmap.overlay``, as ``cxr-edge classify --heatmap`` draws it) under a band with
   "NOT FOR DIAGNOSTIC USE", the label, the probabilities and any warning burned in (Burned In Annotation
   YES).

UIDs (:func:`result_uid`) are name-based UUIDs (``2.25.<uuid5>``) of the source SOP Instance UID, the model's
sha256 and the object's role, so the same source and model always give the same result UIDs: a resend
replaces the earlier object instead of adding a second one.
"""
from __future__ import annotations

import re
import uuid
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MANUFACTURER = "cxr-edge"
MODEL_NAME = "cxr-edge dicom-node"  # Manufacturer's Model Name of every result object (the node skips them)
DISCLAIMER = "Not for diagnostic use: cxr-edge is research software, not a medical device."
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902
_NAMESPACE = uuid.UUID("0b5c3f3e-7f0e-4d7e-9c61-2f1d6a0c2e32")  # cxr-edge's namespace for its result UIDs
PRIVATE = "99CXREDGE"  # coding scheme of the codes SNOMED CT and DCM do not have
FINDINGS = {"normal": ("17621005", "SCT", "Normal"),
            "bacterial": ("53084003", "SCT", "Bacterial pneumonia"),
            "viral": ("75570004", "SCT", "Viral pneumonia")}


def result_uid(source_uid: str, model_sha256: str, role: str) -> str:
    """``2.25.<uuid5>`` of (source UID, model sha256, role): ``role`` is "sr", "sc", "sr-series", ..."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, f'{source_uid}|{model_sha256}|{role}').int}"


def result_uids(source, model_sha256: str) -> dict:
    """The UIDs of one source instance's results: SOP Instance UIDs per source instance, Series Instance UIDs
    per source series (all SRs of one series together, all SCs together)."""
    sop, series = str(source.SOPInstanceUID), str(source.get("SeriesInstanceUID", source.SOPInstanceUID))
    return {"sr": result_uid(sop, model_sha256, "sr"), "sc": result_uid(sop, model_sha256, "sc"),
            "sr_series": result_uid(series, model_sha256, "sr-series"),
            "sc_series": result_uid(series, model_sha256, "sc-series")}


def _code(value: str, scheme: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value, scheme, meaning)


def _finding(label: str):
    return _code(*FINDINGS.get(label, (f"L-{label}"[:16], PRIVATE, label)))


def _instance_number(source) -> int:
    try:
        return max(1, int(source.get("InstanceNumber") or 1))
    except (TypeError, ValueError):
        return 1


_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                  "StudyDate", "StudyTime", "ReferringPhysicianName")


# values sites write that the standard does not allow, which highdicom refuses to copy (PatientSex U,
# 2020-01-01 for a date, 10:15:00 for a time): the result objects carry them empty (type 2: unknown)
_VALID = {"PatientSex": re.compile(r"[MFO]"), "PatientBirthDate": re.compile(r"\d{8}"),
          "StudyDate": re.compile(r"\d{8}"), "StudyTime": re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")}
# the patient and study attributes the SR carries and highdicom's Secondary Capture leaves out
SC_COPIED = ("IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence", "PatientAge",
             "PatientSize", "PatientWeight", "StudyDescription")


def _header(source):
    """The source's data set without pixel data, its patient and study attributes present (type 2: an absent
    one empty, an invalid one emptied), as highdicom copies them into a result object."""
    from pydicom.dataset import Dataset

    header = Dataset()
    header.update({elem.tag: elem for elem in source if elem.keyword not in ("PixelData", "FloatPixelData",
                                                                             "DoubleFloatPixelData")})
    for keyword in _PATIENT_STUDY:
        value = header.get(keyword) if keyword in header else None
        if keyword not in header or (keyword in _VALID and value not in (None, "")
                                     and not _VALID[keyword].fullmatch(str(value).strip())):
            if keyword in header:
                del header[keyword]  # the element is the source's: a new empty one, the source untouched
            setattr(header, keyword, None)
    return header


def structured_report(source, record: dict, uids: dict):
    """The Comprehensive SR of one classification ``record`` (``Result.to_dict()`` or a refusal's) about
    ``source`` (its data set; pixel data not needed)."""
    from highdicom.sr import (AlgorithmIdentification, CodeContentItem, ComprehensiveSR, ContainerContentItem,
                              ImageContentItem, NumContentItem, TextContentItem)
    from pydicom.sr.codedict import codes

    model = record.get("model") or {}
    items = [TextContentItem(codes.DCM.Comment, DISCLAIMER, relationship_type="CONTAINS")]
    items += AlgorithmIdentification(str(model.get("name", "cxr-edge")), str(model.get("version", "?")),
                                     parameters=[f"sha256={model.get('sha256', '')}"])
    items.append(ImageContentItem(codes.DCM.SourceOfMeasurement, source.SOPClassUID, source.SOPInstanceUID,
                                  relationship_type="CONTAINS"))
    label = record.get("label")
    if label is not None:
        items.append(CodeContentItem(codes.DCM.Finding, _finding(str(label)), relationship_type="CONTAINS"))
        for name, p in (record.get("probabilities") or {}).items():
            items.append(NumContentItem(_code(f"P-{name}"[:16], PRIVATE, f"Probability of {name}"), float(p),
                                        _code("1", "UCUM", "no units"), relationship_type="CONTAINS"))
    if record.get("reason"):
        items.append(TextContentItem(_code("REFUSED", PRIVATE, "Input refused" if label is None else "Reason"),
                                     str(record["reason"]), relationship_type="CONTAINS"))
    if record.get("warning"):
        items.append(TextContentItem(_code("WARNING", PRIVATE, "Warning"), str(record["warning"]),
                                     relationship_type="CONTAINS"))
    root = ContainerContentItem(_code("18748-4", "LN", "Diagnostic imaging report"))
    root.ContentSequence = items
    sr = ComprehensiveSR(evidence=[_header(source)], content=root, series_instance_uid=uids["sr_series"],
                         series_number=SR_SERIES_NUMBER, sop_instance_uid=uids["sr"],
                         instance_number=_instance_number(source), manufacturer=MANUFACTURER, is_complete=True)
    sr.ManufacturerModelName = MODEL_NAME
    sr.SeriesDescription = "cxr-edge result (not for diagnostic use)"
    return sr


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def annotated(image: Image.Image, record: dict) -> Image.Image:
    """``image`` (the overlay) under a black band with the disclaimer, label, probabilities and warning."""
    width = image.width
    size = max(12, width // 40)
    probs = record.get("probabilities") or {}
    lines = ["NOT FOR DIAGNOSTIC USE",
             f"cxr-edge: {record.get('label')}   " + "   ".join(f"{k} {float(v):.3f}" for k, v in probs.items())]
    if record.get("warning"):
        lines.append(f"warning: {record['warning']}")
    band = (len(lines) * 5 * size) // 4 + size // 2
    out = Image.new("RGB", (width, image.height + band), (0, 0, 0))
    out.paste(image.convert("RGB"), (0, band))
    draw, font = ImageDraw.Draw(out), _font(size)
    for i, line in enumerate(lines):
        draw.text((size // 2, size // 4 + i * (5 * size) // 4), line, fill=(255, 255, 0) if i == 0 else (255,) * 3,
                  font=font)
    return out


def secondary_capture(source, record: dict, uids: dict, image: Image.Image, heatmap: Optional[np.ndarray],
                      jpeg: bool = True):
    """The Secondary Capture of a labelled scan: ``image`` (the decoded scan) with ``heatmap`` over it (none:
    the scan alone) and the annotations burned in. ``jpeg``: JPEG Baseline (YBR_FULL_422, lossy; a tenth of
    the bytes to write, send and store: a heatmap for viewing, not for diagnosis), else uncompressed RGB."""
    from highdicom.sc import SCImage
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

    from cxr_edge.heatmap import overlay

    shown = overlay(image, heatmap) if heatmap is not None else overlay(image, np.zeros((1, 1), np.float32), 0.0)
    pixels = np.asarray(annotated(shown, record), dtype=np.uint8)
    orientation = source.get("PatientOrientation")
    sc = SCImage.from_ref_dataset(
        ref_dataset=_header(source), pixel_array=pixels, photometric_interpretation="YBR_FULL_422" if jpeg else "RGB",
        bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=tuple(orientation) if orientation and len(orientation) == 2
        else ("L", "F"), series_instance_uid=uids["sc_series"], series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uids["sc"], instance_number=_instance_number(source), manufacturer=MANUFACTURER,
        transfer_syntax_uid=JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian)
    if not (orientation and len(orientation) == 2):
        sc.PatientOrientation = None  # type 2: known empty rather than a guess
    if "Laterality" not in sc:
        sc.Laterality = source.get("Laterality")  # type 2C: dciodvfy asks for it; empty when the source has none
    sc.ManufacturerModelName = MODEL_NAME
    sc.SourceImageSequence = [Dataset()]
    sc.SourceImageSequence[0].ReferencedSOPClassUID = source.SOPClassUID
    sc.SourceImageSequence[0].ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.DerivationDescription = "cxr-edge class-activation heatmap over the source image, annotations burned in"
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"
    for keyword in SC_COPIED:  # the same patient (an issuer-aware PACS files by ID and issuer) and study as the SR
        if keyword in source and keyword not in sc:
            sc[keyword] = source[keyword]
    if jpeg:
        sc.LossyImageCompression = "01"
        sc.LossyImageCompressionMethod = "ISO_10918_1"
    sc.SeriesDescription = "cxr-edge heatmap (not for diagnostic use)"
    sc.ImageComments = DISCLAIMER
    return sc
