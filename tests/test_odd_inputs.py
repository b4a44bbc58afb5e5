"""Files as other sites write them, found by an audit of encodings (2026-12-06): TIFFs stored on their side or
white-is-zero at 16 bits, DICOM cut short inside compressed pixel data, padded DICOM borders, free-text
BodyPartExamined and the retired Modality DR, and 12-bit JPEG DICOM. Each file is made here from a shipped scan
and must show that scan (or fail with the project's own one-line error)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, TiffImagePlugin

pytest.importorskip("pydicom")

from test_dicom import _same_record_as_the_scan, _small, _transcode, scan, small_clf, write_dicom  # noqa: E402,F401
from _runtime_fixtures import bundle_dir  # noqa: E402,F401  (fixture)
from cxr_edge.cli import cli  # noqa: E402
from cxr_edge.preprocess import InputRejected, PreprocessError, load_gray  # noqa: E402

SIZE = 64


def _ref(v: np.ndarray) -> np.ndarray:
    return load_gray(Image.fromarray(v), SIZE).astype(int)


TURNED = {5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_270}  # stored this way, the Orientation tag says how to turn it back


@pytest.mark.parametrize("orientation", sorted(TURNED))
@pytest.mark.parametrize("bits", [8, 16])
def test_uncompressed_tiff_stored_on_its_side(scan, tmp_path, orientation, bits):
    """An uncompressed TIFF with Orientation 5 to 8, read from a path (where Pillow 13 memory-maps it at its
    turned size and garbled the film, which the gate then refused as another body part), shows the scan."""
    v = np.ascontiguousarray(scan[1][:, : scan[1].shape[0] * 3 // 4])  # taller than wide: a turn shows
    stored = v if bits == 8 else v.astype(np.uint16) * 16
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd[274] = orientation
    path = tmp_path / f"o{orientation}-{bits}.tif"
    Image.fromarray(stored).transpose(TURNED[orientation]).save(path, tiffinfo=ifd)
    assert np.array_equal(load_gray(path, SIZE).astype(int), _ref(v))
    assert np.array_equal(load_gray(path.read_bytes(), SIZE).astype(int), _ref(v))  # from bytes, as the service


def test_sixteen_bit_white_is_zero_tiff(scan, tmp_path):
    """A 16-bit TIFF with Photometric Interpretation WhiteIsZero (a MONOCHROME1 export) is shown with bone
    bright, as Pillow already shows 8-bit ones; it was refused as an inverted image."""
    tifffile = pytest.importorskip("tifffile")
    v = _small(scan)
    path = tmp_path / "white-is-zero.tif"
    tifffile.imwrite(path, (4095 - v.astype(np.uint16) * 16).astype(np.uint16), photometric="miniswhite")
    with Image.open(path) as img:
        assert img.mode.startswith("I;16") and img.tag_v2.get(262) == 0  # really such a file
    assert np.abs(load_gray(path, SIZE).astype(int) - _ref(v)).mean() < 1.0


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_compressed_dicom_is_an_error(scan, tmp_path, keep):
    """pydicom returns an empty data set for a file cut inside encapsulated pixel data; that was refused as
    "not an image (... without pixel data)", exit status 0. Now it is an error that says the file is cut."""
    plain = write_dicom(tmp_path / "plain.dcm", _small(scan).astype(np.uint16) * 16, bits_stored=12)
    data = _transcode(plain, tmp_path / "rle.dcm", "rle").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(PreprocessError, match=r"^truncated DICOM file") as info:
        load_gray(cut, SIZE)
    assert not isinstance(info.value, InputRejected)


def test_dicom_marker_alone_is_an_error(tmp_path):
    path = tmp_path / "marker.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM")
    with pytest.raises(PreprocessError, match=r"^empty DICOM file") as info:
        load_gray(path, SIZE)
    assert not isinstance(info.value, InputRejected)


@pytest.mark.parametrize("photometric,pad_value,range_limit", [
    ("MONOCHROME2", 4095, None), ("MONOCHROME1", 0, None), ("MONOCHROME2", 65535, None),
    ("MONOCHROME2", 4000, 4095)])
def test_pixel_padding_is_black_and_outside_the_range(scan, tmp_path, photometric, pad_value, range_limit):
    """Pixels that Pixel Padding Value marks (a detector's area outside the patient) are shown black, whatever
    the photometric interpretation, and do not set the display range: 12-bit data padded with 65535 is not
    shown 16 times too dark. Against the same film with a black border."""
    v = _small(scan).astype(np.uint16) * 16
    border = np.zeros(v.shape, bool)
    border[:6], border[-6:], border[:, :6], border[:, -6:] = True, True, True, True
    stored = (4095 - v) if photometric == "MONOCHROME1" else v.copy()
    stored[border] = pad_value
    tags = {"PixelPaddingValue": pad_value}
    if range_limit is not None:
        tags["PixelPaddingRangeLimit"] = range_limit
    path = write_dicom(tmp_path / "padded.dcm", stored, photometric=photometric, bits_stored=16, **tags)
    want = (v >> 4).astype(np.uint8)
    want[border] = 0
    assert np.abs(load_gray(path, SIZE).astype(int) - _ref(want)).mean() < 1.0


@pytest.mark.parametrize("part", ["TORAX", "TÓRAX", "BRUSTKORB", "PECHO", "CXR", "CHEST_PA", "PA CHEST",
                                  "SITE-CODE 17", "CHEST ABDOMEN"])
def test_body_part_in_free_text_goes_on(scan, tmp_path, small_clf, part):
    """BodyPartExamined is free text in practice: a value that names no other body part goes on to the image
    gate (it was refused as "another body part (BodyPartExamined TORAX)")."""
    _same_record_as_the_scan(small_clf, write_dicom(tmp_path / "x.dcm", _small(scan), BodyPartExamined=part),
                             scan, tmp_path)


@pytest.mark.parametrize("part", ["L SPINE", "LSPINE", "ABDOMENPELVIS", "KNEE LEFT", "HAND_R", "PELVIS"])
def test_another_named_body_part_is_refused(scan, tmp_path, part):
    path = write_dicom(tmp_path / "x.dcm", _small(scan), BodyPartExamined=part)
    with pytest.raises(InputRejected, match=rf"^another body part \(BodyPartExamined {part}\)$"):
        load_gray(path, SIZE)


def test_retired_modality_dr_goes_on(scan, tmp_path, small_clf):
    """DR (digital radiography's retired code) is what older units still send: a radiograph, not refused."""
    path = write_dicom(tmp_path / "dr.dcm", _small(scan), Modality="DR", BodyPartExamined="CHEST")
    _same_record_as_the_scan(small_clf, path, scan, tmp_path)


def test_twelve_bit_jpeg_dicom_says_what_it_needs(scan, tmp_path, bundle_dir):
    """12-bit JPEG (JPEG Extended): no installed pydicom plugin decodes it (GDCM's refuses, Pillow reads 8
    bits): one error that names the syntax and what reads it, not a list of every plugin's failure."""
    gdcm = pytest.importorskip("gdcm")
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGExtended12Bit

    if set(get_decoder(JPEGExtended12Bit).available_plugins) - {"gdcm", "pillow"}:
        pytest.skip("a plugin that reads 12-bit JPEG is installed here")
    plain = write_dicom(tmp_path / "plain.dcm", _small(scan).astype(np.uint16) * 16 + 8, bits_stored=12)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(plain))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGExtendedProcess2_4))
    codec = gdcm.JPEGCodec()
    codec.SetLossless(False)
    change.SetUserCodec(codec)
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    writer.SetFileName(str(tmp_path / "jpeg12.dcm"))
    assert writer.Write()
    with pytest.raises(PreprocessError, match=r"^DICOM 12-bit JPEG \(JPEG Extended, 1\.2\.840\.10008\.1\.2\.4\.51\) "
                                              r"cannot be decoded here: .*pylibjpeg"):
        load_gray(tmp_path / "jpeg12.dcm", SIZE)
    result = CliRunner().invoke(cli, ["classify", str(tmp_path / "jpeg12.dcm"), "--json", "--model", str(bundle_dir)])
    row = json.loads(result.stdout)
    assert result.exit_code == 1 and "12-bit JPEG" in row["error"] and "label" not in row, result.output


def test_truncation_is_told_from_the_file_in_any_thread(scan, tmp_path):
    """The check reads the file, not pydicom's warnings (process-wide: a warning of one thread's file was
    counted against another's): many threads, a whole and a cut file, each always judged by itself."""
    import threading

    whole = write_dicom(tmp_path / "plain.dcm", _small(scan).astype(np.uint16) * 16, bits_stored=12)
    data = _transcode(whole, tmp_path / "rle.dcm", "rle").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2])
    want, wrong = load_gray(whole, SIZE), []

    def run(path, good):
        for _ in range(40):
            try:
                ok = np.array_equal(load_gray(path, SIZE), want)
            except PreprocessError as exc:
                ok = not good and str(exc).startswith("truncated DICOM file")
            if not ok:
                wrong.append(path.name)

    threads = [threading.Thread(target=run, args=(p, g)) for p, g in ((whole, True), (cut, False)) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
