"""Read the images of one ``POST /predict`` request, in memory, within the app's limits.

Consumes the request: ``multipart/form-data`` (any number of file fields, e.g. ``files``) or a
raw image body (``image/*`` or ``application/octet-stream``). Produces ``(filename, bytes)``
pairs. The body is read at most ``max_request_bytes`` far (413 past that, or at once when the
Content-Length says so) and never spooled to disk; more than ``max_files`` files is a 400; any
other content type a 415. Errors are HTTPExceptions whose detail names the limit's params key.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncGenerator

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

RAW_TYPES = ("image/", "application/octet-stream")


class _InMemoryMultiPartParser(MultiPartParser):
    # Starlette spools file parts over 1 MB to a temp file; the body is already capped at
    # serve.max_request_bytes and in memory, so keep the parts there too (no disk writes).
    spool_max_size = sys.maxsize


def _too_large(limit: int) -> HTTPException:
    return HTTPException(
        413,
        f"request body is over {limit} bytes (serve.max_request_bytes); send fewer or "
        "smaller images",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or 413 as soon as it is known to pass ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _once(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body


async def _form_files(request: Request, body: bytes, max_files: int) -> list[tuple[str, bytes]]:
    parser = _InMemoryMultiPartParser(
        request.headers, _once(body), max_files=max_files, max_fields=max_files
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise HTTPException(400, f"{exc.message} (serve.max_files is {max_files})") from None
    files = []
    for _, value in form.multi_items():
        if isinstance(value, UploadFile):
            files.append((value.filename or "upload", await value.read()))
    await form.close()
    return files


async def read_images(request: Request, max_bytes: int, max_files: int) -> list[tuple[str, bytes]]:
    """The uploaded images as (filename, bytes). Raises HTTPException 413/415/400."""
    content_type = request.headers.get("content-type", "").lower()
    if not (content_type.startswith("multipart/form-data") or content_type.startswith(RAW_TYPES)):
        raise HTTPException(
            415,
            f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data "
            "with image files, or one image as the body (image/jpeg, image/png, ...)",
        )
    body = await read_body(request, max_bytes)
    if content_type.startswith("multipart/form-data"):
        files = await _form_files(request, body, max_files)
    else:
        files = [(request.headers.get("x-filename", "body"), body)] if body else []
    if not files:
        raise HTTPException(
            400,
            "no image in the request: send one or more files (multipart field `files`) or "
            "the image bytes as the body",
        )
    return files
