"""
Content-addressed blob store on disk: models survive server restarts.

Layout under the store root::

    blobs/<sha256>         the blob's bytes, written once, never modified
    blobs/<sha256>.json    {"kind": ..., "size": ..., "stored": unix time}
    partial/<sha256>.<upload id>   an upload in progress (chunks appended in order)

A blob is visible only after its digest has been verified and it has been
renamed into place, so a crash mid-upload never leaves a corrupt model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path

from rrto_wire.errors import ErrorCode, ProtocolError

KINDS = ('program', 'weights', 'onnx')
DEFAULT_MAX_BLOB_BYTES = 4 << 30
_DIGEST = re.compile(r'^[0-9a-f]{64}$')
_UPLOAD_ID = re.compile(r'^[0-9A-Za-z_-]{1,64}$')


def check_digest(digest: object) -> str:
    """Return ``digest`` if it is a lowercase hex SHA-256, else raise ProtocolError."""
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f'{digest!r} is not a hex SHA-256 digest')
    return digest


class BlobStore:
    """Blobs keyed by the SHA-256 of their content."""

    def __init__(self, root: str | os.PathLike, max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES):
        self.root = Path(root)
        self.blobs = self.root / 'blobs'
        self.partial = self.root / 'partial'
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(parents=True, exist_ok=True)
        self.max_blob_bytes = max_blob_bytes
        self._lock = threading.Lock()

    def has(self, digest: str) -> bool:
        return (self.blobs / check_digest(digest)).is_file()

    def missing(self, digests: list) -> list[str]:
        """Return the digests in ``digests`` that the store lacks."""
        return [d for d in digests if not self.has(d)]

    def kind(self, digest: str) -> str | None:
        meta = self.blobs / f'{check_digest(digest)}.json'
        try:
            return json.loads(meta.read_text())['kind']
        except (OSError, ValueError, KeyError):
            return None

    def read(self, digest: str) -> bytearray:
        """Return a blob's bytes (writable, so tensors can view them without copies)."""
        path = self.blobs / check_digest(digest)
        try:
            with open(path, 'rb') as f:
                data = bytearray(os.fstat(f.fileno()).st_size)
                f.readinto(data)
            return data
        except FileNotFoundError:
            raise ProtocolError(
                ErrorCode.UNKNOWN_MODEL,
                f'blob {digest} is not in the store') from None

    def put_chunk(self, digest: str, kind: str, upload_id: str, offset: int, total: int,
                  chunk: memoryview) -> bool:
        """Append one chunk of an upload; return True once the blob is complete and verified."""
        check_digest(digest)
        if kind not in KINDS:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f'blob kind must be one of {KINDS}')
        if not isinstance(upload_id, str) or not _UPLOAD_ID.match(upload_id):
            raise ProtocolError(ErrorCode.BAD_REQUEST, 'upload id must be 1-64 [0-9A-Za-z_-]')
        if not isinstance(total, int) or not 0 < total <= self.max_blob_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE,
                                f'blob size {total!r} outside 1..{self.max_blob_bytes} bytes')
        if self.has(digest):
            return True
        part = self.partial / f'{digest}.{upload_id}'
        size = part.stat().st_size if part.exists() else 0
        if offset != size and offset != 0:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f'upload of {digest[:12]} expected offset {size}, got {offset}')
        if offset + len(chunk) > total:
            raise ProtocolError(ErrorCode.BAD_REQUEST, 'chunk runs past the declared blob size')
        with open(part, 'r+b' if offset else 'wb') as f:
            f.seek(offset)
            f.write(chunk)
            f.truncate()
        if offset + len(chunk) < total:
            return False
        return self._commit(part, digest, kind, total)

    def _commit(self, part: Path, digest: str, kind: str, total: int) -> bool:
        h = hashlib.sha256()
        with open(part, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                h.update(block)
        if h.hexdigest() != digest:
            part.unlink(missing_ok=True)
            raise ProtocolError(ErrorCode.DIGEST,
                                f'uploaded bytes hash to {h.hexdigest()}, not {digest}')
        with self._lock:
            meta = {'kind': kind, 'size': total, 'stored': time.time()}
            (self.blobs / f'{digest}.json').write_text(json.dumps(meta))
            os.replace(part, self.blobs / digest)
        return True

    def put(self, digest: str, kind: str, data: bytes) -> None:
        """Store a whole blob at once (used by tests and by tools that seed a store)."""
        self.put_chunk(digest, kind, 'local', 0, len(data), memoryview(data))

    def digests(self) -> list[str]:
        return sorted(p.name for p in self.blobs.iterdir() if _DIGEST.match(p.name))
