"""DICOM input (optional extra ``cxr-edge[dicom]``): a single-frame radiograph to 8-bit grayscale.

``cxr_edge.preprocess`` calls :func:`read_dicom` when a file has the ``DICM`` magic at byte 128, so DICOMs go
through the same ``load_gray`` / ``to_input`` as every other image. Steps, in the order the standard applies
them:

1. stored values (8, 12 or 16 bits, signed or unsigned) from ``pixel_array``;
2. Modality LUT or rescale slope/intercept (``pydicom.pixels.apply_modality_lut``);
3. VOI LUT or window center/width (``pydicom.pixels.apply_voi_lut``), if the file has one;
4. linear map of the display range to 0..255: the VOI output range if a VOI step was applied, otherwise the
   full range the stored bits can hold after the modality step, or the values' own range when they fill
   under an eighth of it (a CT slice in Hounsfield units); unsigned stored values without any LUT or rescale
   keep the top 8 bits of their depth (``preprocess.high_bits``, as for 16-bit PNGs: a 12-bit image by
   ``v >> 4``, also when the file declares 16 bits stored);
5. MONOCHROME1 (white = low values) inverted so that bone is bright, as in MONOCHROME2 and in JPEG scans; a
   MONOCHROME2 image whose Presentation LUT Shape is INVERSE likewise (the standard's last step, as viewers
   show it; MONOCHROME1 with INVERSE is inverted once);
6. pixels that Pixel Padding Value (to Pixel Padding Range Limit) marks as outside the patient shown black, and
   left out of any range read from the values (a 12-bit film padded with 65535 is not shown 16 times too dark).

Before any pixel is decoded, the metadata says whether this is a frontal chest radiograph at all
(:func:`check_metadata`); a readable object that is not one is refused with
:class:`cxr_edge.preprocess.InputRejected` (a "rejected" record with its reason, not an error):

- ``Modality``: CR, DX (and RG, and DR, the retired code older units still send) go on; OT ("other", e.g. a scanned film) and a missing tag fall through to the
  image gate; anything else is refused, "not a radiograph (Modality CT)" (CT, MR, US, NM, PT, RTDOSE, SR, ...)
  or, for X-ray modalities of other body parts (MG, PX, IO), "another body part (Modality MG)";
- ``BodyPartExamined``: a value with a word that names another body part (the standard's defined terms and
  common names: HAND, L SPINE, ABDOMENPELVIS) and none that names the chest is refused, "another body part
  (BodyPartExamined HAND)"; anything else goes on to the image gate: CHEST, missing, and the free text sites
  write (TORAX, BRUSTKORB, CXR, a site code);
- ``ViewPosition``: PA, AP (or missing, or an oblique/decubitus code) go on; LL, RL, LATERAL, LAT are
  refused, "lateral view (ViewPosition LL)";
- ``PresentationIntentType`` FOR PROCESSING (or the SOP class "Digital X-Ray Image Storage - For Processing"):
  the detector's raw values before the modality's image processing, which no reader (and not this model) looks
  at, are refused, "not for presentation (...)"; FOR PRESENTATION or missing go on;
- pixel data no radiograph has: 32-bit integer or floating-point pixels (RT dose grids, parametric maps)
  are refused, "not a radiograph (32 bits per pixel)".

PALETTE COLOR images (ultrasound, ...) are expanded through their palette and, like RGB/YBR images, returned in
colour, so that the pixel gate sees a colour image. Multi-frame objects ("not a single radiograph") and
objects without pixel data ("not an image") are refused too; a file that cannot be decoded is a
:class:`PreprocessError` (an error record). Data sets without the Part 10 preamble are read as well
(``preprocess`` recognises their first element), and compressed transfer syntaxes decode with the plugins
the ``dicom`` extra installs (Pillow for JPEG baseline and JPEG 2000; GDCM for JPEG lossless, JPEG-LS). 12-bit
JPEG (JPEG Extended) is an error that says so unless pylibjpeg with its libjpeg plugin is installed.
"""
from __future__ import annotations

import functools
import io
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

from cxr_edge.dicomtags import (AGE_DATES, AGE_UNITS, CHEST, FALL_THROUGH_MODALITIES,  # noqa: F401  (importable
                                FLOAT_PIXELS, LATERAL_VIEWS, OTHER_BODY_PART_MODALITIES,  # from here as before)
                                RADIOGRAPH_MODALITIES, _date, _is_multi, _pydicom, _sop_class, _text,
                                check_metadata, patient_age)
from cxr_edge.dicomwrite import DX_FOR_PRESENTATION, gray_to_dicom  # noqa: F401
from cxr_edge.pixels import InputRejected, PreprocessError, _reason, content_bits, high_bits

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT")
PALETTE = "PALETTE COLOR"


def _stored_range(ds) -> tuple[float, float]:
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0 ** bits - 1


def _modality_range(ds) -> tuple[float, float]:
    """Range of values after the Modality LUT / rescale step (same rule pydicom's windowing uses)."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, 2.0 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
    lo, hi = _stored_range(ds)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = sorted((lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)))
    return lo, hi


def _voi_kind(ds) -> str:
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        width = ds.WindowWidth
        try:
            width = float(width[0] if _is_multi(width) else width)
        except (TypeError, ValueError, IndexError):
            return "none"
        return "window" if width >= 1 else "none"  # an invalid window (width < 1): shown over the full range
    return "none"


def _identity_modality(ds) -> bool:
    if ds.get("ModalityLUTSequence"):
        return False
    try:
        return float(ds.get("RescaleSlope", 1) or 1) == 1 and float(ds.get("RescaleIntercept", 0) or 0) == 0
    except (TypeError, ValueError):
        return False


def _lookup(ds, item, values) -> tuple[np.ndarray, float]:
    """A Modality or VOI LUT Sequence item applied to ``values``, and the largest value its entries can hold.
    Done here rather than by pydicom, which indexes an 8-bit LUT with 8-bit indices (a 12-bit image through an
    8-bit VOI LUT of 4096 entries comes out as 0..15, a blank image). Indices below the first mapped value take
    the first entry, beyond the last the last (PS3.3 C.11.2.1.1); 8-bit entries may also be packed two to a
    16-bit word. The entries' depth is the descriptor's unless an entry is larger (the data decides then)."""
    desc = [int(v) for v in item.LUTDescriptor]
    n, first, bits = desc[0] or 65536, desc[1], desc[2]
    if first >= 32768 and int(ds.get("PixelRepresentation", 0) or 0) == 1:
        first -= 65536  # the first mapped value of signed data, written as US
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):  # OW
        little = getattr(ds, "original_encoding", (None, True))[1] is not False
        data = np.frombuffer(bytes(data)[: len(data) // 2 * 2], "<u2" if little else ">u2")
    lut = np.asarray(data if isinstance(data, (list, tuple, np.ndarray)) or _is_multi(data) else [data], np.int64)
    if bits == 8 and len(lut) * 2 == n:  # two 8-bit entries to a word, the first in the low byte
        lut = np.stack([lut & 0xFF, lut >> 8], axis=-1).reshape(-1)
    if len(lut) < n:
        raise PreprocessError(f"DICOM LUT has {len(lut)} entries, its descriptor says {n}")
    top = int(lut[:n].max(initial=0))
    hi = 2.0 ** (bits if top < 2 ** bits else content_bits(top)) - 1
    idx = np.clip(np.rint(np.asarray(values, np.float64)) - first, 0, n - 1).astype(np.int64)
    return lut[idx], hi


def _padding(ds, arr: np.ndarray) -> Optional[np.ndarray]:
    """The pixels that Pixel Padding Value (up to Pixel Padding Range Limit) marks as outside the patient, or
    None: such pixels are shown black and kept out of the display range. None too when every pixel or none is
    padding, or the tags are unreadable."""
    value = ds.get("PixelPaddingValue")
    if value is None or not np.issubdtype(arr.dtype, np.integer):
        return None
    try:
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        ends = [int.from_bytes(v[:2], "little", signed=signed) if isinstance(v, (bytes, bytearray)) else int(v)
                for v in (value, ds.get("PixelPaddingRangeLimit", value))]
    except (TypeError, ValueError):
        return None
    mask = (arr >= min(ends)) & (arr <= max(ends))
    return mask if mask.any() and not mask.all() else None


def _to_display_uint8(ds, arr: np.ndarray) -> np.ndarray:
    pad = _padding(ds, arr)
    out = _display(ds, arr, pad)
    if pad is not None:
        out = out.copy()
        out[pad] = 0  # outside the patient: black, as viewers show it (whatever the photometric interpretation)
    return out


def _display(ds, arr: np.ndarray, pad: Optional[np.ndarray]) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    kind = _voi_kind(ds)
    unsigned = int(ds.get("PixelRepresentation", 0) or 0) == 0
    shown = arr if pad is None else arr[~pad]  # the patient's pixels, for ranges read from the data
    if kind == "none" and _identity_modality(ds) and unsigned and np.issubdtype(arr.dtype, np.integer):
        # stored values shown as they are: the top 8 bits of their depth, as for 16-bit PNGs (a widened 8-bit
        # scan gives its own pixels back whether it was shifted or scaled; 12-bit data in a file that
        # declares 16 bits stored is not shown 16 times too dark)
        bits = min(int(ds.BitsStored), content_bits(int(shown.max(initial=0))))
        out = high_bits(arr, max(8, bits))
        return 255 - out if _shown_inverted(ds) else out
    if ds.get("ModalityLUTSequence"):
        values, _ = _lookup(ds, ds.ModalityLUTSequence[0], arr)
    else:
        values = apply_modality_lut(arr, ds)
    if kind == "lut":
        values, hi = _lookup(ds, ds.VOILUTSequence[0], values)
        lo = 0.0
    elif kind == "window":
        values = apply_voi_lut(values, ds, prefer_lut=False)
        lo, hi = _modality_range(ds)  # apply_windowing maps the window onto this range
    else:
        lo, hi = _modality_range(ds)
        v = np.asarray(values) if pad is None else np.asarray(values)[~pad]
        vmin, vmax = (float(v.min()), float(v.max())) if v.size else (lo, hi)
        if vmax - vmin < (hi - lo) / 8:
            # no window, and the values fill under an eighth of what the stored bits can hold (a CT slice in
            # Hounsfield units, signed data): shown over their own range, as viewers do, instead of as a
            # nearly uniform gray that reads as a blank image
            lo, hi = vmin, vmax
    span = hi - lo if hi > lo else 1.0
    out = (np.asarray(values, dtype=np.float64) - lo) * (255.0 / span)
    out = np.clip(np.rint(np.nan_to_num(out)), 0, 255).astype(np.uint8)
    if _shown_inverted(ds):
        out = 255 - out
    return out


def _shown_inverted(ds) -> bool:
    """Whether the display inverts the values (white = low): MONOCHROME1, or a Presentation LUT Shape of INVERSE.
    The standard pairs INVERSE with MONOCHROME1 (one inversion, not two); a MONOCHROME2 image with INVERSE asks
    for its output to be inverted too, as viewers show it. (A wrong INVERSE gives a negative, which the input
    gate refuses as an inverted image.)"""
    return ds.PhotometricInterpretation == "MONOCHROME1" or _text(ds, "PresentationLUTShape") == "INVERSE"


def _palette_rgb(ds, arr: np.ndarray) -> Image.Image:
    """A PALETTE COLOR image through its lookup tables, as 8-bit RGB."""
    from pydicom.pixels import apply_color_lut

    if arr.ndim != 2:
        raise PreprocessError(f"DICOM PALETTE COLOR pixel data has shape {arr.shape}, expected one 2-D frame")
    try:
        rgb = np.asarray(apply_color_lut(arr, ds))
    except Exception as exc:
        raise PreprocessError(f"cannot apply the DICOM colour palette ({_reason(exc)})") from None
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise PreprocessError(f"DICOM PALETTE COLOR gives shape {rgb.shape}, expected [rows, cols, 3]")
    if rgb.dtype != np.uint8:  # 16-bit palette entries
        top = 65535.0 if rgb.max(initial=0) > 255 else 255.0
        rgb = np.clip(np.rint(rgb.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def read_dicom(source: Union[str, os.PathLike, bytes, bytearray], force: bool = False) -> Image.Image:
    """A single-frame DICOM image as an 8-bit grayscale (``"L"``) PIL image, or 8-bit ``"RGB"`` for colour
    objects (RGB, YBR, PALETTE COLOR). Raises :class:`InputRejected` for an object that is not a frontal chest
    radiograph (:func:`check_metadata`, no image, several frames), :class:`PreprocessError` for one that
    cannot be read. ``force``: a data set without the Part 10 preamble and ``DICM`` marker."""
    with warnings.catch_warnings():  # pydicom warns about non-conformant files it reads anyway: not our output
        warnings.simplefilter("ignore")
        try:
            img, age = _read_dicom(source, force)
            if age is not None:  # for the intended-population check (cxr_edge.classifier), read with the pixels
                img.info["patient_age"] = age
            return img
        except PreprocessError:
            raise
        except Exception as exc:  # pydicom parses elements lazily: a malformed one fails where it is read
            raise PreprocessError(f"malformed DICOM file ({_reason(exc)})") from None


def _set_transfer_syntax(ds) -> None:
    """A data set read without file meta: the transfer syntax pydicom found while reading it, which its pixel
    decoders need (raw data sets are never compressed)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    implicit, little = ds.original_encoding
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    ds.file_meta = meta


@functools.lru_cache(maxsize=None)
def _quiet_gdcm() -> None:
    """GDCM (the decoder for JPEG lossless and JPEG-LS) prints its warnings to stderr; errors reach us as
    exceptions anyway. Once per process."""
    try:
        import gdcm
    except ImportError:
        return
    gdcm.Trace.WarningOff()
    gdcm.Trace.ErrorOff()
    gdcm.Trace.DebugOff()


def _has_pixel_data_tag(source) -> bool:
    """The file's bytes hold the Pixel Data tag (7FE0,0010), little or big endian: a data set read without it
    was cut short (read only then: a cheap check of a rare case, with no shared state between threads)."""
    try:
        data = bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    except (OSError, TypeError):
        return False
    return b"\xe0\x7f\x10\x00" in data or b"\x7f\xe0\x00\x10" in data


def _read_dicom(source, force: bool) -> Image.Image:
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        ds = pydicom.dcmread(fp, force=force)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise PreprocessError(f"unreadable DICOM file ({_reason(exc)})") from None
    except Exception as exc:
        raise PreprocessError(f"unreadable DICOM file ({_reason(exc)})") from None
    if "PixelData" not in ds and "IconImageSequence" not in ds and _has_pixel_data_tag(source):
        # pydicom returns what it read before the file ended (for a cut compressed image: nothing at all)
        raise PreprocessError("truncated DICOM file (it ends inside its pixel data)")
    if len(ds) == 0:
        raise PreprocessError("empty DICOM file (no data elements after the DICM marker)")

    check_metadata(ds)
    return _pixels(ds, force), patient_age(ds)


def _decoder(ds, bits: int) -> str:
    """pydicom's decoding plugin for compressed pixel data: any but GDCM that can decode it (Pillow for JPEG
    baseline and JPEG 2000, pyjpegls for JPEG-LS, pydicom's own for RLE), because GDCM's binding lets the C++
    exception of corrupt data abort the whole process (found by fuzzing); GDCM is left for JPEG lossless, which
    only it decodes here. 12-bit JPEG (JPEG Extended) needs pylibjpeg's libjpeg plugin (pydicom's GDCM plugin
    refuses it): without it, a :class:`PreprocessError` that says so. ``""``: pydicom's own order."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGExtended12Bit

    syntax = ds.file_meta.TransferSyntaxUID
    plugins = [p for p in get_decoder(syntax).available_plugins if p != "gdcm"]
    if syntax == JPEGExtended12Bit and bits > 8:  # Pillow reads 8-bit JPEG only
        plugins = [p for p in plugins if p != "pillow"]
        if not plugins:  # pydicom's GDCM plugin refuses it too: say so, not "all plugins failed"
            raise PreprocessError(f"DICOM 12-bit JPEG (JPEG Extended, {JPEGExtended12Bit}) cannot be decoded "
                                  "here: pydicom reads it only with pylibjpeg and its libjpeg plugin; send it "
                                  "uncompressed or as JPEG lossless")
    return plugins[0] if plugins else ""


def _pixels(ds, force: bool) -> Image.Image:
    if force and "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        _set_transfer_syntax(ds)
    if "PixelData" not in ds:
        raise InputRejected(f"not an image (DICOM {_sop_class(ds)} without pixel data)")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "")).strip()
        bits = int(ds.get("BitsStored", 0) or 0)
        allocated = int(ds.get("BitsAllocated", 0) or 0)
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError) as exc:
        raise PreprocessError(f"malformed DICOM image attributes ({_reason(exc)})") from None
    if bits > 16:  # RT dose grids and the like; radiographs store at most 16 bits
        raise InputRejected(f"not a radiograph ({bits} bits per pixel; radiographs have at most 16)")
    if frames > 1:  # a cine loop, a tomosynthesis or CT series: not one radiograph
        raise InputRejected(f"not a single radiograph (multi-frame DICOM, {frames} frames; "
                            "give one radiograph per file)")
    if photometric not in MONOCHROME + COLOR + (PALETTE,):
        raise PreprocessError(f"DICOM photometric interpretation {photometric or '(missing)'} is not supported")
    limit = Image.MAX_IMAGE_PIXELS  # the same decompression-bomb limit as for other images
    if limit and rows * cols > limit:
        raise PreprocessError(f"image too large ({cols}x{rows} = {rows * cols} pixels, limit {limit}; "
                              "possible decompression bomb)")
    if bits < 1:
        raise PreprocessError(f"DICOM with {bits} bits stored is not supported (1 to 16 bits)")
    if getattr(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None), "is_compressed", False):
        if allocated not in (8, 16) or bits > allocated:  # GDCM aborts the process on these (found by fuzzing)
            raise PreprocessError(f"DICOM compressed pixel data with {allocated} bits allocated and {bits} "
                                  "stored is not supported (8 or 16 allocated)")
        _quiet_gdcm()  # GDCM may be the decoder (imported only for compressed pixel data)
        ds.pixel_array_options(decoding_plugin=_decoder(ds, bits))
    try:
        arr = ds.pixel_array
    except Exception as exc:  # missing decoder plugins, truncated pixel data, ...
        raise PreprocessError(f"cannot decode DICOM pixel data ({_reason(exc)}); compressed transfer "
                              "syntaxes may need pylibjpeg or python-gdcm") from None

    if photometric == PALETTE:
        return _palette_rgb(ds, arr)
    if photometric in COLOR:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise PreprocessError(f"DICOM {photometric} pixel data has shape {arr.shape}, expected [rows, cols, 3]")
        if bits > 8:  # 16-bit colour (secondary captures): to 8 bits over the stored range
            arr = np.clip(np.rint(arr.astype(np.float64) * (255.0 / (2.0 ** bits - 1))), 0, 255)
        return Image.fromarray(np.asarray(arr, dtype=np.uint8), "RGB")  # in colour: the pixel gate sees it
    if arr.ndim != 2:
        raise PreprocessError(f"DICOM pixel data has shape {arr.shape}, expected one 2-D frame")
    try:
        gray = _to_display_uint8(ds, arr)
    except PreprocessError:
        raise
    except Exception as exc:
        raise PreprocessError(f"cannot apply the DICOM LUTs ({_reason(exc)})") from None
    return Image.fromarray(gray, "L")
