"""Writing DICOM: :func:`gray_to_dicom`, a minimal file (Modality DX) around stored pixel values, for converting a
scan, for tests and for benchmarks (reading is ``cxr_edge.dicom``)."""
from __future__ import annotations

import io
from typing import Optional

import numpy as np

from cxr_edge.dicomtags import _pydicom

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"  # SOP class: digital X-ray image, for presentation


def gray_to_dicom(pixels: Optional[np.ndarray], *, photometric: str = "MONOCHROME2", bits_stored: int = 8,
                  frames: int = 1, sop_class: str = DX_FOR_PRESENTATION, **tags) -> bytes:
    """A minimal DICOM file (Modality DX, explicit VR little endian) holding the stored values ``pixels``
    (``[rows, cols]``, or ``[frames, rows, cols]``; ``None``: no image at all), in 8-, 16- or 32-bit words
    (the smallest that holds ``bits_stored``). ``tags`` set attributes (``ViewPosition="LL"``, ...); a ``None``
    value removes one (``Modality=None``). For converting a scan, for tests and for benchmarks; needs
    pydicom."""
    pydicom = _pydicom()
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if pixels is not None:
        allocated = 8 if bits_stored <= 8 else 16 if bits_stored <= 16 else 32
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = allocated, bits_stored, bits_stored - 1, 0
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = pixels.astype({8: "u1", 16: "<u2", 32: "<u4"}[allocated]).tobytes()
    for key, value in tags.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
