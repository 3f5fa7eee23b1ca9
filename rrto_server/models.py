"""Models the server can run: stored blobs parsed once and kept warm on a device."""

from __future__ import annotations


import torch

from rrto_server.lru import LRU
from rrto_server.store import BlobStore
from rrto_wire.errors import ErrorCode, ProtocolError
from rrto_wire.program import Program, unpack_shards


class LoadedModel:
    """One stored model: a parsed program (with its weights) or an ONNX file."""

    def __init__(self, digest: str, kind: str, blob: bytearray, store: BlobStore):
        self.digest = digest
        self.kind = kind
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
            if self._weights_cpu is None:
                shards = self.program.weight_shards
                self._weights_cpu = unpack_shards([(self._store.read(digest), prefix)
                                                   for digest, prefix in shards])
            self._on_device[key] = {k: v.to(device) for k, v in self._weights_cpu.items()}
        return self._on_device[key]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for weights in self._on_device.values() for t in weights.values())


class ModelRegistry:
    """Parse stored models on first use; keep at most ``max_models`` loaded (LRU)."""

    def __init__(self, store: BlobStore, max_models: int = 16):
        self.store = store
        self.max_models = max_models
        self._loaded: LRU[str, LoadedModel] = LRU(max_items=max_models)

    def get(self, digest: str) -> LoadedModel:
        model = self._loaded.get(digest)
        if model is not None:
            return model
        kind = self.store.kind(digest)
        if kind is None:
            raise ProtocolError(ErrorCode.UNKNOWN_MODEL,
                                f'model {digest[:12]} is not in the store; upload it')
        model = LoadedModel(digest, kind, self.store.read(digest), self.store)
        for weights, _ in model.program.weight_shards if model.program is not None else []:
            if not self.store.has(weights):
                raise ProtocolError(ErrorCode.UNKNOWN_MODEL,
                                    f'weights {weights[:12]} are not in the store')
        self._loaded.put(digest, model)
        return model

    def loaded(self) -> list[LoadedModel]:
        return self._loaded.values()
