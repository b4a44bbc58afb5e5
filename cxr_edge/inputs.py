"""What the command line classifies: files, folders (recursively) and glob patterns expanded to paths
(``expand_inputs``, shared by ``cxr-edge classify`` and ``cxr-edge batch``), and paths shown on one line of a
terminal (``shown``)."""
from __future__ import annotations

import glob
import os
from pathlib import Path

from cxr_edge.preprocess import DICOM_MAGIC_OFFSET, has_dicom_magic, looks_like_bare_dicom

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm",
                  ".ppm", ".pnm", ".jp2", ".j2k", ".dcm", ".dicom"}
GLOB_CHARS = set("*?[")


class Missing:
    """An input argument that names nothing to classify (a missing file, an empty glob or folder)."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason


def _looks_like_image(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if not dicom_style_suffix(suffix) or not path.is_file():  # a named pipe is never opened (it would block)
        return False
    try:  # accept those with the DICM magic, or that start as a bare DICOM data set does
        with open(path, "rb") as f:
            head = f.read(DICOM_MAGIC_OFFSET + 4)
    except OSError:
        return False
    return has_dicom_magic(head) or looks_like_bare_dicom(head)


def dicom_style_suffix(suffix: str) -> bool:
    """DICOM files often have no suffix ("IM0001") or are named by their UID ("1.2.840.113619.2.55.3.211",
    whose last part reads as a numeric suffix)."""
    return not suffix or suffix[1:].isdigit()


def _walk(folder: Path) -> list:
    """The image files under ``folder``, and a :class:`Missing` for each folder in it that cannot be read (the
    scans in it would otherwise be left out without a word)."""
    found: list = []
    unreadable: list[Missing] = []

    def tell(exc: OSError) -> None:
        what = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or type(exc).__name__)
        unreadable.append(Missing(str(exc.filename or folder), f"cannot read folder ({what})"))

    for root, dirs, files in os.walk(folder, onerror=tell):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(str(Path(root) / f) for f in sorted(files) if _looks_like_image(Path(root) / f))
    return found + unreadable


def expand_inputs(args: tuple[str, ...]) -> list:
    """Paths (str) to classify, in argument order, and :class:`Missing` for arguments that give none."""
    out: list = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            files = _walk(path)
            out.extend(files or [Missing(arg, "folder holds no image files")])  # an unreadable one says why
        elif path.exists() or not (GLOB_CHARS & set(arg)):
            out.append(arg)  # a file, or a missing path whose error the classifier reports
        else:
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                out.append(Missing(arg, "no files match this pattern"))
            for m in matches:
                out.extend(_walk(Path(m)) if Path(m).is_dir() else [m])
    return out


def shown(path: str) -> str:
    """A path for one line of a terminal: control characters (a line break in a file name) and bytes that
    are not text in the file system's encoding are written as escapes (``\\n``, ``\\udcff``), so that every
    input stays one line; printable characters, non-ASCII letters included, are kept."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(path))
