"""DICOM attributes read before any pixel is decoded (``cxr_edge.dicom`` reads the pixels): whether the metadata
says this is a frontal chest radiograph at all (:func:`check_metadata`, the rules are in ``cxr_edge.dicom``'s
docstring), the patient's age for the intended-population check (:func:`patient_age`), the SOP class for a
message, and pydicom's import (the optional extra ``cxr-edge[dicom]``) for reading and writing DICOM."""
from __future__ import annotations

import re
from typing import Optional

from cxr_edge.pixels import InputRejected, PreprocessError

RADIOGRAPH_MODALITIES = {"CR", "DX", "RG", "DR"}  # DR: digital radiography's retired code, still sent by older units
FALL_THROUGH_MODALITIES = {"OT"}  # "other": scanned films, secondary captures; the image gate decides
OTHER_BODY_PART_MODALITIES = {"MG": "mammography", "PX": "dental panoramic", "IO": "intra-oral"}
CHEST = {"CHEST", "THORAX", "LUNG", "LUNGS"}
# BodyPartExamined is free text in practice (local languages, site codes: TORAX, BRUSTKORB, CXR, ...): a value is
# refused only when a word of it names another body part (a selection of the standard's defined terms, PS3.16
# Annex L, and common English names) and none names the chest; any other value goes on to the image gate, which decides.
CHEST_WORDS = CHEST | {"CXR", "TORAX", "TÓRAX", "TORACE", "THORACE", "THORAKS", "THORAKAL", "BRUSTKORB", "PECHO",
                       "POITRINE", "TORAKS", "CHESTABDOMEN", "CHESTABDPELVIS", "NECKCHEST", "NECKCHESTABDOMEN",
                       "NECKCHESTABDPELV"}
OTHER_BODY_PARTS = {
    "SKULL", "HEAD", "BRAIN", "FACE", "JAW", "MANDIBLE", "MAXILLA", "ORBIT", "ORBITS", "NOSE", "SINUS", "SINUSES",
    "EAR", "IAC", "TMJ", "TEETH", "TOOTH", "DENTAL", "ZYGOMA", "NECK", "HEADNECK", "LARYNX", "SPINE", "CSPINE",
    "TSPINE", "LSPINE", "SSPINE", "CTSPINE", "TLSPINE", "LSSPINE", "COCCYX", "SACRUM", "ABDOMEN", "ABDOMENPELVIS",
    "PELVIS", "HIP", "HIPS", "FEMUR", "THIGH", "KNEE", "KNEES", "PATELLA", "LEG", "LEGS", "TIBIA", "FIBULA", "CALF",
    "ANKLE", "ANKLES", "FOOT", "FEET", "CALCANEUS", "HEEL", "TOE", "TOES", "SHOULDER", "SHOULDERS", "CLAVICLE",
    "SCAPULA", "HUMERUS", "ARM", "ARMS", "ELBOW", "ELBOWS", "FOREARM", "RADIUS", "ULNA", "WRIST", "WRISTS", "HAND",
    "HANDS", "FINGER", "FINGERS", "THUMB", "EXTREMITY", "UPPEREXTREMITY", "LOWEREXTREMITY", "LIMB", "BREAST",
    "KIDNEY", "BLADDER", "COLON", "STOMACH", "KUB", "ACJOINT", "SIJOINT", "SCJOINT", "BUTTOCK"}


def names_another_body_part(part: str) -> bool:
    """A BodyPartExamined value (upper case) that names another body part and not the chest."""
    words = set(re.split(r"[^0-9A-ZÀ-Þ]+", part)) - {""}
    return bool(words & OTHER_BODY_PARTS) and not (words & CHEST_WORDS or any(w in part for w in ("CHEST", "THORAX")))
LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT", "LEFT LATERAL", "RIGHT LATERAL"}
FLOAT_PIXELS = ("FloatPixelData", "DoubleFloatPixelData")
FOR_PROCESSING_CLASSES = {"1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
                          "1.2.840.10008.5.1.4.1.1.1.2.1": "Digital Mammography X-Ray Image Storage - For Processing",
                          "1.2.840.10008.5.1.4.1.1.1.3.1": "Digital Intra-Oral X-Ray Image Storage - For Processing"}


def _is_multi(value) -> bool:
    """A multi-valued element's value (pydicom's ``MultiValue``, or a list/tuple)."""
    return isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"


def _text(ds, keyword: str) -> str:
    """A tag's value as upper-case text, ``""`` when missing/empty (multi-valued: joined with ``\\``)."""
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed element: treated as missing, the image gate still decides
        return ""
    if value is None:
        return ""
    if _is_multi(value):
        value = "\\".join(str(v) for v in value)
    return " ".join(str(value).upper().split())


def check_metadata(ds) -> None:
    """Raise :class:`InputRejected` when the DICOM metadata says this is not a frontal chest radiograph
    (see the module docstring); return quietly when it is one or the tags do not say."""
    modality = _text(ds, "Modality")
    if modality and modality not in RADIOGRAPH_MODALITIES | FALL_THROUGH_MODALITIES:
        if modality in OTHER_BODY_PART_MODALITIES:
            raise InputRejected(f"another body part (Modality {modality}: {OTHER_BODY_PART_MODALITIES[modality]})")
        raise InputRejected(f"not a radiograph (Modality {modality})")
    part = _text(ds, "BodyPartExamined")
    if part and names_another_body_part(part):
        raise InputRejected(f"another body part (BodyPartExamined {part})")
    view = _text(ds, "ViewPosition")
    if view and (view in LATERAL_VIEWS or view.replace("_", " ") in LATERAL_VIEWS):
        raise InputRejected(f"lateral view (ViewPosition {view})")
    for keyword in FLOAT_PIXELS:
        if keyword in ds:
            raise InputRejected("not a radiograph (floating-point pixel data)")
    intent = _text(ds, "PresentationIntentType")
    sop = str(_sop_uid(ds) or "").strip()
    if intent == "FOR PROCESSING" or (sop in FOR_PROCESSING_CLASSES and intent != "FOR PRESENTATION"):
        said = f"PresentationIntentType {intent}" if intent == "FOR PROCESSING" else FOR_PROCESSING_CLASSES[sop]
        raise InputRejected(f"not for presentation ({said}: the detector's raw values, before the modality's "
                            "image processing; send the image for presentation)")


AGE_UNITS = {"Y": 1.0, "M": 1.0 / 12, "W": 7 / 365.25, "D": 1 / 365.25}  # PatientAge (AS): nnnD/W/M/Y
AGE_DATES = ("StudyDate", "AcquisitionDate", "ContentDate", "SeriesDate")  # when the film was taken, in order


def _date(text: str):
    """A DICOM date (DA, ``YYYYMMDD``; the older ``YYYY.MM.DD`` too) or None."""
    import datetime

    digits = text.replace(".", "").strip()
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return datetime.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None


def patient_age(ds) -> Optional[tuple[float, str]]:
    """(age in years, the tags it came from, for a message) from ``PatientAge`` (``034Y``, ``006M``, ``012W``,
    ``010D``), else from ``PatientBirthDate`` and the first of ``AGE_DATES`` present; ``None`` when the tags are
    missing or malformed (an age under 0 or over 150 years is malformed): the pixels decide then."""
    age = _text(ds, "PatientAge")
    if len(age) == 4 and age[:3].isdigit() and age[3] in AGE_UNITS:
        years = int(age[:3]) * AGE_UNITS[age[3]]
        if years <= 150:
            return years, f"PatientAge {age}"
    born = _date(_text(ds, "PatientBirthDate"))
    if born is None:
        return None
    for keyword in AGE_DATES:
        taken = _date(_text(ds, keyword))
        if taken is not None:
            years = (taken - born).days / 365.25
            if 0 <= years <= 150:
                return years, f"PatientBirthDate {born:%Y%m%d}, {keyword} {taken:%Y%m%d}"
            return None
    return None


def _pydicom():
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401  (pydicom >= 3)
        return pydicom
    except ImportError:
        raise PreprocessError("this is a DICOM file; reading DICOM needs pydicom: "
                              "pip install 'cxr-edge[dicom]'") from None


def _sop_uid(ds):
    """The SOP Class UID as pydicom read it (from the data set, else the file meta); None when missing or
    malformed (pydicom parses elements lazily: a malformed one fails where it is read)."""
    try:
        return ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID") or None
    except Exception:
        return None


def _sop_class(ds) -> str:
    """The SOP class's name (or UID) for a message: one line of printable text, whatever the file holds."""
    uid = _sop_uid(ds)
    try:
        text = str(getattr(uid, "name", None) or uid or "")
    except Exception:  # a malformed element
        text = ""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text or "unknown SOP class"
