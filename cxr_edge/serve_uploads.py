"""The uploads of a ``cxr-edge serve`` request (``cxr_edge/serve.py``): multipart field ``file`` (repeatable) or
the raw body, bounded by the upload limit before it is all read and held in memory only (the multipart
parser's spool file never rolls over to disk); each file an :class:`Upload`, bytes that print as the client's
file name."""
from __future__ import annotations

import sys
from typing import Optional

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from cxr_edge.classifier import one_line


class Upload(bytes):
    """An uploaded file's bytes that print as its file name: ``load_gray`` decodes bytes in memory, and the
    Classifier's records (``str(path)``) carry the name the client sent."""

    def __new__(cls, data: bytes, name: str):
        obj = super().__new__(cls, data)
        obj.name = name
        return obj

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Upload({self.name!r}, {len(self)} bytes)"


def clean_name(raw: Optional[str], default: str) -> str:
    """The last component of a client's file name, printable, at most 255 characters."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    return name[:255] or default

class _TooLarge(Exception):
    pass


class _InMemoryParser(MultiPartParser):
    """Starlette's multipart parser with a spool file that never rolls over to disk (the request body is
    already bounded by the upload limit)."""

    spool_max_size = sys.maxsize


async def _bounded(request: Request, limit: int):
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _TooLarge
        yield chunk


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"upload too large: the limit is {limit} bytes ({limit / 2**20:g} MB); "
                              "start the server with a larger --max-upload-mb")


async def read_uploads(request: Request, limit: int, name: Optional[str]) -> list[Upload]:
    """The files of a request: multipart field ``file`` (repeatable) or the raw body."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    ctype = request.headers.get("content-type", "")
    try:
        if ctype.lower().startswith("multipart/form-data"):
            parser = _InMemoryParser(request.headers, _bounded(request, limit), max_files=1000, max_fields=100)
            form = await parser.parse()
            try:
                uploads = []
                for i, value in enumerate(form.getlist("file")):
                    if not isinstance(value, UploadFile):
                        raise HTTPException(400, "multipart field 'file' must be a file upload (with a filename)")
                    value.file.seek(0)
                    uploads.append(Upload(value.file.read(), clean_name(value.filename, f"upload-{i + 1}")))
            finally:
                await form.close()
            if not uploads:
                raise HTTPException(400, "no multipart field 'file' in the request")
            return uploads
        body = b"".join([chunk async for chunk in _bounded(request, limit)])
    except _TooLarge:
        raise _too_large(limit) from None
    except MultiPartException as exc:
        raise HTTPException(400, f"malformed multipart request ({one_line(exc.message)})") from None
    except ClientDisconnect:  # the client went away part-way: nobody reads the answer, no traceback in the log
        raise HTTPException(400, "the client disconnected before the upload was complete") from None
    if not body:
        raise HTTPException(400, "empty request: send the scan as multipart field 'file' or as the raw body")
    return [Upload(body, clean_name(name, "upload"))]
