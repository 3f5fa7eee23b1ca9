"""The 'server finishes' estimate: in one request it never beats offload or split@k."""

import torch

from bench import hybrid_finish
from bench.hybrid import load_model
from rrto_ros.plan_solve import prepare
from rrto_ros.planner import CostModel, Link, Profiles
from rrto_ros.split import Plan


def _cost(spec: str, size: tuple[int, int]) -> CostModel:
    x = torch.randint(0, 256, (1, *size, 3), dtype=torch.uint8)
    _, program, _, analysis = prepare(load_model(spec), x)
    ms = {n.name: 0.0 if analysis.info[n.name].kind == 'noop' else 1.0 for n in program.nodes}
    return CostModel(analysis, Profiles(ms, {k: 0.3 * v for k, v in ms.items()}, 0.7, 0.005, 1,
                                        'test', 0.5, 0.9, 1.0))


def test_one_request_is_never_below_offload_or_the_split_at_its_cut():
    cost = _cost('python:bench.unseen_models:tiny_yolo', (64, 96))
    stream_wins = 0
    for link in (Link(5.0, 4.0), Link(50.0, 4.0), Link(300.0, 30.0), Link(3000.0, 4.0)):
        offload = cost.estimate(Plan('offload'), link).latency_ms
        for cut in cost.cuts:
            floor = min(offload, cost.estimate(Plan('split', cut), link).latency_ms)
            for ratio in hybrid_finish.RATIOS:
                ms = hybrid_finish.finish_ms(cost, link, cut, ratio)
                # 1 %: rows the unsplit network computes and no later row needs (a 2x2
                # pooling of an odd height) are left out of both bands
                assert ms['seq'] >= 0.99 * floor, (link, cut, ratio)
                assert ms['stream'] <= ms['seq'] + 1e-9
                stream_wins += ms['stream'] < 0.95 * floor
    assert stream_wins   # the two-part upper bound does gain somewhere: the check can fail


def test_the_robot_taking_every_row_is_the_split(capsys):
    cost = _cost('python:bench.unseen_models:tiny_yolo', (64, 96))
    link = Link(100.0, 4.0)
    cut = cost.cuts[-1]
    split = cost.estimate(Plan('split', cut), link).latency_ms
    assert hybrid_finish.finish_ms(cost, link, cut, 1.0)['seq'] == split
    argv = ['python:bench.unseen_models:unet', '--size', '32x48', '--local-ms', '10',
            '--server-ms', '3', '--grid', '100,300', '--measure', '1']
    assert hybrid_finish.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count('Mbit/s:') == 2 and '| seq ' in out and '| stream ' in out
    assert 'robot band finish@' in out
