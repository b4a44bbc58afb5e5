"""DICOM input: files written with pydicom from a real scan classify like the JPEG they came from; objects whose
metadata (Modality, BodyPartExamined, ViewPosition) or pixel format says they are not a frontal chest radiograph
are refused with a reason (``InputRejected``), never an error or a traceback. All DICOM files are synthetic,
made here."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from _runtime_fixtures import bundle_dir, image_files  # noqa: E402,F401  (fixture)
from cxr_edge import Classifier  # noqa: E402
from cxr_edge.cli import cli  # noqa: E402
from cxr_edge.dicom import DX_FOR_PRESENTATION, gray_to_dicom  # noqa: E402
from cxr_edge.labels import CLASS_NAMES  # noqa: E402
from cxr_edge.preprocess import InputRejected, PreprocessError, load_gray, load_gray_colour  # noqa: E402

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def write_dicom(path: Path, pixels: np.ndarray | None, *, photometric: str = "MONOCHROME2", bits_stored: int = 8,
                frames: int = 1, sop_class: str = DX_FOR_PRESENTATION, **extra) -> Path:
    extra.setdefault("PatientName", "Test^Phantom")
    path.write_bytes(gray_to_dicom(pixels, photometric=photometric, bits_stored=bits_stored, frames=frames,
                                   sop_class=sop_class, **extra))
    return path


@pytest.fixture(scope="module")
def scan() -> tuple[Path, np.ndarray]:
    """A full-resolution test JPEG and its fully decoded 8-bit pixels."""
    path = image_files("test")[2]
    with Image.open(path) as img:
        return path, np.asarray(img.convert("L"))


def _variants(v: np.ndarray) -> dict:
    """name -> (stored pixels, write_dicom keyword arguments); all display as the 8-bit original ``v``."""
    v16 = v.astype(np.uint16)
    return {
        "mono2_8bit": (v, {"bits_stored": 8}),
        "mono1_8bit": (255 - v, {"bits_stored": 8, "photometric": "MONOCHROME1"}),
        "mono2_16bit": (v16 * 257, {"bits_stored": 16}),
        "mono1_16bit": (65535 - v16 * 257, {"bits_stored": 16, "photometric": "MONOCHROME1"}),
        "mono2_12bit": (v16 * 16 + 8, {"bits_stored": 12}),
        # widened by shifting, as many converters do: the top bits are the original pixels
        "mono2_12bit_shifted": (v16 << 4, {"bits_stored": 12}),
        "mono2_16bit_shifted": (v16 << 8, {"bits_stored": 16}),
        "mono1_12bit_shifted": ((255 - v16) << 4, {"bits_stored": 12, "photometric": "MONOCHROME1"}),
        # 12-bit data whose rescale maps it back to 0..255 ... and a window spanning that range
        "mono2_12bit_rescale_window": (v16 * 16, {"bits_stored": 12, "RescaleSlope": "0.0625",
                                                   "RescaleIntercept": "0", "WindowCenter": "128",
                                                   "WindowWidth": "256"}),
    }


def test_dicom_pixels_match_the_jpeg(scan, tmp_path):
    _, v = scan
    for name, (pixels, kw) in _variants(v).items():
        path = write_dicom(tmp_path / f"{name}.dcm", pixels, **kw)
        assert path.read_bytes()[128:132] == b"DICM"
        gray = load_gray(path, 224)
        ref = load_gray(Image.fromarray(v), 224)
        if "rescale" not in name:  # stored values shown as they are: exactly the scan's pixels
            assert np.array_equal(gray, ref), name
        diff = np.abs(gray.astype(float) - ref.astype(float)).mean()
        assert diff < 1.0, (name, diff)


@pytest.mark.parametrize("backend", ["tflite", "onnx"])
def test_dicom_classifies_like_the_jpeg(scan, tmp_path, bundle_dir, backend):
    jpeg, v = scan
    clf = Classifier(model=bundle_dir, backend=backend)
    ref = clf.classify(jpeg)
    paths = [write_dicom(tmp_path / f"{name}.dcm", pixels, **kw) for name, (pixels, kw) in _variants(v).items()]
    for path, result in zip(paths, clf.classify_many(paths)):
        assert result.ok, result
        assert result.label == ref.label, path.name
        for c in CLASS_NAMES:
            assert abs(result.probabilities[c] - ref.probabilities[c]) <= 0.02, (path.name, c)


def test_dicom_without_suffix_in_a_folder_through_cli(scan, tmp_path, bundle_dir):
    _, v = scan
    write_dicom(tmp_path / "IM000001", v.astype(np.uint16) * 257, bits_stored=16)
    (tmp_path / "README").write_text("not a scan, no suffix")
    result = CliRunner().invoke(cli, ["classify", str(tmp_path), "--json", "--model", str(bundle_dir)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["path"].endswith("IM000001") and rows[0]["label"] in CLASS_NAMES


def test_dicom_named_by_uid_or_bare_in_a_folder_through_cli(scan, tmp_path, bundle_dir):
    """PACS exports name files by their UID (the last component reads as a numeric suffix) or write bare data
    sets without the DICM preamble: a folder walk finds both; other numbered files are left out."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    _, v = scan
    small = (v[:400, :360].astype(np.uint16) * 16)
    write_dicom(tmp_path / "1.2.826.0.1.3680043.8.498.1017", small, bits_stored=12)
    ds = pydicom.dcmread(write_dicom(tmp_path / "tmp.dcm", small, bits_stored=12))
    (tmp_path / "tmp.dcm").unlink()
    del ds.file_meta
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = True, True
    write_dataset(buf, ds)
    (tmp_path / "IM0002").write_bytes(buf.getvalue())
    (tmp_path / "log.001").write_text("rotated log file, not a scan")
    result = CliRunner().invoke(cli, ["classify", str(tmp_path), "--json", "--model", str(bundle_dir)])
    assert result.exit_code == 0, result.output
    rows = {Path(r["path"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert set(rows) == {"1.2.826.0.1.3680043.8.498.1017", "IM0002"}
    assert all(r["label"] in CLASS_NAMES for r in rows.values())


def test_dicom_from_bytes(scan, tmp_path):
    _, v = scan
    path = write_dicom(tmp_path / "b.dcm", v, bits_stored=8)
    assert np.array_equal(load_gray(path.read_bytes(), 64), load_gray(path, 64))


def test_multi_frame_is_rejected(scan, tmp_path, bundle_dir):
    """A readable object that is not one radiograph (a cine loop, a series) is refused, not an error."""
    _, v = scan
    small = v[:256, :256]
    path = write_dicom(tmp_path / "cine.dcm", np.stack([small, small]), frames=2)
    with pytest.raises(InputRejected, match="multi-frame"):
        load_gray(path)
    result = CliRunner().invoke(cli, ["classify", str(path), "--json", "--model", str(bundle_dir)])
    assert result.exit_code == 0
    record = json.loads(result.stdout)
    assert record["status"] == "rejected" and "not a single radiograph (multi-frame" in record["reason"]


def test_non_image_object_is_rejected(tmp_path):
    path = write_dicom(tmp_path / "report.dcm", None, sop_class=BASIC_TEXT_SR)
    with pytest.raises(InputRejected, match=r"not an image \(DICOM Basic Text SR"):
        load_gray(path)


def test_dicom_bomb_is_refused_before_decoding(tmp_path):
    path = write_dicom(tmp_path / "bomb.dcm", np.zeros((64, 64), np.uint8))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 30000, 30000  # claims 900 megapixels; the pixel data is 4 KiB
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(PreprocessError, match="too large"):
        load_gray(path)


def test_corrupt_dicom_is_a_preprocess_error(scan, tmp_path):
    _, v = scan
    data = write_dicom(tmp_path / "ok.dcm", v, bits_stored=8).read_bytes()
    for cut in (140, 400, len(data) // 2):
        with pytest.raises(PreprocessError):
            load_gray(data[:cut])


def test_missing_pydicom_says_how_to_install(scan, tmp_path, monkeypatch):
    _, v = scan
    path = write_dicom(tmp_path / "x.dcm", v, bits_stored=8)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    with pytest.raises(PreprocessError, match=r"pip install 'cxr-edge\[dicom\]'"):
        load_gray(path)


# -- refusal by metadata and pixel format (issue 11) ------------------------------------------------------
def _small(scan) -> np.ndarray:
    return np.ascontiguousarray(scan[1][::8, ::8])


@pytest.fixture(scope="module")
def small_clf(bundle_dir):  # no input gate: these small synthetic objects are judged by their tags
    return Classifier(model=bundle_dir, backend="onnx", ood=False)


def _same_record_as_the_scan(clf, path: Path, scan, tmp_path: Path) -> None:
    """The DICOM object is classified with the label and probabilities of the same pixels as a PNG."""
    Image.fromarray(_small(scan)).save(tmp_path / "small.png")
    got, want = clf.classify(path), clf.classify(tmp_path / "small.png")
    assert got.ok and got.label == want.label in CLASS_NAMES and got.probabilities == want.probabilities, (got, want)


@pytest.mark.parametrize("modality", ["CT", "MR", "US", "NM", "PT", "RTDOSE", "XA"])
def test_non_radiograph_modality_is_refused(scan, tmp_path, modality):
    # a CT-like 16-bit slice with a soft-tissue window: refused for what it is, before any windowing
    pixels = (_small(scan).astype(np.uint16) * 8 + 24).astype(np.uint16)
    path = write_dicom(tmp_path / f"{modality}.dcm", pixels, bits_stored=16, Modality=modality,
                       RescaleSlope="1", RescaleIntercept="-1024", WindowCenter="40", WindowWidth="400")
    with pytest.raises(InputRejected, match=rf"^not a radiograph \(Modality {modality}\)$") as info:
        load_gray(path, 64)
    assert info.value.reason == f"not a radiograph (Modality {modality})"


def test_xray_modality_of_another_body_part_is_refused(scan, tmp_path):
    path = write_dicom(tmp_path / "mammo.dcm", _small(scan), Modality="MG")
    with pytest.raises(InputRejected, match=r"^another body part \(Modality MG"):
        load_gray(path, 64)


@pytest.mark.parametrize("modality", ["CR", "DX", "OT", None])
def test_radiograph_or_unknown_modality_goes_on(scan, tmp_path, modality):
    path = write_dicom(tmp_path / "x.dcm", _small(scan), Modality=modality, BodyPartExamined="CHEST",
                       ViewPosition="PA")
    ref = load_gray(Image.fromarray(_small(scan)), 64)
    assert np.abs(load_gray(path, 64).astype(int) - ref.astype(int)).mean() < 1.0


@pytest.mark.parametrize("part,refused", [("HAND", True), ("KNEE", True), ("SKULL", True), ("CHEST", False),
                                          ("THORAX", False), ("ABDOMEN", True), ("", False), (None, False)])
def test_body_part_examined(scan, tmp_path, part, refused, small_clf):
    path = write_dicom(tmp_path / "x.dcm", _small(scan), BodyPartExamined=part)
    if refused:
        with pytest.raises(InputRejected, match=rf"^another body part \(BodyPartExamined {part}\)$"):
            load_gray(path, 64)
    else:  # goes on: the stored 8-bit pixels are the scan's, exactly
        gray = load_gray(path, 64)
        assert gray.shape == (64, 64) and np.array_equal(gray, load_gray(Image.fromarray(_small(scan)), 64)), part
        _same_record_as_the_scan(small_clf, path, scan, tmp_path)


@pytest.mark.parametrize("view,refused", [("LL", True), ("RL", True), ("LATERAL", True), ("PA", False),
                                          ("AP", False), (None, False)])
def test_view_position(scan, tmp_path, view, refused, small_clf):
    path = write_dicom(tmp_path / "x.dcm", _small(scan), BodyPartExamined="CHEST", ViewPosition=view)
    if refused:
        with pytest.raises(InputRejected, match=rf"^lateral view \(ViewPosition {view}\)$"):
            load_gray(path, 64)
    else:  # goes on: the stored 8-bit pixels are the scan's, exactly
        gray = load_gray(path, 64)
        assert gray.shape == (64, 64) and np.array_equal(gray, load_gray(Image.fromarray(_small(scan)), 64)), view
        _same_record_as_the_scan(small_clf, path, scan, tmp_path)


def _palette_dicom(path: Path, modality: str | None) -> Path:
    """An 8-bit PALETTE COLOR image (a colour ultrasound-like frame) with 16-bit palette entries."""
    rng = np.random.default_rng(0)
    index = rng.integers(0, 256, (96, 128)).astype(np.uint8)
    ramp = np.arange(256, dtype=np.uint16)
    luts = {"Red": ramp * 257, "Green": (255 - ramp) * 257, "Blue": ((ramp * 7) % 256) * 257}
    extra = {f"{c}PaletteColorLookupTableDescriptor": [256, 0, 16] for c in luts}
    extra.update({f"{c}PaletteColorLookupTableData": lut.astype("<u2").tobytes() for c, lut in luts.items()})
    return write_dicom(path, index, photometric="PALETTE COLOR", Modality=modality, **extra)


def test_palette_colour_is_refused_or_seen_in_colour(tmp_path):
    with pytest.raises(InputRejected, match=r"^not a radiograph \(Modality US\)$"):
        load_gray(_palette_dicom(tmp_path / "us.dcm", "US"), 64)
    # without a Modality it is decoded through its palette, in colour, so the pixel gate calls it a colour image
    gray, colour = load_gray_colour(_palette_dicom(tmp_path / "palette.dcm", None), 64)
    assert gray.shape == (64, 64) and colour > 0.5


def _dose_dicom(path: Path, modality: str | None, float_pixels: bool = False) -> Path:
    """An RT-dose-like grid: 32-bit unsigned integers (or 32-bit floats), 2 frames."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.2"  # RT Dose Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    if modality:
        ds.Modality = modality
    ds.Rows, ds.Columns, ds.NumberOfFrames = 16, 16, 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = 32
    grid = np.arange(2 * 16 * 16).reshape(2, 16, 16)
    if float_pixels:
        ds.FloatPixelData = grid.astype("<f4").tobytes()
    else:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 31, 0
        ds.DoseGridScaling = "0.0001"
        ds.PixelData = grid.astype("<u4").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("modality,float_pixels,reason", [
    ("RTDOSE", False, r"^not a radiograph \(Modality RTDOSE\)$"),
    (None, False, r"^not a radiograph \(32 bits per pixel"),
    (None, True, r"^not a radiograph \(floating-point pixel data\)$")])
def test_32_bit_and_float_pixels_are_refused(tmp_path, modality, float_pixels, reason):
    path = _dose_dicom(tmp_path / "dose.dcm", modality, float_pixels)
    with pytest.raises(InputRejected, match=reason):
        load_gray(path, 64)


# --- DICOM as other sources write it: compressed, without the preamble --------------------------------------

def _transcode(src: Path, dst: Path, syntax: str) -> Path:
    """``src`` rewritten in a compressed transfer syntax: pydicom's own encoder for RLE, GDCM's (the decoder
    the ``dicom`` extra installs) for JPEG lossless and JPEG-LS, as a PACS export writes them."""
    if syntax == "rle":
        from pydicom.uid import RLELossless

        ds = pydicom.dcmread(src)
        ds.compress(RLELossless)
        ds.save_as(dst, enforce_file_format=True)
        return dst
    gdcm = pytest.importorskip("gdcm")
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax({"jpeg_lossless": gdcm.TransferSyntax.JPEGLosslessProcess14_1,
                                                  "jpeg_ls": gdcm.TransferSyntax.JPEGLSLossless}[syntax]))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    writer.SetFileName(str(dst))
    assert writer.Write()
    return dst


@pytest.mark.parametrize("syntax", ["rle", "jpeg_lossless", "jpeg_ls"])
def test_compressed_dicom_decodes_to_the_same_pixels(scan, tmp_path, syntax):
    """Lossless compression (JPEG lossless SV1 is what most CR/DX archives store) changes nothing."""
    _, v = scan
    plain = write_dicom(tmp_path / "plain.dcm", v.astype(np.uint16) * 16 + 8, bits_stored=12)
    packed = _transcode(plain, tmp_path / f"{syntax}.dcm", syntax)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID != pydicom.dcmread(plain).file_meta.TransferSyntaxUID
    assert np.array_equal(load_gray(packed, 64), load_gray(plain, 64))


@pytest.mark.parametrize("implicit", [True, False])
def test_data_set_without_preamble_is_read(scan, tmp_path, implicit):
    """Older archives hold bare data sets: no 128-byte preamble, no ``DICM``, no file meta."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    _, v = scan
    small = v[:300, :260]
    plain = write_dicom(tmp_path / "plain.dcm", small.astype(np.uint16) * 16, bits_stored=12)
    ds = pydicom.dcmread(plain)
    del ds.file_meta
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = implicit, True
    write_dataset(buf, ds)
    raw = tmp_path / "bare"
    raw.write_bytes(buf.getvalue())
    assert raw.read_bytes()[128:132] != b"DICM"
    assert np.array_equal(load_gray(raw, 64), load_gray(plain, 64))
    ds.Modality = "CT"
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = implicit, True
    write_dataset(buf, ds)
    with pytest.raises(InputRejected, match=r"Modality CT"):
        load_gray(buf.getvalue())


def test_sixteen_bit_colour_goes_to_the_colour_check(tmp_path):
    """A 16-bit RGB secondary capture is read (not an error) and refused as what it is, a colour image."""
    rgb = np.zeros((64, 64, 3), np.uint16)
    rgb[..., 0] = 60000
    rgb[..., 2] = np.arange(64, dtype=np.uint16)[None, :] * 900
    path = write_dicom(tmp_path / "sc.dcm", rgb[..., 0], bits_stored=16, Modality="OT")
    ds = pydicom.dcmread(path)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    gray, chroma = load_gray_colour(path, 64)
    assert chroma > 0.9 and gray.shape == (64, 64)


@pytest.mark.parametrize("width", ["0", "-5"])
def test_invalid_window_falls_back_to_the_full_range(scan, tmp_path, width):
    """A window width below 1 is invalid (PS3.3 C.11.2.1.2): the image is shown over its full range, as
    without a window, instead of failing."""
    _, v = scan
    stored = v[:300, :260].astype(np.uint16) * 16
    plain = write_dicom(tmp_path / "plain.dcm", stored, bits_stored=12)
    odd = write_dicom(tmp_path / "odd.dcm", stored, bits_stored=12, WindowCenter="2000", WindowWidth=width)
    assert np.array_equal(load_gray(odd, 64), load_gray(plain, 64))


def test_values_in_a_small_part_of_the_stored_range_are_not_flattened(scan, tmp_path):
    """Without a window, values filling a small part of what the stored bits hold (Hounsfield-like data after
    a rescale; 12-bit content in a file declaring 16 bits stored) are shown over their own range or depth,
    not as a nearly uniform gray that the gate would call a blank image."""
    _, v = scan
    small = v[:400, :360]
    ref = load_gray(Image.fromarray(small), 64).astype(float)
    hu_like = write_dicom(tmp_path / "hu.dcm", small.astype(np.uint16) * 8, bits_stored=16,
                          RescaleSlope="1", RescaleIntercept="-1024", Modality=None)
    assert np.abs(load_gray(hu_like, 64) - ref).mean() < 1.0
    declared16 = write_dicom(tmp_path / "d16.dcm", small.astype(np.uint16) << 4, bits_stored=16)
    assert np.array_equal(load_gray(declared16, 64), ref.astype(np.uint8))
