"""The robot's exports kept on disk: a restart does not run torch.export again, ever wrongly."""

import pytest
import torch

from rrto_ros.export_cache import cache_key, ExportCache
from rrto_ros.local_model import TorchModule
from rrto_wire import treespec


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.norm = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return {'features': self.norm(self.conv(x)).relu(), 'mean': x.mean()}


def _inputs(shape=(1, 3, 16, 16)):
    return treespec.flatten(((torch.randn(shape),), {}))


def test_a_second_cache_on_the_same_directory_reads_the_export(tmp_path, monkeypatch):
    flat, spec = _inputs()
    first, cached = ExportCache(tmp_path).artifact(TorchModule(Small()), flat, spec)
    assert not cached
    monkeypatch.setattr(torch.export, 'export', None)   # a restarted robot must not export
    again, cached = ExportCache(tmp_path).artifact(TorchModule(Small()), flat, spec)
    assert cached
    assert again.model == first.model and again.blobs == first.blobs
    assert again.out_spec == first.out_spec and again.signature == first.signature
    assert again.program == first.program


@pytest.mark.parametrize('change', ['weights', 'buffer', 'shape', 'dtype', 'label', 'nesting'])
def test_anything_the_export_depends_on_changes_the_key(change):
    module, flat, spec = Small(), *_inputs()
    label = 'Small'
    key = cache_key(TorchModule(module, label), flat, spec)
    if change == 'weights':
        with torch.no_grad():
            module.conv.weight[0, 0, 0, 0] += 1e-6
    elif change == 'buffer':
        module.norm.running_mean[0] = 0.5
    elif change == 'shape':
        flat, spec = _inputs((1, 3, 17, 16))
    elif change == 'dtype':
        flat = [flat[0].double()]
    elif change == 'label':
        label = 'Other'
    else:
        flat, spec = treespec.flatten((((flat[0],),), {}))
    assert cache_key(TorchModule(module, label), flat, spec) != key


def test_a_damaged_entry_is_removed_and_the_model_exported_again(tmp_path):
    flat, spec = _inputs()
    first, _ = ExportCache(tmp_path).artifact(TorchModule(Small()), flat, spec)
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    weights = next(d for d, (kind, _) in first.blobs.items() if kind == 'weights')
    data = bytearray((entry / weights).read_bytes())
    data[-1] ^= 0xFF
    (entry / weights).write_bytes(bytes(data))
    again, cached = ExportCache(tmp_path).artifact(TorchModule(Small()), flat, spec)
    assert not cached and again.blobs == first.blobs
    _, cached = ExportCache(tmp_path).artifact(TorchModule(Small()), flat, spec)
    assert cached   # stored again, whole


def test_old_entries_beyond_the_limit_are_removed(tmp_path):
    cache = ExportCache(tmp_path, max_entries=2)
    for size in (10, 11, 12):
        cache.artifact(TorchModule(Small()), *_inputs((1, 3, size, size)))
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_a_restarted_engine_on_a_warm_store_does_not_export(tmp_path, server_process,
                                                            offloaded, monkeypatch):
    server = server_process(tmp_path / 'store')
    x = torch.randn(1, 3, 16, 16)
    robot = offloaded(Small(), server.endpoint, timeout_ms=5000,
                      export_cache=tmp_path / 'exports')
    assert robot.warmup(x)
    assert robot.stats()['exports'] == 1 and robot.stats()['cached_exports'] == 0
    robot.close()
    monkeypatch.setattr(torch.export, 'export', None)   # the restart must not export
    restarted = offloaded(Small(), server.endpoint, timeout_ms=5000,
                          export_cache=tmp_path / 'exports')
    assert restarted.warmup(x)
    stats = restarted.stats()
    assert stats['exports'] == 0 and stats['cached_exports'] == 1
    assert stats['uploads'] == 0      # the store is warm: nothing sent again
    out = restarted(x)
    assert restarted.last.result.value == 'offloaded'
    local = Small().eval()(x)
    torch.testing.assert_close(out, local)
