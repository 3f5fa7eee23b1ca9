"""
Keep the robot's exports on disk, so a restarted robot does not run ``torch.export`` again.

Exporting a model for one input signature (``torch.export``, then the
conversion to an :mod:`rrto_wire.program`) costs seconds of CPU on the robot
(ResNet-18: 2.4 s on an idle core, far more on a loaded one), and it is the
same work on every start.  :class:`ExportCache` keeps each
:class:`~rrto_ros.local_model.Artifact` under a key made of everything the
export depends on:

* the weights and buffers (a SHA-256 over names, dtypes, shapes and bytes),
* the module's structure (``repr``) and the source files of every module
  class in it, of the robot-side model class and of the program writer,
* the input signature and nesting, the label,
* the torch version.

Change any of them and the key changes: the model is exported again.  An
entry is a directory of blobs named by their SHA-256 and a ``meta.json``;
every blob is hashed again when it is read (a damaged entry is removed and
the model exported), entries are written to a temporary directory and
renamed into place (a crash leaves no half entry), and the least recently
used entries beyond :data:`MAX_ENTRIES` are removed.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from rrto_ros import local_model
from rrto_ros.local_model import Artifact, TorchModule
from rrto_wire import program as program_format
from rrto_wire import program_writer
from rrto_wire import weights as weights_format
from rrto_wire.program import TensorSpec

log = logging.getLogger('rrto_ros.export_cache')

MAX_ENTRIES = 8                  # least recently used entries beyond this are removed
DEFAULT_DIR = '~/.cache/rrto_ros/exports'


class ExportCache:
    """Artifacts of :class:`~rrto_ros.local_model.TorchModule` models, on disk (module doc)."""

    def __init__(self, directory: str | os.PathLike, max_entries: int = MAX_ENTRIES):
        self.directory = Path(os.path.expanduser(os.fspath(directory)))
        self.max_entries = max_entries

    def artifact(self, local: Any, flat: Sequence[torch.Tensor], in_spec: Any
                 ) -> tuple[Artifact, bool]:
        """Return the model's artifact for these inputs and whether it came from the cache."""
        key = cache_key(local, flat, in_spec) if isinstance(local, TorchModule) else None
        if key is not None:
            artifact = self._load(key)
            if artifact is not None:
                return artifact, True
        artifact = local.artifact(flat, in_spec)
        if key is not None:
            self._store(key, artifact)
        return artifact, False

    # ------------------------------------------------------------------ entries
    def _load(self, key: str) -> Artifact | None:
        entry = self.directory / key
        try:
            meta = json.loads((entry / 'meta.json').read_text())
            blobs = {}
            for digest, kind in meta['blobs'].items():
                data = (entry / digest).read_bytes()
                if program_format.sha256(data) != digest:
                    raise ValueError(f'blob {digest[:12]} does not match its digest')
                blobs[digest] = (kind, data)
            doc = json.loads(blobs[meta['model']][1])
            signature = tuple(TensorSpec.from_json(i) for i in doc['inputs'])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning('export cache entry %s is damaged (%s): exporting again', entry, exc)
            shutil.rmtree(entry, ignore_errors=True)
            return None
        os.utime(entry)   # recently used
        return Artifact(meta['model'], signature, meta['out_spec'], blobs, doc)

    def _store(self, key: str, artifact: Artifact) -> None:
        meta = {'model': artifact.model, 'out_spec': artifact.out_spec,
                'blobs': {digest: kind for digest, (kind, _) in artifact.blobs.items()}}
        try:
            if json.loads(json.dumps(meta['out_spec'])) != artifact.out_spec:
                return   # an output nesting JSON cannot hold exactly: never cached
            self.directory.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix='.new-', dir=self.directory))
            for digest, (_, data) in artifact.blobs.items():
                (staging / digest).write_bytes(data)
            (staging / 'meta.json').write_text(json.dumps(meta))
            try:
                staging.rename(self.directory / key)
            except OSError:   # another process stored the same entry first
                shutil.rmtree(staging, ignore_errors=True)
            self._prune()
        except (OSError, TypeError, ValueError) as exc:
            log.warning('cannot keep the export of %s in %s: %s', artifact.model[:12],
                        self.directory, exc)

    def _prune(self) -> None:
        entries = sorted((p for p in self.directory.iterdir()
                          if p.is_dir() and not p.name.startswith('.')),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[self.max_entries:]:
            shutil.rmtree(old, ignore_errors=True)
        for staging in self.directory.glob('.new-*'):   # left by a crash an hour ago
            if time.time() - staging.stat().st_mtime > 3600:
                shutil.rmtree(staging, ignore_errors=True)


def cache_key(local: TorchModule, flat: Sequence[torch.Tensor], in_spec: Any) -> str | None:
    """Return the key of this model's export for these inputs (None: not cacheable)."""
    module = local.module
    digest = hashlib.sha256()

    def add(*parts: Any) -> None:
        for part in parts:
            data = part if isinstance(part, bytes) else str(part).encode()
            digest.update(len(data).to_bytes(8, 'little') + data)

    add(torch.__version__, local.label, type(local).__module__, type(local).__qualname__,
        repr(module), repr(in_spec))
    add(*(f'{t.dtype}:{tuple(t.shape)}' for t in flat))
    # the exporter, the format and its writer
    files = {local_model.__file__, program_format.__file__, program_writer.__file__,
             weights_format.__file__}
    for cls in {type(m) for m in module.modules()} | {type(local)}:
        try:
            files.add(inspect.getsourcefile(cls))
        except TypeError:   # no source file (a TorchScript class): its code is not keyed
            return None
    for path in sorted(files):
        source = _source_digest(path)
        if source is None:
            return None
        add(path, source)
    try:
        for name, tensor in sorted(module.state_dict().items()):
            tensor = tensor.detach().cpu().contiguous()
            add(name, tensor.dtype, tuple(tensor.shape))
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    except (AttributeError, RuntimeError, TypeError):   # a value that is no plain tensor
        return None
    return digest.hexdigest()


_SOURCES: dict[str, str] = {}


def _source_digest(path: str | None) -> str | None:
    if not path:
        return None
    if path not in _SOURCES:
        try:
            _SOURCES[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError:
            return None
    return _SOURCES[path]
