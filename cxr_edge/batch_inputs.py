"""What ``cxr-edge batch`` classifies (cxr_edge/batch.py): its SOURCE arguments (files, folders, globs, text files
listing them, ``pyarrow.fs`` URIs) expanded to a sorted, de-duplicated list of ``(path, reason)`` pairs."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

from cxr_edge.classifier import one_line
from cxr_edge.inputs import IMAGE_SUFFIXES, Missing, dicom_style_suffix, expand_inputs

LIST_SUFFIXES = {".txt", ".lst", ".list"}
URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
UNDECODABLE_NAME = ("file name is not UTF-8 text (shown with escapes); the results hold text paths, so rename "
                    "the file or classify it with cxr-edge classify")


def is_uri(text: str) -> bool:
    return bool(URI_RE.match(text))


def _uri_looks_like_image(path: str) -> bool:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    suffix = os.path.splitext(name)[1].lower()
    # names as DICOM files often have are listed without reading them (a request per object): a file that is
    # no image becomes an error row, not a silent skip
    return not name.startswith(".") and (suffix in IMAGE_SUFFIXES or dicom_style_suffix(suffix))


def _list_uri(uri: str) -> list[tuple[str, Optional[str]]]:
    from pyarrow import fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(path)
    except Exception as exc:  # unknown scheme, no credentials, unreachable host...
        return [(uri, f"cannot open ({one_line(exc)})")]
    prefix = uri[: len(uri) - len(path)] if uri.endswith(path) else uri.split("://", 1)[0] + "://"
    if info.type != pafs.FileType.Directory:
        return [(uri, None)]  # a file, or a missing one whose error the worker reports
    try:
        found = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    except Exception as exc:
        return [(uri, f"cannot list ({one_line(exc)})")]
    base = path.rstrip("/")
    names, undecodable = [], 0
    for f in found:
        try:
            names.append((f.path, f.type))
        except UnicodeDecodeError:  # a file name that is not UTF-8: a URI cannot name it
            undecodable += 1
    files = sorted(prefix + p for p, kind in names if kind == pafs.FileType.File and _uri_looks_like_image(p)
                   and not any(part.startswith(".") for part in p[len(base):].split("/")))
    told = [(uri, f"cannot list {undecodable} file name(s) under it that are not UTF-8; give the folder as a "
                  "plain path")] if undecodable else []
    return [(f, None) for f in files] + told or [(uri, "folder holds no image files")]


def _expand(args: Iterable[str], allow_lists: bool = True) -> list[tuple[str, Optional[str]]]:
    out: list[tuple[str, Optional[str]]] = []
    for arg in args:
        if is_uri(arg):
            out.extend(_list_uri(arg))
        elif allow_lists and Path(arg).suffix.lower() in LIST_SUFFIXES and Path(arg).is_file():
            try:
                lines = Path(arg).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                out.append((arg, f"cannot read the list ({one_line(exc)})"))
                continue
            entries = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
            out.extend(_expand(entries, allow_lists=False) if entries else [(arg, "the list names no files")])
        else:
            out.extend((m.path, m.reason) if isinstance(m, Missing) else (m, None) for m in expand_inputs((arg,)))
    return out


def list_inputs(sources: Sequence[str]) -> list[tuple[str, Optional[str]]]:
    """Sorted, de-duplicated ``(path, reason)`` pairs: ``reason`` is ``None`` for a path to classify, or why
    the argument names nothing (an empty folder, a glob that matches nothing), which becomes an error row."""
    seen: dict[str, Optional[str]] = {}
    for path, reason in _expand(sources):
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:  # bytes the file system gave undecoded: a Parquet string cannot hold them
            path, reason = path.encode("utf-8", "backslashreplace").decode("utf-8"), UNDECODABLE_NAME
        if path not in seen or (seen[path] is not None and reason is None):
            seen[path] = reason
    return sorted(seen.items())
