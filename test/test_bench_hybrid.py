"""The hybrid benchmark end to end on tiny inputs: solved, every mode measured, correction."""

import json
import math
import statistics
from pathlib import Path

import pytest

from bench import hybrid
from rrto_ros.plan_table import PlanTable


def test_hybrid_smoke_run_measures_every_mode_and_writes_docs_only_when_asked(tmp_path):
    out, docs = tmp_path / 'hybrid.json', tmp_path / 'benchmarks.md'
    docs.write_text('# Benchmarks\n\nKept text.\n')
    argv = ['--models', 'python:bench.unseen_models:unet', '--grid', '2,300', '--rtts', '4',
            '--calls', '2', '--calibration-rounds', '2', '--correction-calls', '6',
            '--settle-rounds', '3', '--same-plan-rounds', '2',
            '--robot-span', '1', '--size', '32x48', '--frames', '2', '--robot-cpu-share', '1',
            '--out', str(out), '--docs', str(docs)]
    assert hybrid.main(argv) == 0
    assert docs.read_text() == '# Benchmarks\n\nKept text.\n'   # no --write-docs: untouched
    data = json.loads(out.read_text())
    (model,) = data['models']
    assert model['model'] == 'unet' and data['meta']['size'] == [32, 48]
    assert sorted(row['bandwidth_mbps'] for row in model['rows']) == [2.0, 300.0]
    for row in model['rows']:
        for mode in hybrid.MODES:
            point = row[mode]
            # --calls 2: rounded up to the whole balanced design of 7 runners, 14 rounds
            assert point['n'] == 14 and point['fallbacks'] == 0
            assert point['rel_l2_max'] < 1e-5   # every plan answers as local inference does
        assert row['local']['round_trips'] == 0 and row['offload']['round_trips'] == 1
        assert row['hybrid']['round_trips'] <= 1
        assert row['verdict']['noise'] >= 0 and row['hybrid']['predicted_ms'] > 0
        for mode in hybrid.MODES:   # every round's latency is kept, in round order
            rounds = row[mode]['rounds_ms']
            assert len(rounds) == 14 and statistics.median(rounds) == row[mode]['median_ms']
        assert row['paired']['noise'] >= 0 and row['paired']['best'] in hybrid.BASELINES
        # the runner with correction on made its own calls at the point before its rounds
        assert len(row['corrected']['settle_plans']) == 3
        assert row['corrected']['in_use_predicted_ms'] > 0
        # the price it held before each call, and the entry's prediction of its plan: a
        # prediction re-made per call is recomputed from the results (repriced)
        assert len(row['corrected']['rounds_factor']) == 14
        assert len(row['corrected']['rounds_robot_ms']) == 14
        assert row['corrected']['in_use_estimate']['latency_ms'] > 0
        # and the engine's own prediction of each call, made before it ran
        assert all(ms > 0 for ms in row['corrected']['rounds_predicted_ms'])
        assert hybrid.call_prediction(row['corrected'])['calls'] > 0
        same = hybrid.same_plan_runners(row)   # more rounds of only those, whole designs
        assert (row['same_plan'] is None) == (not same)
        if same:
            assert list(row['same_plan']) == same
            assert all(len(row['same_plan'][name]['rounds_ms'])
                       == hybrid.whole_designs(2, len(same)) for name in same)
    assert hybrid.summary(model)['paired']['points'] == 2
    assert hybrid.summary(model)['corrected']['paired']['points'] == 2
    calibration = model['calibration']
    assert calibration['errors'] and 0.02 <= model['margin'] <= 0.15
    # the margin guards each plan's ratio to the best measured baseline, round by round
    assert calibration['paired_errors'] and calibration['paired_with'] in ('local', 'offload')
    assert calibration['robot_reference_ms'] > 0 and 'local' in calibration['phase_free']
    assert set(calibration['margins']) == set(calibration['paired_errors'])   # one per plan
    assert all(0.02 <= m <= 0.15 for m in calibration['margins'].values())
    correction = model['correction']
    if correction is not None:
        assert len(correction['plans_used']) == 6
    assert hybrid.main(argv + ['--render-only', '--write-docs']) == 0
    text = docs.read_text()
    assert 'Kept text.' in text and text.count(hybrid.BEGIN) == 1
    assert '## Hybrid-Parallel plans' in text and 'Median prediction error' in text
    assert f"error on the ratio to `{calibration['paired_with']}`, round by round" in text
    assert 'each of those plans is guarded by its own error' in text   # per-plan margins
    assert 'With run-time correction on (`corrected`)' in text
    assert 'Prediction before each call, with correction on' in text


def _row(**medians):
    plans = {'local': 'local', 'local_twin': 'local', 'offload': 'offload',
             'offload_twin': 'offload', 'best_split': 'split@3', 'hybrid': 'hybrid@9:0.50',
             'corrected': 'offload'}
    plans.update(medians.pop('plans', {}))
    medians.setdefault('local_twin', medians['local'])
    medians.setdefault('offload_twin', medians['offload'])
    return {name: {'median_ms': ms, 'plan': plans[name], 'predicted_ms': ms}
            for name, ms in medians.items()}


def test_verdict_compares_with_the_best_baseline_and_the_noise_floor():
    row = _row(local=100.0, offload=150.0, best_split=90.0, hybrid=72.0)
    v = hybrid.verdict(row)
    assert v['best'] == 'best_split' and abs(v['gain'] - 0.2) < 1e-9
    assert v['crossover'] and v['within'] and not v['same_plan'] and v['noise'] == 0
    row['hybrid']['median_ms'] = 95.0   # 5.6 % slower, noise 0: over the 3 % limit
    assert not hybrid.verdict(row)['within']
    row['offload_twin']['median_ms'] = 160.0   # two identical offload runners 6.7 % apart
    v = hybrid.verdict(row)
    assert abs(v['noise'] - 10 / 150) < 1e-9 and v['within']
    row['local_twin']['median_ms'] = 108.0     # the robot-bound twins disagree more: 8 %
    assert abs(hybrid.verdict(row)['noise'] - 0.08) < 1e-9


def test_the_runner_with_correction_on_is_judged_by_the_same_rules_beside_the_table():
    # the table (solved in another spell) ran local, 12 % slower than offload; correction
    # on moved to offload, within the twins' noise of the offload runners
    rows = []
    for bandwidth in (50.0, 100.0):
        row = _rounds(_row(local=0, offload=0, best_split=0, hybrid=0, corrected=0,
                           plans={'hybrid': 'local', 'best_split': 'offload'}),
                      local=[112.0, 110.0, 113.0], local_twin=[111.0, 112.0, 110.0],
                      offload=[100.0, 99.0, 101.0], offload_twin=[100.0, 100.0, 100.0],
                      best_split=[100.0, 100.0, 100.0], hybrid=[112.0, 111.0, 112.0],
                      corrected=[100.5, 100.0, 101.5])
        row['bandwidth_mbps'], row['rtt_ms'] = bandwidth, 4.0
        row['corrected']['in_use_predicted_ms'] = 102.0
        rows.append(row)
    s = hybrid.summary({'rows': rows})
    assert s['over'] == 2 and s['by_plan']['over'] == 2        # the table alone: over
    c = s['corrected']
    assert c['over'] == 0 and c['paired']['over'] == 0 and c['by_plan']['over'] == 0
    assert c['in_use_median_error'] == pytest.approx(102.0 / 100.5 - 1)
    assert 'corrected' not in c and 'in_use_median_error' not in s
    v = hybrid.verdict(rows[0], runner='corrected')
    assert v['within'] and v['same_plan'] and v['in_use_error'] > 0


def test_the_in_use_prediction_reprices_the_entrys_prediction_of_the_plan_used():
    entry = {'bandwidth_mbps': 50.0, 'rtt_ms': 4.0, 'plan_name': 'local',
             'plan': {'kind': 'local'}, 'predicted': {'latency_ms': 55.0,
                                                      'robot_compute_ms': 55.0},
             'baselines': {'local': {'plan': {'kind': 'local'},
                                     'predicted': {'latency_ms': 55.0, 'robot_compute_ms': 55.0}},
                           'offload': {'plan': {'kind': 'offload'},
                                       'predicted': {'latency_ms': 70.0,
                                                     'robot_compute_ms': 2.0}}}}
    table = PlanTable('p', 'net', [], [entry], {}, {})
    link = hybrid.Link(50.0, 4.0)
    assert hybrid.in_use_prediction(table, link, 'local', 80 / 55, 55.0) == pytest.approx(80.0)
    assert hybrid.in_use_prediction(table, link, 'offload', 1.5, 70.0) == pytest.approx(71.0)
    assert hybrid.in_use_prediction(table, link, 'offload', None, 70.0) == 70.0
    assert hybrid.in_use_prediction(table, link, 'split@3', 1.5, 60.0) == 60.0
    assert hybrid.plan_prediction(table, link, 'offload')['robot_compute_ms'] == 2.0
    assert hybrid.plan_prediction(table, link, 'split@3') is None


def _in_use_point() -> dict:
    """A hybrid point run with correction on: two offload explorations, the price moving."""
    estimate = {'latency_ms': 60.0, 'robot_compute_ms': 50.0, 'busy_ms': 40.0, 'remote_ms': 35.0}
    return {'plan': 'hybrid@9:0.50', 'plans': {'hybrid@9:0.50': 4, 'offload': 2},
            'rounds_ms': [75.0, 100.0, 80.0, 90.0, 98.0, 85.0],
            'rounds_robot_ms': [60.0, 0.1, 64.0, 70.0, 0.2, 68.0],
            'rounds_server_ms': [10.0, 20.0, 10.0, 10.0, 20.0, 10.0],
            'rounds_factor': [1.0, 1.5, 1.5, 1.6, 1.7, 1.7], 'in_use_estimate': estimate,
            'predicted_ms': 60.0, 'in_use_predicted_ms': 60.0, 'median_ms': 87.5}


def test_each_calls_plan_is_read_from_the_recorded_counts_and_computes():
    point = _in_use_point()
    assert hybrid.call_plans(point) == ['hybrid@9:0.50', 'offload', 'hybrid@9:0.50',
                                        'hybrid@9:0.50', 'offload', 'hybrid@9:0.50']
    local = dict(point, plans={'hybrid@9:0.50': 4, 'local': 2},
                 rounds_server_ms=[10.0, 0.0, 10.0, 10.0, 0.0, 10.0])
    assert hybrid.call_plans(local)[:2] == ['hybrid@9:0.50', 'local']
    assert hybrid.call_plans(dict(point, plans={'hybrid@9:0.50': 3, 'offload': 3})) is None
    assert hybrid.call_plans(dict(point, rounds_plans=['local'] * 6)) == ['local'] * 6


def test_the_prediction_before_each_call_is_priced_from_the_calls_before_it():
    # session 14 (H200): the price held before a point's rounds missed the robot by up to
    # 26 %; the engine reprices before every call from the calls it observed, and the
    # results keep that price per call: the hybrid's calls predicted at 1.0, 1.5, 1.6, 1.7
    point = _in_use_point()
    before = hybrid.call_prediction(point)
    predicted = [60.0, 40 * 1.5 + 20 * 1.5, 40 * 1.6 + 20 * 1.6, 40 * 1.7 + 20 * 1.7]
    measured = statistics.median([75.0, 80.0, 90.0, 85.0])   # the offload calls left out
    assert before['calls'] == 4 and before['measured_ms'] == measured
    assert before['error'] == pytest.approx(statistics.median(predicted) / measured - 1)
    assert before['offline'] == pytest.approx(60.0 / measured - 1)
    assert before['in_use'] == pytest.approx(60.0 / measured - 1)
    assert before['prices'] == (1.0, 1.7)
    # without the model: each call as the median of the plan's last three before it
    recent = statistics.median([60.0, 75.0, 77.5, 80.0])
    assert before['recent'] == pytest.approx(recent / measured - 1)
    # the engine's own per-call prediction, where recorded, is the one judged
    recorded = dict(point, rounds_predicted_ms=[70.0, 99.0, 80.0, 90.0, 99.0, 86.0])
    assert hybrid.call_prediction(recorded)['error'] == pytest.approx(83.0 / measured - 1)
    assert hybrid.call_prediction(dict(point, rounds_factor=None)) is None
    # per network: the median over the points, beside the offline and in-use errors
    rows = []
    for bandwidth in (50.0, 100.0):
        row = _row(local=100.0, offload=90.0, best_split=95.0, hybrid=80.0, corrected=80.0,
                   plans={'corrected': 'hybrid@9:0.50'})
        row['corrected'] = dict(row['corrected'], **point)
        row['bandwidth_mbps'], row['rtt_ms'] = bandwidth, 4.0
        rows.append(row)
    s = hybrid.summary({'rows': rows})['corrected']
    assert s['call_median_error'] == pytest.approx(abs(before['error']))
    assert s['call_points'] == 2
    lines = hybrid.call_lines(rows)
    assert any(line.startswith('| 4 | 50 | hybrid@9:0.50 | 4 | 82.5 |') for line in lines)
    assert any(f'{before["error"] * 100:+.1f} % | 1.00-1.70 |' in line for line in lines)


def test_the_local_runners_calls_are_predicted_at_the_price_held_at_their_moment():
    # calls that did not set the price: a local call before `corrected`'s in the round
    # gets the price probed before that call, one after it the price probed before the next
    row = {'corrected': {'rounds_factor': [1.2, 1.5, 1.4], 'rounds_pos': [1, 0, 1]},
           'local': {'plan': 'local', 'plans': {'local': 3}, 'predicted_ms': 50.0,
                     'rounds_ms': [60.0, 75.0, 72.0], 'rounds_pos': [0, 1, 0]},
           'offload': {'plan': 'offload', 'plans': {'offload': 3}, 'predicted_ms': 9.0,
                       'rounds_ms': [9.0] * 3, 'rounds_pos': [2] * 3}}
    local = hybrid.local_at_price(row)
    predicted = [50.0 * 1.2, 50.0 * 1.4, 50.0 * 1.4]
    assert local['calls'] == 3 and local['measured_ms'] == 72.0
    assert local['error'] == pytest.approx(statistics.median(predicted) / 72.0 - 1)
    row['local']['rounds_pos'][2] = 2   # after the last probe of the point: not predicted
    assert hybrid.local_at_price(row)['calls'] == 2
    del row['corrected']['rounds_factor']
    assert hybrid.local_at_price(row) is None


def test_the_same_plan_as_the_best_baseline_gets_no_free_pass():
    same = _row(local=100.0, offload=150.0, best_split=90.0, hybrid=95.0,
                plans={'hybrid': 'split@3'})
    v = hybrid.verdict(same)
    assert v['same_plan'] and not v['within']   # 5.6 % apart, identical runners agree
    same['local_twin']['median_ms'] = 106.0     # the floor is 6 %: now within it
    assert hybrid.verdict(same)['within']
    # runners that happen to share a plan are not twins: they do not set the floor
    assert hybrid.verdict(_row(local=100.0, offload=150.0, best_split=50.0, hybrid=95.0,
                               plans={'best_split': 'local'}))['noise'] == 0


def test_the_pooled_floor_is_the_runs_largest_twin_gap_in_the_points_regime():
    def robot_bound(row, *names):   # robot CPU time equal to latency: robot-bound runners
        for name in names:
            row[name]['robot_cpu_ms'] = row[name]['median_ms']
        for name in set(row) - set(names):
            row[name]['robot_cpu_ms'] = 0.0
        return row

    quiet = robot_bound(_row(local=100.0, offload=150.0, best_split=100.0, hybrid=106.0,
                             plans={'hybrid': 'local', 'best_split': 'local'}),
                        'local', 'local_twin', 'best_split', 'hybrid')
    wide = robot_bound(_row(local=100.0, local_twin=108.0, offload=30.0, offload_twin=30.6,
                            best_split=31.0, hybrid=32.0, plans={'hybrid': 'split@3'}),
                       'local', 'local_twin')
    pooled = hybrid.pooled_floors([quiet, wide])
    assert pooled == pytest.approx({'robot': 0.08, 'link': 0.02})
    v = hybrid.verdict(quiet, pooled)
    # its own twins agree, so the point's rule says over; robot twins elsewhere in the
    # run differ by 8 %: within the pooled floor of its regime, and both verdicts are kept
    assert v['regime'] == 'robot' and v['same_plan']
    assert not v['within'] and v['pooled_within']
    # a link-bound point gets the link-bound floor (2 %), not the robot's
    v = hybrid.verdict(wide, pooled)
    assert v['regime'] == 'link' and v['pooled_noise'] == pytest.approx(0.02)
    # 6.7 % slower than offload: within the point's own floor (its local twins' 8 %), but
    # over max(3 %, 2 %): the pooled floor is not only ever wider
    assert v['within'] and not v['pooled_within']
    s = hybrid.summary({'rows': [quiet, wide]})
    assert (s['over'], s['over_pooled'], s['points']) == (1, 1, 2)


def _rounds(row: dict, **rounds) -> dict:
    """Give every runner of ``row`` per-round latencies (medians and predictions follow)."""
    for name, values in rounds.items():
        row[name]['rounds_ms'] = list(values)
        row[name]['median_ms'] = row[name]['predicted_ms'] = statistics.median(values)
    return row


DRIFT = [100.0, 110.0, 120.0, 130.0, 140.0]   # the robot slower round after round


def test_one_slow_call_moves_a_median_across_drift_but_not_the_paired_ratio():
    row = _rounds(_row(local=0, offload=0, best_split=0, hybrid=0,
                       plans={'hybrid': 'local', 'best_split': 'local'}),
                  local=DRIFT, local_twin=DRIFT, best_split=DRIFT,
                  offload=[2 * ms for ms in DRIFT], offload_twin=[2 * ms for ms in DRIFT],
                  hybrid=[100.0, 110.0, 135.0, 130.0, 140.0])   # one slow call, round 3
    v = hybrid.verdict(row)
    assert v['gain'] == pytest.approx(-130 / 120 + 1) and not v['within']   # +8.3 %
    p = hybrid.paired_verdict(row)
    # round by round the table's runner equals local in four rounds of five
    assert p['gain'] == pytest.approx(0.0) and p['noise'] == 0 and p['within']
    assert p['same_plan'] and p['regime'] == 'link'


def test_the_paired_floor_does_not_hide_a_slowdown_in_every_round():
    slower = [1.05 * ms for ms in DRIFT]
    row = _rounds(_row(local=0, offload=0, best_split=0, hybrid=0),
                  local=DRIFT, local_twin=[100.0, 110.0, 135.0, 130.0, 140.0],
                  best_split=[1.2 * ms for ms in DRIFT], offload=[2 * ms for ms in DRIFT],
                  offload_twin=[2 * ms for ms in DRIFT], hybrid=slower)
    # the twins' medians are 8.3 % apart (one slow call): the per-point rule lets 5 % pass
    assert hybrid.verdict(row)['within']
    p = hybrid.paired_verdict(row)
    # round by round the twins agree and the table's runner is 5 % slower every time
    assert p['best'] == 'local' and p['gain'] == pytest.approx(-0.05) and not p['within']
    s = hybrid.paired_summary([row])
    assert (s['over'], s['over_same_plan'], s['points']) == (1, 0, 1)
    assert s['pooled_floors'] == {'link': pytest.approx(0.0)}


def test_the_paired_error_is_the_error_of_the_ratio_to_the_fastest_other_plan():
    row = _rounds(_row(local=0, offload=0, best_split=0, hybrid=0),
                  local=DRIFT, local_twin=DRIFT, offload=[3 * ms for ms in DRIFT],
                  offload_twin=[3 * ms for ms in DRIFT], best_split=[1.5 * ms for ms in DRIFT],
                  hybrid=[0.9 * ms for ms in DRIFT])
    row['hybrid']['predicted_ms'], row['local']['predicted_ms'] = 80.0, 100.0
    p = hybrid.paired_verdict(row)
    # predicted 0.8 of local, measured 0.9 of local in every round: 11 % optimistic
    assert p['error_vs'] == 'local' and p['error'] == pytest.approx(0.8 / 0.9 - 1)
    assert p['gain'] == pytest.approx(0.1) and p['within']


def test_a_baseline_plan_is_every_runner_that_ran_it_not_the_luckiest_of_them():
    lucky = [95.0, 105.0, 114.0, 130.0, 140.0]   # the best split runs local too: 3 lucky calls
    row = _rounds(_row(local=0, offload=0, best_split=0, hybrid=0,
                       plans={'hybrid': 'local', 'best_split': 'local'}),
                  local=DRIFT, local_twin=DRIFT, best_split=lucky,
                  offload=[2 * ms for ms in DRIFT], offload_twin=[2 * ms for ms in DRIFT],
                  hybrid=DRIFT)
    # against the luckiest of three identical runners the table's runner, running the same
    # plan, is 4.8 % slower round by round: over the limit
    assert hybrid.paired_verdict(row)['gain'] == pytest.approx(1 - 110 / 105)
    assert not hybrid.paired_verdict(row)['within']
    v = hybrid.plan_verdict(row)   # local's rounds: the mean of its three runners
    assert v['best'] == 'local' and v['same_plan'] and v['within']
    assert v['gain'] == pytest.approx(1 - 110 / ((110 + 110 + 105) / 3))
    # a table's runner slower than every runner of the plan it runs is still over
    slow = _rounds(_row(local=0, offload=0, best_split=0, hybrid=0,
                        plans={'hybrid': 'local', 'best_split': 'local'}),
                   local=DRIFT, local_twin=DRIFT, best_split=DRIFT,
                   offload=[2 * ms for ms in DRIFT], offload_twin=[2 * ms for ms in DRIFT],
                   hybrid=[1.05 * ms for ms in DRIFT])
    w = hybrid.plan_verdict(slow)
    assert w['gain'] == pytest.approx(-0.05)
    assert not w['within'] and w['best'] == 'local'
    other = _rounds(_row(local=0, offload=0, best_split=0, hybrid=0),   # another plan, slower
                    local=DRIFT, local_twin=DRIFT, best_split=[1.5 * ms for ms in DRIFT],
                    offload=[2 * ms for ms in DRIFT], offload_twin=[2 * ms for ms in DRIFT],
                    hybrid=[1.04 * ms for ms in DRIFT])
    assert hybrid.plan_verdict(other)['gain'] == pytest.approx(-0.04)
    assert not hybrid.plan_verdict(other)['within']
    s = hybrid.plan_summary([row, other])
    assert (s['over'], s['over_same_plan'], s['points']) == (1, 0, 2)
    assert hybrid.plan_verdict(_row(local=100.0, offload=150.0, best_split=90.0,
                                    hybrid=72.0)) is None   # no rounds, no verdict


def test_a_same_plan_point_is_judged_again_on_more_rounds_of_only_its_runners():
    lucky = [95.0, 105.0, 114.0, 130.0, 140.0]
    row = _rounds(_row(local=0, offload=0, best_split=0, hybrid=0, corrected=0,
                       plans={'hybrid': 'local', 'best_split': 'local'}),
                  local=lucky, local_twin=DRIFT, best_split=lucky,
                  offload=[2 * ms for ms in DRIFT], offload_twin=[2 * ms for ms in DRIFT],
                  hybrid=[1.04 * ms for ms in DRIFT], corrected=[2 * ms for ms in DRIFT])
    assert not hybrid.verdict(row)['within']    # 9.5 % slower than the luckier runners
    # the runners that ran local, the table's runner among them, both local twins there
    assert hybrid.same_plan_runners(row) == ['local', 'local_twin', 'best_split', 'hybrid']
    assert hybrid.same_plan_verdict(row) is None   # no extra rounds at this point
    assert hybrid.summary({'rows': [row]})['same_plan'] is None
    level = [100.0 + (7 * k) % 23 for k in range(14)]
    row['same_plan'] = {name: {'rounds_ms': list(level)}
                        for name in ('local', 'local_twin', 'best_split', 'hybrid')}
    v = hybrid.same_plan_verdict(row)
    assert v['plan'] == 'local' and v['rounds'] == 14 and v['gain'] == pytest.approx(0)
    assert v['within'] and v['noise'] == 0 and v['allowed'] == 0.03
    s = hybrid.summary({'rows': [row]})['same_plan']
    assert (s['points'], s['over'], s['rounds']) == (1, 0, 14)
    assert hybrid.same_plan_verdict(row, 'corrected') is None   # it ran offload there
    # a table's runner slower in every one of those rounds is over
    row['same_plan']['hybrid']['rounds_ms'] = [1.05 * ms for ms in level]
    w = hybrid.same_plan_verdict(row)
    assert w['gain'] == pytest.approx(-0.05) and not w['within']
    # the twins' gap in those rounds is the floor
    row['same_plan']['local_twin']['rounds_ms'] = [1.06 * ms for ms in level]
    assert hybrid.same_plan_verdict(row)['within']
    # no table runner ran local: no extra rounds to run
    assert hybrid.same_plan_runners(_row(local=100.0, offload=150.0, best_split=90.0,
                                         hybrid=72.0)) == []


def test_results_without_rounds_have_no_paired_verdict():
    row = _row(local=100.0, offload=150.0, best_split=90.0, hybrid=72.0)
    assert hybrid.paired_verdict(row) is None
    assert hybrid.summary({'rows': [row]})['paired'] is None


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


def test_cores_are_parsed_and_pinned_for_every_thread():
    import os
    import threading
    from bench.cpulimit import CpuLimit, parse_cores, pin_cores
    assert parse_cores('0,2,4-6') == [0, 2, 4, 5, 6] and parse_cores('') == []
    before = os.sched_getaffinity(0)
    core = min(before)
    started, done = threading.Event(), threading.Event()
    thread = threading.Thread(target=lambda: (started.set(), done.wait(10)))
    thread.start()
    started.wait(10)
    try:
        pin_cores([core])
        assert os.sched_getaffinity(thread.native_id) == {core} == os.sched_getaffinity(0)
    finally:
        done.set()
        thread.join()
        pin_cores(sorted(before))
    # the kernel's smallest quota is 1 ms: a small share lengthens the period, not the share
    assert CpuLimit(0.25).period_us == 4000 and CpuLimit(0.5).period_us == 2000


def test_an_injected_plan_that_measures_no_worse_is_right_to_keep():
    used = ['offload', 'offload', 'local', 'offload', 'offload', 'local', 'offload', 'local']
    times = [20.0, 21.0, 34.0, 20.5, 22.0, 25.5, 21.0, 24.0]
    kept = hybrid.correction_summary('offload', (300, 4), used, times)
    assert kept['calls_until_dropped'] == 7 and kept['really_wrong'] is False
    assert kept['best_other_ms'] == 25.5
    dropped = hybrid.correction_summary('local', (300, 4), ['local', 'offload'] * 3 + [
        'offload'] * 4, [60.0, 20.0] * 3 + [20.0] * 4)
    assert dropped['calls_until_dropped'] == 5 and dropped['really_wrong'] is True
    assert dropped['after_ms'] == 20.0


def test_side_by_side_runs_get_cores_of_their_own():
    from bench.hybrid_cores import assign, physical_cores
    flat = assign(3, [(c,) for c in range(16)])   # enough cores: an emulator core each
    assert flat[0] == {'robot': [0], 'server': [1, 2], 'emulator': [9]}
    assert flat[2] == {'robot': [6], 'server': [7, 8], 'emulator': [11]}
    assert assign(4, [(c,) for c in range(13)])[3]['emulator'] == [12]   # too few: shared
    smt = assign(2, [(c, c + 8) for c in range(8)])   # siblings i and i + 8
    assert smt[1] == {'robot': [2], 'server': [3, 11], 'emulator': [5, 13]}
    used = [c for plan in flat for c in plan['robot'] + plan['server']]
    assert len(used) == len(set(used))
    with pytest.raises(ValueError, match='need 16 physical cores'):
        assign(5, [(c,) for c in range(8)])
    import os
    assert physical_cores(sorted(os.sched_getaffinity(0)))


def test_a_server_can_have_many_cores_and_models_can_share_a_process(tmp_path):
    from bench.hybrid_cores import assign, processes
    wide = assign(2, [(c,) for c in range(16)], server_cores=6)
    assert wide == [{'robot': [0], 'server': [1, 2, 3, 4, 5, 6], 'emulator': [14]},
                    {'robot': [7], 'server': [8, 9, 10, 11, 12, 13], 'emulator': [15]}]
    smt = assign(1, [(c, c + 8) for c in range(8)], server_cores=3)   # every thread of 3 cores
    assert smt[0] == {'robot': [0], 'server': [1, 9, 2, 10, 3, 11], 'emulator': [4, 12]}
    with pytest.raises(ValueError, match='need 17 physical cores'):
        assign(2, [(c,) for c in range(16)], server_cores=7)
    argv = ['python:bench.unseen_models:unet,resnet18+tiny_yolo', str(tmp_path),
            '--size', '240x320', '--server-cores', '6', '--calls', '7']
    (unet, rest) = processes(argv, list(range(16)))
    assert unet[0] == 'unet' and rest[0] == 'resnet18-tiny_yolo'
    cmd = rest[1]
    assert cmd[cmd.index('--models') + 1] == 'resnet18,tiny_yolo'   # one after another
    assert cmd[cmd.index('--server-cpus') + 1] == '8,9,10,11,12,13'
    assert cmd[cmd.index('--out') + 1] == str(tmp_path / 'resnet18-tiny_yolo.json')
    assert '--server-cores' not in cmd and cmd[-4:] == ['--size', '240x320', '--calls', '7']


def test_side_by_side_results_combine_into_one_run_with_each_models_cores(tmp_path):
    from bench.hybrid_cores import combine
    paths = []
    for k, name in enumerate(('unet', 'resnet18')):
        cores = {'robot_cpus': [3 * k], 'server_cpus': [3 * k + 1, 3 * k + 2],
                 'emulator_cpus': [6 + k]}
        meta = {'command': f'python -m bench.hybrid --models {name}', 'load': 0.5 + k, **cores}
        paths.append(tmp_path / f'{name}.json')
        paths[-1].write_text(json.dumps({'meta': meta, 'models': [{'model': name}]}))
    data = combine(paths, 'python -m bench.hybrid_cores unet,resnet18 OUT')
    assert [m['model'] for m in data['models']] == ['unet', 'resnet18']
    assert data['meta']['command'] == 'python -m bench.hybrid_cores unet,resnet18 OUT'
    assert data['meta']['per_model_cores']['resnet18'] == {
        'robot_cpus': [3], 'server_cpus': [4, 5], 'emulator_cpus': [7]}
    assert data['meta']['load'] == 1.5


def test_cpus_that_slow_each_other_are_read_as_one_core():
    from bench.cpu_pairs import pairs
    cpus = list(range(16))

    def measured(partner_of, targets=(0, 1)):
        return {t: {c: (1.45 if c == partner_of(t) else 1.02) for c in cpus if c != t}
                for t in targets}
    half = pairs(cpus, measured(lambda t: t + 8))     # the H200 VM's shape, if SMT
    assert half[0] == (0, 8) and half[7] == (7, 15) and len(half) == 8
    adjacent = pairs(cpus, measured(lambda t: t ^ 1))
    assert adjacent[:2] == [(0, 1), (2, 3)] and len(adjacent) == 8
    alone = {t: {c: 1.03 for c in cpus if c != t} for t in (0, 1)}   # nothing slows anything
    assert pairs(cpus, alone) == [(c,) for c in cpus]
    odd = measured(lambda t: {0: 5, 1: 9}[t])          # no pattern: not guessed
    assert pairs(cpus, odd) == [(c,) for c in cpus]


def test_measured_pairs_give_the_robot_a_core_whose_twin_only_forwards_packets(tmp_path):
    from bench.hybrid_cores import assign, processes
    cores = [(c, c + 8) for c in range(8)]
    two = assign(2, cores, server_cores=3)      # 2 x (robot + 3 server cores) = 8 cores
    assert two[0] == {'robot': [0], 'server': [1, 9, 2, 10, 3, 11], 'emulator': [8]}
    assert two[1] == {'robot': [4], 'server': [5, 13, 6, 14, 7, 15], 'emulator': [12]}
    with pytest.raises(ValueError, match='need 9 physical cores'):
        assign(2, [(c,) for c in range(8)], server_cores=3)   # no twin to put it on
    (tmp_path / 'pairs.json').write_text(json.dumps({'groups': [list(c) for c in cores]}))
    argv = ['resnet18,resnet18', str(tmp_path), '--server-cores', '3',
            '--pairs', str(tmp_path / 'pairs.json'), '--calls', '7']
    (_, first), (_, second) = processes(argv, list(range(16)))
    assert first[first.index('--server-cpus') + 1] == '1,9,2,10,3,11'
    assert second[second.index('--emulator-cpus') + 1] == '12'
    assert '--pairs' not in first and first[-2:] == ['--calls', '7']


def test_cores_only_prints_each_processs_cores_and_starts_nothing(tmp_path, monkeypatch, capsys):
    from bench import hybrid_cores
    monkeypatch.setattr(hybrid_cores.os, 'sched_getaffinity', lambda pid: set(range(16)))
    monkeypatch.setattr(hybrid_cores.subprocess, 'Popen', None)   # starting one would fail
    pairs = tmp_path / 'pairs.json'
    pairs.write_text(json.dumps({'groups': [[c] for c in range(16)]}))   # nothing shared
    argv = ['resnet18,resnet18', str(tmp_path / 'out'), '--server-cores', '6', '--pairs',
            str(pairs), '--calls', '7', '--cores-only']
    assert hybrid_cores.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ['--robot-cpus 0 --server-cpus 1,2,3,4,5,6 --emulator-cpus 14',
                     '--robot-cpus 7 --server-cpus 8,9,10,11,12,13 --emulator-cpus 15']
    assert not list((tmp_path / 'out').iterdir())


def _noisy_result(after_offload: float, slow_runner: str = '', slow: float = 0.0) -> dict:
    """Return a result of three all-local points, 60 rounds each, calls after offload slower."""
    import random
    rng = random.Random(1)
    rows = []
    for _ in range(3):
        row = {name: {'plans': {'offload' if 'offload' in name else 'local': 60},
                      'rounds_ms': [], 'rounds_after': []} for name in hybrid.MODES}
        previous = 'corrected'
        for k in range(60):
            level = 30.0 * (1 + 0.1 * math.sin(k))       # the round's speed
            order = list(hybrid.MODES)
            rng.shuffle(order)
            for name in order:
                ms = level * math.exp(rng.gauss(0, 0.05))
                ms *= 1 + after_offload * ('offload' in previous)
                ms *= 1 + slow * (name == slow_runner)
                row[name]['rounds_ms'].append(ms)
                row[name]['rounds_after'].append(previous)
                previous = name
        rows.append(row)
    return {'meta': {}, 'models': [{'model': 'net', 'rows': rows}]}


def test_the_noise_tool_finds_the_call_before_and_a_slow_runner_not_identical_ones():
    from bench import hybrid_noise
    fit = hybrid_noise.effects(hybrid_noise.calls_of(_noisy_result(0.05)))
    assert fit['after offload'][0] == pytest.approx(0.05, abs=0.015)
    for name in ('local_twin', 'best_split', 'hybrid', 'corrected'):
        value, error = fit[f'runner {name}']
        assert abs(value) < 3 * error + 0.005 and error < 0.01
    slow = hybrid_noise.effects(hybrid_noise.calls_of(_noisy_result(0.0, 'hybrid', 0.04)))
    assert slow['runner hybrid'][0] == pytest.approx(0.04, abs=0.015)
    # identical runners: the rules call them over less often with more rounds
    rounds = hybrid_noise.local_rounds(hybrid_noise.calls_of(_noisy_result(0.05)))
    assert len(rounds) == 180
    few, many = (hybrid_noise.false_over(rounds, n, 300) for n in (7, 56))
    assert few['point'] > many['point'] and few['plan'] > many['plan'] and many['plan'] < 0.05


def test_the_noise_tool_recovers_older_runs_calls_from_the_design():
    # session 13's run kept no rounds_after: the design's rows say what came before, and
    # with them the known slowdown after an offload call shows
    from bench import hybrid_noise
    path = Path(__file__).resolve().parents[1] / 'docs/results/hybrid_240_keypoint_alone_s13.json'
    calls = hybrid_noise.calls_of(json.loads(path.read_text()))
    assert len(calls) == 6 * 7 * 14
    fit = hybrid_noise.effects(calls)
    assert fit['after offload'][0] > 0.03 and fit['after offload'][1] < 0.015


def test_the_in_use_error_splits_into_the_robot_prices_part_and_the_rest():
    from bench import hybrid_noise

    def row(plan, price, in_use, median, local_rounds, **corrected):
        point = {'predicted_ms': 50.0, 'rounds_ms': local_rounds}
        return {'bandwidth_mbps': 50.0, 'rtt_ms': 4.0, 'local': point, 'local_twin': point,
                'hybrid': {'plan': plan, 'robot_cpu_ms': 48.0},
                'corrected': {'plan': plan, 'robot_factor': price, 'predicted_ms': 40.0,
                              'in_use_predicted_ms': in_use, 'median_ms': median, **corrected}}

    data = {'models': [{'model': 'net', 'calibration': {
        'measured_robot_ms': {'hybrid@9:0.50': 40.0},
        'server_compute_ms': {'offload': {'measured_ms': 10.0}}}, 'rows': [
            # local priced at 1.2 before the rounds, the robot at 1.0 in them (50 ms)
            row('local', 1.2, 48.0, 41.0, [50.0, 49.0, 51.0]),
            # a robot-bound hybrid (in use = price x offline), priced 0.9, the robot at 1.3
            row('hybrid@9:0.50', 0.9, 36.0, 50.0, [65.0, 64.0, 66.0]),
            # offload: robot work unchanged; its server 2 ms faster than calibrated
            row('offload', 1.1, 40.0, 40.0, [50.0], server_compute_ms=8.0),
            # a hybrid the numbers do not show robot-bound: not split
            row('hybrid@9:0.50', 1.2, 45.0, 50.0, [50.0])]}]}
    local, hybrid_, offload, unknown = hybrid_noise.in_use_parts(data)
    assert local['level'] == pytest.approx(1.0) and local['error'] == pytest.approx(48 / 41 - 1)
    assert local['at_level'] == pytest.approx(40 / 41 - 1)
    assert local['robot'] == pytest.approx(8 / 41)
    assert hybrid_['at_level'] == pytest.approx(1.3 * 40 / 50 - 1)
    assert hybrid_['hybrid_priced'] == pytest.approx(48 / 40 * 40 / 50 - 1)   # its robot CPU
    assert offload['robot'] == 0.0 and offload['server'] == pytest.approx(-2 / 40)
    assert unknown['at_level'] is None and unknown['robot'] is None
    assert unknown['hybrid_priced'] is None
