"""Store integrity and bounds: verified reads, quarantine, kinds, quotas, partial expiry."""

import os
import time

import exploits
import pytest

from rrto_server.models import ModelRegistry
from rrto_server.sandbox import FREE
from rrto_server.store import BlobStore
from rrto_wire.program import sha256
from rrto_wire.errors import ErrorCode, ProtocolError


def _blob(n: int, size: int = 1000) -> bytes:
    """A weights blob of about ``size`` bytes, different for each ``n``."""
    import torch
    from rrto_wire.weights import pack_weights
    return pack_weights({'w': torch.full((size // 4,), float(n))})


def _corrupt(store: BlobStore, digest: str, truncate: bool) -> None:
    path = store.blobs / digest
    data = bytearray(path.read_bytes())
    if truncate:
        data = data[:len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize('truncate', [False, True])
def test_a_damaged_blob_is_quarantined_and_reported_corrupt(tmp_path, truncate):
    store = BlobStore(tmp_path)
    program, weights = exploits.scale_by_weights()
    store.put(sha256(weights), 'weights', weights)
    store.put(sha256(program), 'program', program)
    _corrupt(store, sha256(weights), truncate)
    registry = ModelRegistry(store)
    with pytest.raises(ProtocolError) as err:
        registry.get(sha256(program), FREE)
    assert err.value.code == ErrorCode.BLOB_CORRUPT and sha256(weights) in err.value.message
    assert store.missing([sha256(weights), sha256(program)]) == [sha256(weights)]
    assert (store.quarantine / sha256(weights)).exists() and store.quarantined == 1
    store.put(sha256(weights), 'weights', weights)           # the client uploads it again
    model = registry.get(sha256(program), FREE)
    assert model.program.weights_digest == sha256(weights)


@pytest.mark.parametrize('kind, blob', [
    ('weights', exploits.scale_by_weights()[0]),     # a program uploaded as weights
    ('program', exploits.weights_blob()),            # weights uploaded as a program
    ('onnx', exploits.weights_blob()),
    ('program', b'{"format": "rrto-program"'),
])
def test_a_blob_is_accepted_only_under_the_kind_it_parses_as(tmp_path, kind, blob):
    store = BlobStore(tmp_path)
    with pytest.raises(ProtocolError) as err:
        store.put(sha256(blob), kind, blob)
    assert err.value.code == ErrorCode.BAD_REQUEST
    assert not store.has(sha256(blob)) and not list(store.partial.iterdir())


def test_an_onnx_model_naming_an_external_file_is_refused(tmp_path):
    secret = tmp_path / 'secret.bin'
    secret.write_bytes(b'\x01\x02\x03\x04')
    blob = exploits.onnx_reading(str(secret))
    store = BlobStore(tmp_path / 'store')
    with pytest.raises(ProtocolError, match='external file') as err:
        store.put(sha256(blob), 'onnx', blob)
    assert err.value.code == ErrorCode.UNSAFE_PROGRAM
    benign = exploits.onnx_add_one()
    store.put(sha256(benign), 'onnx', benign)
    assert store.has(sha256(benign))


@pytest.mark.parametrize('op, why', [('ConstantOfShape', 'depends on the values'),
                                     ('Loop', 'control flow')])
def test_an_onnx_model_whose_sizes_follow_an_input_value_is_refused(tmp_path, op, why):
    """The sandbox's zero-filled trial bounds an ONNX model only if no value sets a size."""
    blob = exploits.onnx_size_from_value(op)
    store = BlobStore(tmp_path / 'store')
    with pytest.raises(ProtocolError, match=why) as err:
        store.put(sha256(blob), 'onnx', blob)
    assert err.value.code == ErrorCode.UNSAFE_PROGRAM
    for benign in (exploits.onnx_folds_into(4), exploits.onnx_symbolic_add_one()):
        store.put(sha256(benign), 'onnx', benign)       # constant and shape-derived sizes
        assert store.has(sha256(benign))


def test_the_store_quota_evicts_least_recently_used_unpinned_blobs(tmp_path):
    blobs = [_blob(n, 4000) for n in range(4)]
    size = len(blobs[0])
    store = BlobStore(tmp_path, max_store_bytes=3 * size)
    pinned = {sha256(blobs[0])}
    store.pinned = lambda: pinned
    for blob in blobs[:3]:
        store.put(sha256(blob), 'weights', blob)
        time.sleep(0.02)
    store.read(sha256(blobs[1]))                   # used: blobs[2] is now least recent
    store.put(sha256(blobs[3]), 'weights', blobs[3])
    assert store.missing([sha256(b) for b in blobs]) == [sha256(blobs[2])]
    assert store.evictions == 1 and store.nbytes <= 3 * size
    pinned.update(sha256(b) for b in blobs)
    with pytest.raises(ProtocolError, match='store full') as err:
        store.put(sha256(blobs[2]), 'weights', blobs[2])
    assert err.value.code == ErrorCode.TOO_LARGE


def test_each_key_stores_at_most_its_quota(tmp_path):
    store = BlobStore(tmp_path)
    a, b = _blob(1, 4000), _blob(2, 4000)
    store.put_chunk(sha256(a), 'weights', 'u1', 0, len(a), memoryview(a), 'robot1',
                    len(a) + 100)
    with pytest.raises(ProtocolError, match='quota') as err:
        store.put_chunk(sha256(b), 'weights', 'u2', 0, len(b), memoryview(b), 'robot1',
                        len(a) + 100)
    assert err.value.code == ErrorCode.FORBIDDEN
    store.put_chunk(sha256(b), 'weights', 'u3', 0, len(b), memoryview(b), 'robot2', len(b))
    assert store.owners(sha256(b)) == ['robot2'] and store.owned_bytes('robot1') == len(a)


def test_abandoned_partial_uploads_expire_also_across_restarts(tmp_path):
    blob = _blob(5, 4000)
    store = BlobStore(tmp_path, partial_ttl_s=60)
    assert not store.put_chunk(sha256(blob), 'weights', 'up', 0, len(blob),
                               memoryview(blob)[:100])
    (part,) = store.partial.iterdir()
    assert BlobStore(tmp_path, partial_ttl_s=60).sweep_partial() == 0   # still fresh
    old = time.time() - 120
    os.utime(part, (old, old))
    BlobStore(tmp_path, partial_ttl_s=60)                               # a restart sweeps
    assert not part.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason='mounting a tmpfs needs root')
def test_a_full_disk_refuses_uploads_with_too_large(tmp_path):
    import subprocess
    root = tmp_path / 'tmpfs'
    root.mkdir()
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(root)], check=True)
    try:
        store = BlobStore(root)
        small, big = exploits.inplace_on_intermediate(), _blob(9, 2 << 20)
        with pytest.raises(ProtocolError, match='disk is full') as err:
            store.put(sha256(big), 'weights', big)
        assert err.value.code == ErrorCode.TOO_LARGE and not list(store.partial.iterdir())
        free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
        (root / 'filler').write_bytes(bytes(free))
        with pytest.raises(ProtocolError, match='disk is full'):
            store.put(sha256(small), 'program', small)
        assert not store.has(sha256(small)) and not list(store.blobs.iterdir())
        (root / 'filler').unlink()
        store.put(sha256(small), 'program', small)
        assert store.has(sha256(small))
    finally:
        subprocess.run(['umount', str(root)], check=True)
