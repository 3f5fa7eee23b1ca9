"""Model variants: join-consistent L1 pruning, dropped blocks, ladders, shared layers, training."""

import pytest
import torch

from rrto_ros import OffloadResult, variant_files, variant_train, variants
from rrto_ros.variants import VariantSpec
from rrto_testing import assert_same_as_local
from rrto_wire import treespec

SHAPE = (2, 3, 32, 32)


@pytest.mark.parametrize('arch', ['resnet18', 'mobilenet', 'keypoint_net'])
@pytest.mark.parametrize('width,drop', [(0.5, 0), (1.0, 2), (0.625, 1)])
def test_variants_run_and_shrink(arch, width, drop):
    base = variants.base_model(arch)
    model = variants.make(VariantSpec(arch, width, drop), base)
    x = torch.randn(SHAPE)
    out, ref = model(x), base(x)
    if isinstance(out, dict):
        assert {k: v.shape[:2] for k, v in out.items()} == {k: v.shape[:2] for k, v in ref.items()}
    else:
        assert out.shape == ref.shape
    assert variants.macs(model, SHAPE) < variants.macs(base, SHAPE)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in base.parameters())


def test_residual_join_keeps_one_index_set_by_summed_l1_norm():
    base = variants.base_model('resnet18')
    model = variants.prune_width(variants.base_model('resnet18'), 0.5)
    # stage 1: the stem and both blocks' conv2 feed one residual sum: one channel set
    score = sum(base.get_submodule(p).weight.abs().flatten(1).sum(1)
                for p in ('stem.0', 'layers.0.conv2', 'layers.1.conv2'))
    keep = torch.sort(torch.topk(score, 32).indices).values
    assert torch.equal(model.get_submodule('stem.0').weight,
                       base.get_submodule('stem.0').weight[keep])
    for bn in ('stem.1', 'layers.0.bn2', 'layers.1.bn2'):
        assert torch.equal(model.get_submodule(bn).running_mean,
                           base.get_submodule(bn).running_mean[keep])
    stage2 = sum(base.get_submodule(p).weight.abs().flatten(1).sum(1)
                 for p in ('layers.2.conv2', 'layers.2.down.0', 'layers.3.conv2'))
    keep2 = torch.sort(torch.topk(stage2, 64).indices).values
    assert torch.equal(model.get_submodule('layers.2.down.0').weight,
                       base.get_submodule('layers.2.down.0').weight[keep2][:, keep])
    # an unjoined layer is ranked on its own filters
    inner = base.get_submodule('layers.0.conv1').weight.abs().flatten(1).sum(1)
    own = torch.sort(torch.topk(inner, 32).indices).values
    assert torch.equal(model.get_submodule('layers.0.conv1').weight,
                       base.get_submodule('layers.0.conv1').weight[own][:, keep])


def test_concatenation_prunes_each_input_at_its_offset():
    base = variants.base_model('keypoint_net')
    model = variants.prune_width(variants.base_model('keypoint_net'), 0.5)
    c2 = base.get_submodule('stage2.1.0').weight.abs().flatten(1).sum(1)
    lat = base.get_submodule('lateral.0').weight.abs().flatten(1).sum(1)
    keep_c2 = torch.sort(torch.topk(c2, 32).indices).values
    keep_lat = torch.sort(torch.topk(lat, 32).indices).values
    fuse_in = torch.cat([keep_c2, keep_lat + 64])
    fuse = base.get_submodule('fuse.0').weight
    fuse_keep = torch.sort(torch.topk(fuse.abs().flatten(1).sum(1), 32).indices).values
    assert torch.equal(model.get_submodule('fuse.0').weight, fuse[fuse_keep][:, fuse_in])


def test_depth_variant_shares_every_kept_layer_with_its_parent():
    parent = variants.make(VariantSpec('resnet18', 0.75), variants.base_model('resnet18'))
    child = variants.make(VariantSpec('resnet18', 1.0, 2), parent)
    sizes = variant_files.storage_bytes([parent, child])
    child_only = variant_files.storage_bytes([child])['separate']
    assert sizes['separate'] > sizes['shared']
    assert sizes['shared'] - variant_files.storage_bytes([parent])['shared'] == 0
    assert child_only < sizes['separate']


def test_ladder_steps_down_in_roughly_equal_steps():
    specs = variants.ladder('resnet18', (1, 3, 32, 32), rungs=4)
    base = variants.base_model('resnet18')
    full = variants.macs(base, (1, 3, 32, 32))
    fractions = [variants.macs(variants.make(s, base), (1, 3, 32, 32)) / full for s in specs]
    assert specs[0] == VariantSpec('resnet18') and fractions[0] == 1
    steps = [a - b for a, b in zip(fractions, fractions[1:])]
    assert all(0.1 < s < 0.4 for s in steps), fractions


def test_a_few_training_steps_make_loadable_variants_with_measured_accuracy(tmp_path):
    rows = variant_train.train_ladder('keypoint_net', 16, tmp_path, steps=2, finetune_steps=1,
                                      rungs=3)
    assert [r['name'] for r in rows][0] == 'keypoint_net-w1-d0'
    data = variant_train.digits(16)
    assert len(data['y_val']) == 360 and len(data['y_train']) == 1437
    for row in rows:
        spec, model, fields = variant_files.load(row['file'])
        assert spec.name == row['name'] and 0 <= row['accuracy'] <= 1
        assert variant_train.accuracy(model, data['x_val'], data['y_val']) == row['accuracy']
        assert fields['accuracy'] == row['accuracy']


def test_sharded_variant_offloads_equal_to_local_and_shares_uploads(server, offloaded):
    parent = variants.make(VariantSpec('mobilenet', 0.5), variants.base_model('mobilenet'))
    child = variants.make(VariantSpec('mobilenet', 1.0, 3), parent)
    x = torch.randn(1, 3, 32, 32)
    first = offloaded(variant_files.ShardedModule(parent, 'p'), server.endpoint,
                      timeout_ms=30000)
    assert first.warmup(x)
    second = offloaded(variant_files.ShardedModule(child, 'c'), server.endpoint,
                       timeout_ms=30000)
    assert second.warmup(x)
    for om, model in ((first, parent), (second, child)):
        out = om(x)
        assert om.last.result == OffloadResult.OFFLOADED
        assert_same_as_local(out, model(x))
    flat, in_spec = treespec.flatten(((x,), {}))
    parent_blobs = variant_files.ShardedModule(parent, 'p').artifact(flat, in_spec).blobs
    child_blobs = variant_files.ShardedModule(child, 'c').artifact(flat, in_spec).blobs
    new = set(child_blobs) - set(parent_blobs)
    # the child uploaded its program and only the shards it does not share with the parent
    assert second.stats()['uploads'] == len(new) < len(child_blobs) - 20
