"""The hybrid benchmark end to end on tiny inputs: tables solved, every mode measured, steps."""

import json

from bench import hybrid
from rrto_ros.plan_table import PlanTable


def test_hybrid_smoke_run_measures_every_mode_and_the_step_link(tmp_path):
    out, docs = tmp_path / 'hybrid.json', tmp_path / 'benchmarks.md'
    docs.write_text('# Benchmarks\n\nKept text.\n')
    assert hybrid.main(['--archs', 'keypoint_net', '--grid', '20,300', '--seconds', '0',
                        '--min-calls', '2', '--max-calls', '2', '--size', '64', '--frames', '2',
                        '--robot-cpu-share', '1', '--step-scale', '0.05', '--out', str(out),
                        '--docs', str(docs)]) == 0
    data = json.loads(out.read_text())
    (arch,) = data['archs']
    assert [row['bandwidth_mbps'] for row in arch['rows']] == [20.0, 300.0]
    for row in arch['rows']:
        for mode in hybrid.MODES:
            point = row[mode]
            assert point['n'] == 2 and point['fallbacks'] == 0
            assert point['rel_l2_max'] < 1e-5   # every plan answers as local inference does
            assert point['energy_j'] > 0
        assert row['local']['round_trips'] == 0 and row['offload']['round_trips'] == 1
        assert row['hybrid']['round_trips'] <= 1
    for variant in ('oracle', 'monitor'):
        steps = arch['steps'][variant]
        assert [lv['mbps'] for lv in steps['levels']] == [100, 5, 50]
        assert steps['failed'] == 0 and steps['timeline']
    text = docs.read_text()
    assert 'Kept text.' in text and text.count(hybrid.BEGIN) == 1
    assert '## Hybrid-Parallel plans' in text and 'prediction error' in text


def test_verdict_compares_with_the_best_baseline():
    row = {'local': {'median_ms': 100.0, 'plan': 'local'},
           'offload': {'median_ms': 150.0, 'plan': 'offload'},
           'best_split': {'median_ms': 90.0, 'plan': 'split@3'},
           'hybrid': {'median_ms': 72.0, 'plan': 'hybrid@9:0.50'}}
    v = hybrid.verdict(row)
    assert v['best'] == 'best_split' and abs(v['gain'] - 0.2) < 1e-9
    assert v['crossover'] and v['within_3pct'] and v['noise'] is None
    row['hybrid'] = {'median_ms': 95.0, 'plan': 'split@3'}   # the same plan: the gap is noise
    v = hybrid.verdict(row)
    assert v['gain'] == 0.0 and abs(v['noise'] + 95 / 90 - 1) < 1e-9 and v['within_3pct']
    row['hybrid'] = {'median_ms': 95.0, 'plan': 'hybrid@9:0.50'}
    assert not hybrid.verdict(row)['within_3pct']


def test_step_summary_counts_inferences_until_the_tables_plan(tmp_path):
    entries = [{'bandwidth_mbps': b, 'rtt_ms': 4.0, 'plan': p}
               for b, p in ((5, {'kind': 'local'}), (100, {'kind': 'offload'}))]
    table = PlanTable('0' * 64, 'kp', 'sig', entries, {}, {})
    timeline = [{'t_s': t, 'plan': plan, 'result': 'offloaded', 'rel_error': 0.0}
                for t, plan in ((0.1, 'local'), (0.5, 'offload'), (1.2, 'offload'),
                                (1.4, 'local'))]
    summary = hybrid.summarise_steps(timeline, [(100, 1.0), (5, 1.0)], table, 4.0)
    first, second = summary['levels']
    assert first['calls_to_switch'] == 1 and second['calls_to_switch'] == 1
    assert summary['failed'] == 0
