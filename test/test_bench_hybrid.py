"""The hybrid benchmark end to end on tiny inputs: solved, every mode measured, correction."""

import json

from bench import hybrid
from rrto_ros.plan_table import PlanTable


def test_hybrid_smoke_run_measures_every_mode_and_writes_docs_only_when_asked(tmp_path):
    out, docs = tmp_path / 'hybrid.json', tmp_path / 'benchmarks.md'
    docs.write_text('# Benchmarks\n\nKept text.\n')
    argv = ['--models', 'python:bench.unseen_models:unet', '--grid', '2,300', '--rtts', '4',
            '--calls', '2', '--calibration-rounds', '1', '--correction-calls', '6',
            '--size', '32x48', '--frames', '2', '--robot-cpu-share', '1', '--out', str(out),
            '--docs', str(docs)]
    assert hybrid.main(argv) == 0
    assert docs.read_text() == '# Benchmarks\n\nKept text.\n'   # no --write-docs: untouched
    data = json.loads(out.read_text())
    (model,) = data['models']
    assert model['model'] == 'unet' and data['meta']['size'] == [32, 48]
    assert sorted(row['bandwidth_mbps'] for row in model['rows']) == [2.0, 300.0]
    for row in model['rows']:
        for mode in hybrid.MODES:
            point = row[mode]
            assert point['n'] == 2 and point['fallbacks'] == 0
            assert point['rel_l2_max'] < 1e-5   # every plan answers as local inference does
        assert row['local']['round_trips'] == 0 and row['offload']['round_trips'] == 1
        assert row['hybrid']['round_trips'] <= 1
        assert row['verdict']['noise'] >= 0 and row['hybrid']['predicted_ms'] > 0
    assert model['calibration']['errors'] and 0.02 <= model['margin'] <= 0.15
    correction = model['correction']
    if correction is not None:
        assert len(correction['plans_used']) == 6
    assert hybrid.main(argv + ['--render-only', '--write-docs']) == 0
    text = docs.read_text()
    assert 'Kept text.' in text and text.count(hybrid.BEGIN) == 1
    assert '## Hybrid-Parallel plans' in text and 'Median prediction error' in text


def _row(**medians):
    plans = {'local': 'local', 'offload': 'offload', 'offload_twin': 'offload',
             'best_split': 'split@3', 'hybrid': 'hybrid@9:0.50'}
    plans.update(medians.pop('plans', {}))
    return {name: {'median_ms': ms, 'plan': plans[name], 'predicted_ms': ms}
            for name, ms in medians.items()}


def test_verdict_compares_with_the_best_baseline_and_the_noise_floor():
    row = _row(local=100.0, offload=150.0, offload_twin=150.0, best_split=90.0, hybrid=72.0)
    v = hybrid.verdict(row)
    assert v['best'] == 'best_split' and abs(v['gain'] - 0.2) < 1e-9
    assert v['crossover'] and v['within'] and not v['same_plan']
    row['hybrid']['median_ms'] = 95.0   # 5.6 % slower, noise 0: over the 3 % limit
    assert not hybrid.verdict(row)['within']
    row['offload_twin']['median_ms'] = 160.0   # two identical runners 6.7 % apart
    v = hybrid.verdict(row)
    assert abs(v['noise'] - 10 / 150) < 1e-9 and v['within']
    same = _row(local=100.0, offload=150.0, offload_twin=150.0, best_split=90.0, hybrid=95.0,
                plans={'hybrid': 'split@3'})
    v = hybrid.verdict(same)
    assert v['same_plan'] and v['within'] and abs(v['noise'] - 95 / 90 + 1) < 1e-9


def test_step_summary_counts_inferences_until_the_tables_plan(tmp_path):
    entries = [{'bandwidth_mbps': b, 'rtt_ms': 4.0, 'plan': p}
               for b, p in ((5, {'kind': 'local'}), (100, {'kind': 'offload'}))]
    table = PlanTable('0' * 64, 'kp', [{'dtype': 'uint8', 'shape': [1, 8, 8, 3]}], entries,
                      {}, {})
    timeline = [{'t_s': t, 'plan': plan, 'result': 'offloaded', 'rel_error': 0.0}
                for t, plan in ((0.1, 'local'), (0.5, 'offload'), (1.2, 'offload'),
                                (1.4, 'local'))]
    summary = hybrid.summarise_steps(timeline, [(100, 1.0), (5, 1.0)], table, 4.0)
    first, second = summary['levels']
    assert first['calls_to_switch'] == 1 and second['calls_to_switch'] == 1
    assert summary['failed'] == 0
