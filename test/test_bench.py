"""The benchmark runner and its report: a seconds-long smoke run of every section."""

import collections
import json
import math

import pytest
import torch

from bench import report, run_all
from bench.link_config import grid_link
from bench.measure import output_error
from rrto_wire.summary import percentile, summarise
from rrto_testing import free_port


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench')
    results = out / 'results' / 'bench.json'
    assert run_all.main(['--profile', 'smoke', '--results', str(results), '--docs', str(out),
                         '--no-report']) == 0
    return out, results, json.loads(results.read_text())


def _point(points, **match):
    found = [p for p in points if all(p[k] == v for k, v in match.items())]
    assert len(found) == 1, match
    return found[0]


def test_smoke_run_measures_every_mode_and_section(smoke):
    _, _, data = smoke
    points, meta = data['points'], data['meta']
    assert {p['section'] for p in points} == {'modes', 'codecs', 'input', 'steps'}
    assert {p['mode'] for p in points if p['section'] == 'modes'} == {
        'local', 'naive', 'eager', 'replay'}
    local = _point(points, section='modes', mode='local')
    naive = _point(points, section='modes', mode='naive')
    replay = _point(points, section='modes', mode='replay')
    assert local['round_trips'] == 0 and local['link'] is None
    assert replay['round_trips'] == 1 and naive['round_trips'] > 10
    assert replay['offloaded'] == replay['n'] and replay['fallbacks'] == 0
    assert replay['bytes_sent'] >= 64 * 64 * 3 and replay['up_mbps'] == pytest.approx(50)
    for p in points:    # lossless paths answer exactly as local inference
        if p['codec'] != 'jpeg' and p['input'] == 'uint8':
            assert p['rel_l2_max'] == 0, p
    jpeg = _point(points, section='codecs', codec='jpeg')
    assert 0 < jpeg['rel_l2_max'] < 1 and jpeg['bytes_sent'] < replay['bytes_sent'] / 2
    steps = _point(points, section='steps')
    assert len(steps['timeline']) == steps['n'] > 1
    assert meta['frame_shape'] == [64, 64, 3] and meta['command'].startswith('python -m bench')


def test_report_writes_tables_plots_and_folds_in_gpu_results(smoke, tmp_path):
    out, results, _ = smoke
    docs = tmp_path / 'docs'
    docs.mkdir()
    (docs / 'benchmarks.md').write_text('# Benchmarks\n\nHand-written overhead section.\n')
    gpu = tmp_path / 'gpu.json'
    assert report.main(['--results', str(results), '--docs', str(docs), '--gpu', str(gpu)]) == 0
    text = (docs / 'benchmarks.md').read_text()
    assert 'Hand-written overhead section.' in text and 'No GPU results yet' in text
    assert text.count(report.BEGIN) == 1 and 'measured/floor' in text
    for name in ('bench_latency_vs_bandwidth.png', 'bench_round_trips.png',
                 'bench_codecs.png', 'bench_steps.png'):
        assert (docs / name).stat().st_size > 1000
    gpu.write_text(json.dumps({
        'machine': 'NVIDIA H100', 'date': '2026-01-01', 'command': 'python -m bench.gpu',
        'torch': '2.13.0', 'results': [
            {'arch': 'keypoint_net', 'precision': 'fp32', 'batch': 1, 'eager_ms': 3.0,
             'replay_ms': 0.5, 'server_ms': 0.9, 'server_overhead_ms': 0.4}]}))
    assert report.main(['--results', str(results), '--docs', str(docs), '--gpu', str(gpu)]) == 0
    text = (docs / 'benchmarks.md').read_text()
    assert 'No GPU results yet' not in text and 'H100 fp32 predicted ms' in text
    assert text.count(report.BEGIN) == 1 and 'Hand-written overhead section.' in text


def test_floor_is_rtt_plus_transfer_plus_compute():
    link = grid_link(8, rtt_ms=10).to_json()    # 8 Mbit/s: 1 ms per kB
    point = {'link': 'grid', 'link_config': link, 'bytes_sent': 150_000,
             'bytes_received': 4_000, 'up_mbps': 8.0, 'down_mbps': 8.0}
    assert report.floor_ms(point, 20.0) == pytest.approx(10 + 150 + 4 + 20)
    assert report.floor_ms(dict(point, link=None), 20.0) is None
    points = report.annotate([dict(point, arch='a', mode='replay', input='uint8',
                                   server_compute_ms=20.0, median_ms=368.0)])
    assert points[0]['vs_floor'] == pytest.approx(2.0)


def test_percentile_and_output_error():
    # numpy's linear interpolation: rank (n - 1) * q / 100 between its neighbours
    assert percentile([5, 1, 3, 2, 4], 50) == 3
    assert percentile(list(range(10)), 99) == pytest.approx(8.91)
    assert math.isnan(percentile([], 50)) and summarise([]) == {'n': 0}
    assert summarise([4.0, 1.0, 2.0, 3.0]) == {'n': 4, 'mean': 2.5, 'p50': 2.5,
                                               'p90': pytest.approx(3.7),
                                               'p99': pytest.approx(3.97), 'max': 4.0}
    import torch
    ref = {'a': torch.tensor([[0.0, 2.0, 1.0]]), 'b': torch.ones(1, 2, 3, 3)}
    same = output_error(ref, ref)
    assert same == (0.0, 1.0)
    moved = {'a': torch.tensor([[3.0, 2.0, 1.0]]), 'b': torch.ones(1, 2, 3, 3)}
    rel, agreement = output_error(moved, ref)
    assert rel == pytest.approx(3 / (5 + 18) ** 0.5) and agreement == 0.0


@pytest.mark.slow
def test_overhead_benchmark_reports_overhead_and_its_zmq_floor(tmp_path):
    from bench import overhead
    out = tmp_path / 'overhead.json'
    assert overhead.main(['--calls', '20', '--models', 'tiny', '--port', str(free_port()),
                          '--out', str(out)]) == 0
    report = json.loads(out.read_text())
    assert report['command'].startswith('python -m bench.overhead') and report['date']
    row, = report['results']
    assert row['round_trips_per_call'] == 1 and row['bytes_sent'] > 224 * 224 * 3
    assert 0 < row['zmq_echo_ms_median'] < row['total_ms_median']
    assert 0 < row['robot_cpu_ms_median'] < row['total_ms_median']
    assert row['overhead_beyond_echo_ms'] == pytest.approx(
        row['overhead_ms_median'] - row['zmq_echo_ms_median'])


@pytest.mark.slow
def test_server_phases_times_each_phase_of_the_request_path(tmp_path):
    from bench import server_phases
    out = tmp_path / 'phases.json'
    assert server_phases.main(['--device', 'cpu', '--calls', '5', '--archs', 'keypoint_net',
                               '--out', str(out)]) == 0
    row, = json.loads(out.read_text())['results']
    assert row['server_compute_ms'] <= row['server_ms'] <= row['total_ms']
    phases = row['phases']
    for label in ('decode_tensors', 'replay.start (stages large inputs)',
                  'lane.run (replay + sync)', 'host_outputs (large copy-back)',
                  'ok (encode + send)'):
        assert phases[label]['n'] >= 5 and phases[label]['median_ms'] > 0, label
    client = row['client_phases']
    # the offloaded INFER's steps (start and result time the hello and record around them)
    for label in ('start_infer (encode + send)', 'take (wait + decode)', 'view_raw'):
        assert client[label]['n'] >= 5 and client[label]['median_ms'] > 0, label
    assert client['take (wait + decode)']['median_ms'] <= client['call (everything)']['p90_ms']
    from rrto_wire import protocol
    assert protocol.decode_tensors.__module__ == 'rrto_wire.protocol' and \
        not hasattr(protocol.decode_tensors, '__wrapped__'), 'the timers are removed afterwards'


@pytest.mark.parametrize('n', range(1, 9))
def test_balanced_orders_give_every_position_and_every_predecessor_equally(n):
    from bench.measure import balanced_orders
    rows = balanced_orders(n)
    assert all(sorted(row) == list(range(n)) for row in rows)
    positions = collections.Counter((row[p], p) for row in rows for p in range(n))
    assert set(positions.values()) == {len(rows) // n}
    follows = collections.Counter((a, b) for row in rows for a, b in zip(row, row[1:]))
    if n > 1:
        assert len(follows) == n * (n - 1) and len(set(follows.values())) == 1


@pytest.mark.parametrize('n', range(1, 9))
def test_whole_designs_give_every_runner_every_predecessor_equally_from_any_row(n):
    from bench.measure import balanced_orders, whole_designs
    rows = balanced_orders(n)
    rounds = whole_designs(7, n)
    assert rounds >= 7 and rounds % len(rows) == 0 and rounds - 7 < len(rows)
    for first in range(len(rows)):
        window = [rows[(first + i) % len(rows)] for i in range(rounds)]
        follows = collections.Counter((a, b) for row in window for a, b in zip(row, row[1:]))
        assert n == 1 or (len(follows) == n * (n - 1) and len(set(follows.values())) == 1)


def test_interleaved_rounds_follow_the_balanced_orders_and_calls_start_on_new_rows():
    from bench.measure import balanced_orders, run_interleaved
    from rrto_ros import OffloadResult
    from rrto_ros.records import CallRecord
    seen: list[str] = []

    class Runner:
        def __init__(self, name):
            self.name, self.last = name, None

        def __call__(self, frame):
            seen.append(self.name)
            self.last = CallRecord(OffloadResult.LOCAL, 'local', total_ms=1.0)
            return frame

    frames = [torch.zeros(1)]
    names = 'abcd'

    def rounds(count):
        seen.clear()
        run_interleaved({n: Runner(n) for n in names}, frames, frames, 0.0, count, count,
                        warmup_calls=0)
        return [seen[i:i + 4] for i in range(0, len(seen), 4)]

    first = rounds(4)
    # one full design: every runner in every position once, every ordered pair once
    assert all(sorted(r) == list(names) for r in first)
    assert {(r[p], p) for r in first for p in range(4)} == {
        (n, p) for n in names for p in range(4)}
    assert len({(a, b) for r in first for a, b in zip(r, r[1:])}) == 12
    assert len(balanced_orders(4)) == 4
    assert rounds(1) != rounds(1)   # the next call starts on another row


def test_each_call_keeps_its_place_in_the_round_and_the_runner_called_before_it():
    from bench.measure import run_interleaved
    from rrto_ros import OffloadResult
    from rrto_ros.records import CallRecord
    seen: list[str] = []

    class Runner:
        def __init__(self, name):
            self.name, self.last = name, None

        def __call__(self, frame):
            seen.append(self.name)
            self.last = CallRecord(OffloadResult.LOCAL, 'local', total_ms=float(len(seen)),
                                   robot_compute_ms=2.0 * len(seen),
                                   server_compute_ms=3.0 * len(seen),
                                   predicted_ms=4.0 * len(seen))
            return frame

    frames = [torch.zeros(1)]
    points = run_interleaved({n: Runner(n) for n in 'abc'}, frames, frames, 0.0, 6, 6,
                             warmup_calls=1, probes={'b': lambda: len(seen)})
    # each call's robot and server compute, and a probe's reading just before b's calls
    for point in points.values():
        assert point['rounds_robot_ms'] == [2 * ms for ms in point['rounds_ms']]
        assert point['rounds_server_ms'] == [3 * ms for ms in point['rounds_ms']]
        # and the plan each call ran, with the table's prediction of it made before it ran
        assert point['rounds_predicted_ms'] == [4 * ms for ms in point['rounds_ms']]
        assert point['rounds_plans'] == ['local'] * 6
    assert points['b']['rounds_probe'] == [ms - 1 for ms in points['b']['rounds_ms']]
    assert 'rounds_probe' not in points['a']
    assert seen[:3] == ['a', 'b', 'c']     # the warm-up calls, then 6 rounds of 3
    timed = seen[3:]
    for name, point in points.items():
        assert len(point['rounds_pos']) == len(point['rounds_after']) == 6
        for k, (ms, place, before) in enumerate(zip(point['rounds_ms'], point['rounds_pos'],
                                                    point['rounds_after'])):
            at = int(ms) - 1 - 3               # the call's index among the timed ones
            assert timed[at] == name and at == 3 * k + place
            assert before == seen[int(ms) - 2]  # the warm-up's last runner before the first
    assert {p for point in points.values() for p in point['rounds_pos']} == {0, 1, 2}


def test_detector_comparison_says_whether_labels_and_order_match():
    from bench.detectors import compare
    boxes = torch.tensor([[0., 0., 10., 10.], [5., 5., 20., 20.]])
    local = {'boxes': boxes, 'scores': torch.tensor([0.9, 0.5]), 'labels': torch.tensor([3, 7])}
    same = compare(dict(local), local)
    assert same['identical'] and same['exact_integers'] and same['max_rel_diff'] == 0.0
    nudged = dict(local, boxes=boxes + torch.tensor([0., 0., 0., 0.002]))
    close = compare(nudged, local)
    assert not close['identical'] and close['exact_integers']
    assert close['max_abs_diff'] == pytest.approx(0.002, rel=1e-3)
    assert close['max_rel_diff'] == pytest.approx(0.002 / 20, rel=1e-3)
    swapped = dict(local, labels=torch.tensor([7, 3]))
    assert not compare(swapped, local)['exact_integers']
    fewer = {k: v[:1] for k, v in local.items()}
    assert not compare(fewer, local)['same_shapes'] and not compare(fewer, local)['exact_integers']
