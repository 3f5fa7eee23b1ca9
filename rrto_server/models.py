"""
Models the server can run: stored blobs parsed once and kept warm on a device.

No model is parsed for use before :class:`~rrto_server.sandbox.Sandbox` has
run it once in a throwaway process (:meth:`ModelRegistry.vet`); the models the
registry holds are the store's pinned blobs (never evicted by its quota).
An admin's ``evict`` request goes through :meth:`ModelRegistry.evict`.  A model
loaded, and a model let go, settle the heap (:mod:`rrto_wire.heap`).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from rrto_server.lru import LRU
from rrto_server.sandbox import Pay, Sandbox, Verdict
from rrto_server.store import BlobStore
from rrto_wire import heap
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.program import Program
from rrto_wire.weights import distinct_nbytes, load_shards, shared_to
from rrto_wire.tensors import TensorSpec

log = logging.getLogger('rrto_server.models')


class LoadedModel:
    """One stored model: a parsed program (with its weights) or an ONNX file."""

    def __init__(self, digest: str, kind: str, blob: bytearray, store: BlobStore,
                 verdict: Verdict | None = None):
        self.digest = digest
        self.kind = kind
        self.verdict = verdict
        self.program: Program | None = None
        self.onnx_bytes: bytes | None = None
        self._store = store
        self._weights_cpu: dict[str, torch.Tensor] | None = None
        self._on_device: dict[str, dict[str, torch.Tensor]] = {}
        if kind == 'program':
            self.program = Program.parse(blob)
            self.label = self.program.label
        elif kind == 'onnx':
            self.onnx_bytes = bytes(blob)
            self.label = 'onnx'
        else:
            raise ProtocolError(ErrorCode.UNKNOWN_MODEL,
                                f'blob {digest[:12]} is a {kind} blob, not a model')

    def weights(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Return the program's weights on ``device`` (loaded once per device)."""
        key = str(device)
        if key not in self._on_device:
            if self._weights_cpu is None:       # a blob named by several shards: read once
                self._weights_cpu = load_shards(self.program.weight_shards, self._store.read)
            self._on_device[key] = shared_to(self._weights_cpu, device)
        return self._on_device[key]

    @property
    def nbytes(self) -> int:
        """Return the bytes of the weights loaded on devices, a shared tensor once."""
        return sum(distinct_nbytes(weights.values()) for weights in self._on_device.values())

    @property
    def call_bytes(self) -> int:
        """Return the memory one call needed beyond the weights in the sandbox trial."""
        return self.verdict.peak_bytes if self.verdict is not None else 0

    @property
    def blobs(self) -> set[str]:
        """Return the digests of the stored blobs this model is made of."""
        shards = self.program.weight_shards if self.program is not None else []
        return {self.digest} | {digest for digest, _ in shards}


class ModelRegistry:
    """
    Parse stored models on first use; keep at most ``max_models`` loaded (LRU).

    ``sandbox`` None trusts every stored model (tests of the runtime only: a
    server always has one).
    """

    def __init__(self, store: BlobStore, max_models: int = 16, sandbox: Sandbox | None = None):
        self.store = store
        self.max_models = max_models
        self.sandbox = sandbox
        self._loaded: LRU[str, LoadedModel] = LRU(max_items=max_models)
        store.pinned = self.pinned

    def _kind(self, digest: str) -> str:
        kind = self.store.kind(digest)
        if kind is None:
            raise ProtocolError(ErrorCode.UNKNOWN_MODEL,
                                f'model {digest[:12]} is not in the store; upload it')
        if kind not in ('program', 'onnx'):
            raise ProtocolError(ErrorCode.UNKNOWN_MODEL,
                                f'blob {digest[:12]} is a {kind} blob, not a model')
        return kind

    def vet(self, digest: str, signature: Sequence[TensorSpec] | None,
            pay: Pay) -> Verdict | None:
        """
        Check a stored model before first use (blocks for a trial run; call off the I/O thread).

        Raises ``unknown_model``/``blob_corrupt`` when its blobs are absent or damaged,
        ``unsafe_program`` when the sandbox refuses it.  An ONNX model is tried at
        ``signature`` too (its shapes are the recording's, not the model's).  A trial
        is paid for by ``pay`` (:meth:`rrto_server.sandbox.Sandbox.check`).
        """
        kind = self._kind(digest)
        blob = self.store.read(digest)            # verified against its digest
        if kind == 'program':
            for weights, _ in Program.parse(blob).weight_shards:
                if not self.store.has(weights):
                    raise ProtocolError(ErrorCode.UNKNOWN_MODEL,
                                        f'weights {weights[:12]} are not in the store')
                self.store.read(weights)
        if self.sandbox is None:
            return None
        verdict = self.sandbox.check(digest, kind, pay=pay)
        if kind == 'onnx' and signature is not None:
            verdict = self.sandbox.check(digest, kind, [list(s.shape) for s in signature],
                                         pay=pay)
        return verdict

    def get(self, digest: str, pay: Pay) -> LoadedModel:
        """Return the model ``digest``, loaded (vetted first; a trial is paid by ``pay``)."""
        model = self._loaded.get(digest)
        if model is not None:
            return model
        verdict = self.vet(digest, None, pay)
        model = LoadedModel(digest, self._kind(digest), self.store.read(digest), self.store,
                            verdict)
        before = {id(m): m for m in self._loaded.values()}
        self._loaded.put(digest, model)
        after = {id(m) for m in self._loaded.values()}
        gone = [m for key, m in before.items() if key not in after]
        if gone:                    # the least recently used models went (a16 #4: by bytes)
            heap.dropped(nbytes=sum(m.nbytes for m in gone))
        heap.settle('model loaded')     # its program is long-lived: out of full collections
        return model

    def loaded_model(self, digest: str) -> LoadedModel | None:
        """Return the model ``digest`` if it is loaded now (no trial, no load), else None."""
        return self._loaded.get(digest)

    def loaded(self) -> list[LoadedModel]:
        return self._loaded.values()

    def pinned(self) -> set[str]:
        """Return the blobs of the loaded models (the store never evicts these)."""
        return set().union(*(model.blobs for model in self.loaded()))

    def evict(self, digest: str, drop_replays: Callable[[str], int], blobs: bool = True) -> dict:
        """
        Drop the model ``digest`` for every client; return what went (an ``evict`` reply).

        Its replays go (``drop_replays(digest)``: the server's
        ``ReplayCache.remove_model``), its loaded copy goes, and with ``blobs`` its stored blobs
        (program and weights) are deleted, except blobs another stored or loaded
        model is made of (shared weights stay, listed as kept).  A recording of
        the model already running completes; one that starts later finds the
        blobs gone (``unknown_model``) and the client uploads them again.
        Raises ``unknown_model`` when the server holds nothing of ``digest``.
        """
        own = self._blobs_of(digest)
        stored = self.store.has(digest)
        dropped = drop_replays(digest)
        model = self._loaded.pop(digest)
        unloaded = model is not None
        deleted, kept = [], []
        if blobs:
            shared = self._used_by_others(digest)
            for blob in sorted(b for b in own if self.store.has(b)):
                (kept if blob in shared else deleted).append(blob)
            for blob in deleted:
                self.store.remove(blob)
        if not (dropped or unloaded or stored):
            raise ProtocolError(ErrorCode.UNKNOWN_MODEL,
                                f'the server holds nothing of model {digest[:12]}')
        log.info('evicted model %s: %d replays, %d blobs deleted, %d kept (shared)',
                 digest[:12], dropped, len(deleted), len(kept))
        if dropped or unloaded:     # their frozen cycles go now, not at the next load
            heap.dropped(*([model] if unloaded else []))
            del model
            heap.settle('model evicted')
        return {'replays': dropped, 'unloaded': unloaded, 'deleted': deleted, 'kept': kept}

    def _blobs_of(self, digest: str) -> set[str]:
        """Return the blobs model ``digest`` is made of (just itself if it is no program)."""
        model = self._loaded.get(digest)
        if model is not None:
            return model.blobs
        return {digest} | self._shards(digest)

    def _shards(self, digest: str) -> set[str]:
        """Return the weights blobs a stored program names (none if it is not a program)."""
        if self.store.kind(digest) != 'program':
            return set()
        try:
            return {shard for shard, _ in Program.parse(self.store.read(digest)).weight_shards}
        except ProtocolError:          # corrupt (now quarantined) or unreadable: names none
            return set()

    def _used_by_others(self, digest: str) -> set[str]:
        """Return the blobs of every stored or loaded model but ``digest``."""
        used = set().union(*(m.blobs for m in self.loaded() if m.digest != digest))
        for other in self.store.digests():
            if other != digest:
                used |= self._shards(other)
        return used
