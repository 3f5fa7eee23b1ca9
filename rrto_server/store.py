"""
Content-addressed blob store on disk: models survive server restarts.

Layout under the store root::

    blobs/<sha256>         the blob's bytes, written once, never modified
    blobs/<sha256>.json    {"kind", "size", "stored", "owners": [key ids]}
    partial/<sha256>.<upload id>   an upload in progress (chunks appended in order)
    quarantine/<sha256>    a blob that failed its digest check when read back

A blob is visible only after its digest has been verified, its contents have
parsed as the kind it was uploaded as (:mod:`rrto_server.blob_kinds`), and it
has been renamed into place, so a crash mid-upload never leaves a corrupt
model.  Every read hashes the bytes again: a blob flipped or truncated on disk
is moved to ``quarantine/`` and the reader gets ``blob_corrupt``, which tells
the client to upload it again.

The store is bounded: ``max_store_bytes`` evicts the least recently used
blobs that are not pinned (``pinned()``: blobs of loaded models) before a new
upload is accepted, each key may own at most its quota, and partial uploads
idle for ``partial_ttl_s`` are deleted (also those left by an earlier run).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable

from rrto_server.blob_kinds import KINDS, check_kind
from rrto_wire.errors import ErrorCode, ProtocolError

log = logging.getLogger('rrto_server.store')

DEFAULT_MAX_BLOB_BYTES = 4 << 30
DEFAULT_MAX_STORE_BYTES = 32 << 30
DEFAULT_PARTIAL_TTL_S = 3600.0
SWEEP_INTERVAL_S = 60.0
MAX_UPLOADS = 256               # partial uploads in progress at once, each reserving its total
_DIGEST = re.compile(r'^[0-9a-f]{64}$')
_UPLOAD_ID = re.compile(r'^[0-9A-Za-z_-]{1,64}$')


def check_digest(digest: object) -> str:
    """Return ``digest`` if it is a lowercase hex SHA-256, else raise ProtocolError."""
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f'{str(digest)[:80]!r} is not a hex SHA-256 digest')
    return digest


@contextlib.contextmanager
def _disk_full_refused(part: Path):
    """Turn a full disk into a ``too_large`` refusal of the upload (its partial file goes)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        part.unlink(missing_ok=True)
        raise ProtocolError(ErrorCode.TOO_LARGE, "the server's store disk is full") from None


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


class BlobStore:
    """Blobs keyed by the SHA-256 of their content, verified on every read."""

    def __init__(self, root: str | os.PathLike, max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
                 max_store_bytes: int = DEFAULT_MAX_STORE_BYTES,
                 partial_ttl_s: float = DEFAULT_PARTIAL_TTL_S):
        self.root = Path(root)
        self.blobs = self.root / 'blobs'
        self.partial = self.root / 'partial'
        self.quarantine = self.root / 'quarantine'
        for folder in (self.blobs, self.partial, self.quarantine):
            folder.mkdir(parents=True, exist_ok=True)
        self.max_blob_bytes = max_blob_bytes
        self.max_store_bytes = max_store_bytes
        self.partial_ttl_s = partial_ttl_s
        self.pinned: Callable[[], set[str]] = set
        self.evictions = 0
        self.quarantined = 0
        self._lock = threading.Lock()
        self._uploads: dict[str, tuple[int, str | None]] = {}   # part name: (total, owner)
        self._swept = 0.0
        self.sweep_partial()

    # ------------------------------------------------------------------ queries
    def has(self, digest: str) -> bool:
        return (self.blobs / check_digest(digest)).is_file()

    def missing(self, digests: list) -> list[str]:
        """Return the digests in ``digests`` that the store lacks."""
        return [d for d in digests if not self.has(d)]

    def _meta(self, digest: str) -> dict | None:
        try:
            meta = json.loads((self.blobs / f'{check_digest(digest)}.json').read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def kind(self, digest: str) -> str | None:
        meta = self._meta(digest)
        return meta.get('kind') if meta else None

    def owners(self, digest: str) -> list[str]:
        """Return the key ids that uploaded ``digest`` (empty for an unauthenticated store)."""
        meta = self._meta(digest)
        return list(meta.get('owners', [])) if meta else []

    def digests(self) -> list[str]:
        return sorted(p.name for p in self.blobs.iterdir() if _DIGEST.match(p.name))

    def _sizes(self) -> dict[str, int]:
        sizes = {}
        for digest in self.digests():
            try:
                sizes[digest] = (self.blobs / digest).stat().st_size
            except FileNotFoundError:
                pass
        return sizes

    @property
    def nbytes(self) -> int:
        """Return the bytes of all complete blobs."""
        return sum(self._sizes().values())

    def owned_bytes(self, owner: str) -> int:
        """Return the bytes of the blobs ``owner`` uploaded (each owner pays in full)."""
        return sum(size for digest, size in self._sizes().items()
                   if owner in self.owners(digest))

    # ------------------------------------------------------------------ reads
    def read(self, digest: str) -> bytearray:
        """
        Return a blob's bytes (writable, so tensors can view them without copies).

        Raises ``unknown_model`` if the blob is absent and ``blob_corrupt`` if its
        bytes no longer hash to ``digest`` (the blob is quarantined: upload it again).
        """
        path = self.blobs / check_digest(digest)
        try:
            with open(path, 'rb') as f:
                data = bytearray(os.fstat(f.fileno()).st_size)
                f.readinto(data)
        except FileNotFoundError:
            raise ProtocolError(ErrorCode.UNKNOWN_MODEL,
                                f'blob {digest} is not in the store') from None
        if hashlib.sha256(data).hexdigest() != digest:
            self._quarantine(digest)
            raise ProtocolError(ErrorCode.BLOB_CORRUPT,
                                f'stored blob {digest} failed its digest check; upload it again')
        try:
            os.utime(path)          # its mtime is its last use: least recently used goes first
        except OSError:
            pass
        return data

    def _quarantine(self, digest: str) -> None:
        log.error('blob %s failed its digest check on read; quarantined', digest[:12])
        with self._lock:
            try:
                os.replace(self.blobs / digest, self.quarantine / digest)
            except FileNotFoundError:
                return
            (self.blobs / f'{digest}.json').unlink(missing_ok=True)
            self.quarantined += 1

    # ------------------------------------------------------------------ uploads
    def put_chunk(self, digest: str, kind: str, upload_id: str, offset: int, total: int,
                  chunk: memoryview, owner: str | None = None,
                  owner_quota: int | None = None) -> bool:
        """
        Append one chunk of an upload; return True once the blob is complete and verified.

        ``owner`` (a key id) is recorded with the blob; ``owner_quota`` bounds the
        bytes that owner's blobs may take, this upload included.  An upload
        reserves its ``total`` (fixed by its first chunk) from its first chunk
        until it is committed, refused or expired, in the store's quota and its
        owner's; the store evicts blobs only to commit one.  A key becomes an
        owner of a blob the store holds already only by uploading all its bytes.
        """
        check_digest(digest)
        if kind not in KINDS:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f'blob kind must be one of {KINDS}')
        if not isinstance(upload_id, str) or not _UPLOAD_ID.match(upload_id):
            raise ProtocolError(ErrorCode.BAD_REQUEST, 'upload id must be 1-64 [0-9A-Za-z_-]')
        if type(total) is not int or not 0 < total <= self.max_blob_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE,
                                f'blob size {str(total)[:40]} outside 1..{self.max_blob_bytes}')
        if type(offset) is not int or offset < 0:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'offset' must be a non-negative integer")
        if self.has(digest) and (owner is None or owner in self.owners(digest)):
            return True
        self._maybe_sweep()
        part = self.partial / f'{digest}.{upload_id}'
        size = part.stat().st_size if part.exists() else 0
        if offset != size and offset != 0:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f'upload of {digest[:12]} expected offset {size}, got {offset}')
        if offset + len(chunk) > total:
            raise ProtocolError(ErrorCode.BAD_REQUEST, 'chunk runs past the declared blob size')
        with self._lock:
            reserved = self._uploads.get(part.name)
        if offset and reserved is not None and reserved[0] != total:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f'upload of {digest[:12]} declared {reserved[0]} bytes in its '
                                f'first chunk, now {total}')
        if offset == 0 or reserved is None:        # (a part file that outlived a restart)
            self._admit(part.name, total, owner, owner_quota)
        done = False
        try:
            with _disk_full_refused(part):
                with open(part, 'r+b' if offset else 'wb') as f:
                    f.seek(offset)
                    f.write(chunk)
                    f.truncate()
                if offset + len(chunk) < total:
                    return False
                done = True
                return self._commit(part, digest, kind, total, owner)
        except BaseException:
            done = True
            raise
        finally:
            if done:
                with self._lock:
                    self._uploads.pop(part.name, None)

    def _reserved(self, owner: str | None = None, exclude: str | None = None) -> int:
        """Bytes reserved by uploads in progress (``owner``'s only if given; under the lock)."""
        if owner is not None:
            return sum(total for total, who in self._uploads.values() if who == owner)
        reserved = sum(total for name, (total, _) in self._uploads.items() if name != exclude)
        for part in self.partial.iterdir():        # part files of uploads before a restart
            if part.name not in self._uploads and part.name != exclude:
                with contextlib.suppress(FileNotFoundError):
                    reserved += part.stat().st_size
        return reserved

    def _admit(self, name: str, total: int, owner: str | None,
               owner_quota: int | None) -> None:
        """Reserve ``total`` bytes for upload ``name``, or refuse it (quota, full store)."""
        with self._lock:
            self._uploads.pop(name, None)        # an upload restarted from offset 0
            if len(self._uploads) >= MAX_UPLOADS:
                raise ProtocolError(ErrorCode.OVERLOADED,
                                    f'{MAX_UPLOADS} uploads in progress; try again later')
            if owner is not None and owner_quota is not None:
                used = self.owned_bytes(owner) + self._reserved(owner)
                if used + total > owner_quota:
                    raise ProtocolError(
                        ErrorCode.FORBIDDEN,
                        f'upload of {total} bytes exceeds this key\'s store quota '
                        f'({used} of {owner_quota} bytes used or reserved)')
            pinned = set(self.pinned())
            fixed = sum(size for digest, size in self._sizes().items() if digest in pinned)
            reserved = self._reserved()
            if fixed + reserved + total > self.max_store_bytes:
                raise ProtocolError(
                    ErrorCode.TOO_LARGE,
                    f'store full: {fixed} bytes in use by loaded models and {reserved} '
                    f'reserved by uploads, quota {self.max_store_bytes}; a blob of {total} '
                    f'bytes does not fit')
            self._uploads[name] = (total, owner)

    def make_room(self, nbytes: int, upload: str | None = None) -> None:
        """
        Evict unpinned blobs, least recently used first, until ``nbytes`` more fit.

        Uploads in progress count with what they reserved, except ``upload``
        (the one whose ``nbytes`` are being committed).
        """
        with self._lock:
            sizes = self._sizes()
            used = sum(sizes.values()) + self._reserved(exclude=upload)
            if used + nbytes <= self.max_store_bytes:
                return
            pinned = set(self.pinned())
            victims = sorted((d for d in sizes if d not in pinned),
                             key=lambda d: self._mtime(d))
            for digest in victims:
                if used + nbytes <= self.max_store_bytes:
                    break
                self._remove(digest)
                used -= sizes[digest]
                self.evictions += 1
                log.info('store quota: evicted blob %s (%d bytes)', digest[:12], sizes[digest])
            if used + nbytes > self.max_store_bytes:
                raise ProtocolError(
                    ErrorCode.TOO_LARGE,
                    f'store full: {used} bytes in use by loaded models and uploads, quota '
                    f'{self.max_store_bytes}; a blob of {nbytes} bytes does not fit')

    def _mtime(self, digest: str) -> float:
        try:
            return (self.blobs / digest).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def remove(self, digest: str) -> None:
        """Delete a complete blob (an admin's eviction); absent blobs are ignored."""
        with self._lock:
            self._remove(check_digest(digest))

    def _remove(self, digest: str) -> None:
        (self.blobs / f'{digest}.json').unlink(missing_ok=True)
        (self.blobs / digest).unlink(missing_ok=True)

    def _add_owner(self, digest: str, owner: str | None) -> None:
        if owner is None:
            return
        with self._lock:
            meta = self._meta(digest)
            if meta is None or owner in meta.get('owners', []):
                return
            meta['owners'] = list(meta.get('owners', [])) + [owner]
            (self.blobs / f'{digest}.json').write_text(json.dumps(meta))

    def _commit(self, part: Path, digest: str, kind: str, total: int,
                owner: str | None) -> bool:
        try:
            actual = _hash_file(part)
            if actual != digest:
                raise ProtocolError(ErrorCode.DIGEST,
                                    f'uploaded bytes hash to {actual}, not {digest}')
            check_kind(kind, bytearray(part.read_bytes()))
        except BaseException:
            part.unlink(missing_ok=True)         # whatever refused the blob, no part is left
            raise
        if self.has(digest):                     # a new owner proved it has the bytes
            part.unlink(missing_ok=True)
            self._add_owner(digest, owner)
            return True
        try:
            self.make_room(total, upload=part.name)
        except ProtocolError:
            part.unlink(missing_ok=True)
            raise
        with self._lock:
            meta = {'kind': kind, 'size': total, 'stored': time.time(),
                    'owners': [owner] if owner is not None else []}
            try:
                (self.blobs / f'{digest}.json').write_text(json.dumps(meta))
            except OSError:
                (self.blobs / f'{digest}.json').unlink(missing_ok=True)
                raise
            os.replace(part, self.blobs / digest)
        return True

    def put(self, digest: str, kind: str, data: bytes) -> None:
        """Store a whole blob at once (used by tests and by tools that seed a store)."""
        self.put_chunk(digest, kind, 'local', 0, len(data), memoryview(data))

    # ------------------------------------------------------------------ partial uploads
    def _maybe_sweep(self) -> None:
        if time.monotonic() - self._swept > SWEEP_INTERVAL_S:
            self.sweep_partial()

    def sweep_partial(self) -> int:
        """Delete partial uploads idle for ``partial_ttl_s``; return how many went."""
        self._swept = time.monotonic()
        cutoff, removed = time.time() - self.partial_ttl_s, 0
        for part in self.partial.iterdir():
            try:
                if part.stat().st_mtime < cutoff:
                    part.unlink()
                    removed += 1
                    with self._lock:
                        self._uploads.pop(part.name, None)
            except FileNotFoundError:
                pass
        if removed:
            log.info('removed %d abandoned partial uploads', removed)
        return removed
