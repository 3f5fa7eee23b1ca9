"""Task sets, the scheduler simulation, the miss-rate proxy, NSGA-II search, strategy files."""

import copy
import dataclasses
import json

import pytest

from rrto_server import __main__ as server_main
from rrto_server import rtcalib, rtproxy, rtsearch, rttasks
from rrto_server.rtsim import Choice, simulate
from rrto_wire import strategy as strategy_file


def _profile(segments, util=0.5, jitter=0.0):
    return {'segment_ms': list(segments), 'utilisation': util, 'decode_ms': 0.2,
            'overhead_ms': 0.4, 'jitter': jitter}


def _doc():
    return {
        'storage_mb': 100, 'cpu_workers': 2, 'thetas': [0.0, 0.8],
        'tasks': [
            {'name': 'detect', 'period_ms': 10, 'deadline_ms': 6, 'miss_bound': 0.01,
             'pre_ms': 0.5, 'post_ms': 0.3, 'variants': [
                 {'name': 'det-big', 'accuracy': 0.97, 'shards': {'a': 2_000_000},
                  'profiles': {'whole': _profile([2.0]), 'block:3': _profile([0.5] * 4)}},
                 {'name': 'det-small', 'accuracy': 0.96, 'shards': {'a2': 1_000_000},
                  'profiles': {'whole': _profile([1.0]), 'block:3': _profile([0.25] * 4)}}]},
            {'name': 'scene', 'period_ms': 40, 'deadline_ms': 40, 'miss_bound': 0.05,
             'variants': [
                 {'name': 'r-big', 'accuracy': 0.98, 'shards': {'s': 30_000_000, 'h1': 20},
                  'profiles': {'whole': _profile([36.0], 0.9),
                               'block:3': _profile([1.8] * 20, 0.9)}},
                 {'name': 'r-small', 'accuracy': 0.97, 'shards': {'s': 30_000_000, 'h2': 10},
                  'profiles': {'whole': _profile([20.0], 0.7),
                               'block:3': _profile([1.0] * 20, 0.7)}}]}]}


@pytest.fixture
def ts():
    return rttasks.parse(_doc())


@pytest.mark.parametrize('path,value,words', [
    (('tasks', 0, 'deadline_ms'), 20, 'deadline_ms'),
    (('tasks', 0, 'miss_bound'), 1.5, 'miss_bound'),
    (('tasks', 0, 'variants', 0, 'profiles', 'whole', 'segment_ms'), [], 'segment_ms'),
    (('tasks', 1, 'name'), 'detect', 'unique'),
    (('tasks', 0, 'variants'), [], 'variants'),
])
def test_bad_task_sets_are_refused_naming_the_field(path, value, words):
    doc = copy.deepcopy(_doc())
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValueError, match=words):
        rttasks.parse(doc)


def test_storage_counts_shared_shards_once(ts):
    scene = ts.tasks[1]
    assert ts.storage_bytes(list(scene.variants)) == 30_000_030
    assert sum(v.storage_bytes for v in scene.variants) == 60_000_030


def test_preemption_at_segments_saves_the_urgent_task_and_the_big_variant_overloads(ts):
    whole = rtsearch.rate_monotonic(ts, rtsearch.largest, 'whole', 0.0)
    blocks = rtsearch.rate_monotonic(ts, rtsearch.largest, 'block:3', 0.0)
    assert simulate(ts, *whole, 4000)['detect']['miss_rate'] > 0.2
    result = simulate(ts, *blocks, 4000)
    assert result['detect']['miss_rate'] == 0 and result['scene']['miss_rate'] > 0.05
    small = {'detect': blocks[0]['detect'],
             'scene': Choice(ts.tasks[1].variants[1], 0, 'block:3')}
    assert all(v['miss_rate'] == 0 for v in simulate(ts, small, 0.0, 4000).values())


def test_packing_runs_a_pair_side_by_side_only_within_theta(ts):
    choices, _ = rtsearch.rate_monotonic(ts, rtsearch.largest, 'whole', 0.0)
    lone = simulate(ts, choices, 0.0, 4000)['detect']['miss_rate']
    assert simulate(ts, choices, 1.5, 4000)['detect']['miss_rate'] < lone
    assert simulate(ts, choices, 1.0, 4000) == simulate(ts, choices, 0.0, 4000) or \
        choices['detect'].profile.utilisation + choices['scene'].profile.utilisation > 1.0


def test_response_time_proof_implies_no_simulated_miss(ts):
    small = {'detect': Choice(ts.tasks[0].variants[1], 1, 'block:3'),
             'scene': Choice(ts.tasks[1].variants[1], 0, 'block:3')}
    assert rtsearch.proven(ts, small, 0.0)
    assert not rtsearch.proven(ts, small, 0.8)
    big = rtsearch.rate_monotonic(ts, rtsearch.largest, 'block:3', 0.0)[0]
    assert not rtsearch.proven(ts, big, 0.0)


def test_proxy_learns_the_simulator(ts):
    proxy = rtproxy.Proxy(trees=30)
    proxy.simulate_samples(ts, 60, 2000.0, seed=1)
    proxy.fit()
    big = rtsearch.rate_monotonic(ts, rtsearch.largest, 'block:3', 0.0)
    small = rtsearch.rate_monotonic(ts, rtsearch.smallest, 'block:3', 0.0)
    assert proxy.predict(ts, *big)['scene'] > proxy.predict(ts, *small)['scene'] + 0.1
    measured = [(big[0], big[1], {'detect': 0.5, 'scene': 0.9})]
    before = rtproxy.error(proxy, ts, measured)['mae']
    proxy.calibrate(ts, measured, weight=50)
    assert rtproxy.error(proxy, ts, measured)['mae'] < before


def test_search_meets_every_bound_where_the_largest_variants_do_not(ts, tmp_path):
    proxy = rtsearch.build_proxy(ts, 60, 2000.0, seed=0)
    found = rtsearch.search(ts, proxy, pop=16, generations=8, verify_ms=4000)
    assert all(found['simulated'][t.name] <= t.miss_bound for t in ts.tasks)
    assert found['choices']['scene'].variant.name == 'r-small'
    assert rtsearch.weighted_accuracy(ts, found['choices']) == pytest.approx(0.97, abs=0.0051)
    plan = rtsearch.to_strategy(ts, found['choices'], found['theta'])
    path = plan.save(tmp_path / 'strategy.json')
    again = rtsearch.from_strategy(ts, json.loads(path.read_text()))
    assert again == (found['choices'], found['theta'])


def test_rtplan_baseline_is_todays_planner(ts):
    choices, theta = rtsearch.with_rtplan(ts, 'block:3', 1.0)
    assert theta == 1.0 and choices['detect'].priority > choices['scene'].priority


def test_cli_writes_a_strategy_and_the_server_takes_its_theta(tmp_path):
    tasks = tmp_path / 'tasks.json'
    tasks.write_text(json.dumps(_doc()))
    out = tmp_path / 'strategy.json'
    assert rtsearch.main([str(tasks), '-o', str(out), '--samples', '30', '--pop', '12',
                          '--generations', '4', '--horizon-ms', '2000']) == 0
    plan = strategy_file.load(out)
    assert set(plan.tasks) == {'detect', 'scene'}
    config = server_main.parse_args(['--strategy', str(out)])
    assert config.pack_theta == plan.theta == max(t.theta for t in plan.tasks.values())
    assert config.task_theta == {name: t.theta for name, t in plan.tasks.items()}
    assert server_main.parse_args(['--strategy', str(out), '--pack-theta', '0.3']).pack_theta \
        == 0.3
    tasks.write_text('{"tasks": []}')
    assert rtsearch.main([str(tasks), '-o', str(out)]) == 2


@pytest.mark.parametrize('mutate,words', [
    (lambda d: d.update(format='x'), 'rrto-strategy'),
    (lambda d: d.update(theta=5), 'theta'),
    (lambda d: d['tasks']['detect'].update(theta=-1), 'theta'),
    (lambda d: d['tasks']['detect'].update(theta='high'), 'theta'),
    (lambda d: d['tasks']['detect'].update(deadline_ms=50), 'deadline_ms'),
    (lambda d: d['tasks']['detect'].pop('priority'), 'priority'),
])
def test_bad_strategy_files_are_refused(mutate, words):
    doc = strategy_file.Strategy(0.5, {'detect': strategy_file.TaskStrategy(
        'v', 2, 'block:3', 8.0, 10.0)}).to_json()
    mutate(doc)
    with pytest.raises(ValueError, match=words):
        strategy_file.parse(doc)


def test_the_interpreter_is_shared_so_fine_segments_cost_under_load(ts):
    choices = {'detect': Choice(ts.tasks[0].variants[1], 1, 'block:3'),
               'scene': Choice(ts.tasks[1].variants[1], 0, 'block:3')}
    solo = simulate(ts, choices, 0.0, 4000)
    assert solo['detect']['response_ms_p50'] <= solo['detect']['response_ms_p99']
    hosted = dataclasses.replace(ts, step_host_ms=0.3, request_host_ms=0.5)
    loaded = simulate(hosted, choices, 0.0, 4000)
    # detect's own 4 steps and scene's 20 queue on one interpreter
    assert loaded['detect']['response_ms_p99'] > solo['detect']['response_ms_p99'] + 0.5
    noisy = simulate(dataclasses.replace(ts, noise_ms=1.0), choices, 0.0, 4000)
    assert noisy['detect']['response_ms_p99'] > solo['detect']['response_ms_p99'] + 1.0
    # the response-time proof counts the interpreter time of every other task, and the noise
    assert rtsearch.proven(ts, choices, 0.0)
    assert not rtsearch.proven(dataclasses.replace(ts, step_host_ms=0.3), choices, 0.0)
    assert not rtsearch.proven(dataclasses.replace(ts, noise_ms=1.0), choices, 0.0)


def test_a_task_with_theta_zero_is_never_packed(ts):
    choices, _ = rtsearch.rate_monotonic(ts, rtsearch.largest, 'whole', 0.0)
    packed = simulate(ts, choices, 1.5, 4000)
    assert packed != simulate(ts, choices, 0.0, 4000)
    alone = dict(choices, detect=dataclasses.replace(choices['detect'], theta=0.0))
    assert simulate(ts, alone, 1.5, 4000) == simulate(ts, choices, 0.0, 4000)


def _measured_runs(ts, model, strategies, horizon=3000):
    truth = rtcalib.with_model(ts, model)
    runs = []
    for i, (choices, theta) in enumerate(strategies):
        sim = simulate(truth, choices, theta, horizon, seed=i)
        runs.append((choices, theta, {k: {key: v[key] for key in (
            'miss_rate', 'response_ms_p50', 'response_ms_p99')} for k, v in sim.items()}))
    return runs


GRID = {'step_host_ms': (0.0, 0.1, 0.2), 'request_host_ms': (0.0, 0.4),
        'noise_ms': (0.0, 0.5), 'pack_slowdown': (0.5,)}


def test_the_server_model_is_fitted_to_measured_runs_and_judged_on_held_out_ones(ts):
    strategies = [rtsearch.rate_monotonic(ts, rtsearch.largest, 'block:3', 0.0),
                  rtsearch.rate_monotonic(ts, rtsearch.smallest, 'block:3', 0.0),
                  rtsearch.rate_monotonic(ts, rtsearch.smallest, 'whole', 0.0)]
    truth = {'step_host_ms': 0.2, 'request_host_ms': 0.4, 'noise_ms': 0.5,
             'pack_slowdown': 0.5}
    runs = _measured_runs(ts, truth, strategies)
    fitted, record = rtcalib.fit(ts, runs, 3000, grid=GRID)
    assert record['loss'] < record['loss_before']
    assert record['params']['step_host_ms'] == 0.2 and record['params']['noise_ms'] == 0.5
    assert fitted.step_host_ms == 0.2
    rows = rtcalib.held_out(ts, runs, 3000, rounds=1, grid=GRID)
    assert len(rows) == 3 * len(ts.tasks) and {r['run'] for r in rows} == {0, 1, 2}
    summary = rtcalib.summary(rows)
    assert summary['n'] == len(rows) and summary['mae'] <= summary['max']


def test_margin_is_the_share_of_a_bound_the_model_missed_on_tasks_it_called_safe():
    rows = [{'bound': 0.1, 'predicted': 0.0, 'measured': 0.03},       # called safe, 0.3 of it
            {'bound': 0.01, 'predicted': 0.006, 'measured': 0.01},    # 0.4 of its bound
            {'bound': 0.01, 'predicted': 0.005, 'measured': 0.0},
            {'bound': 0.05, 'predicted': 0.4, 'measured': 0.9}]       # known unsafe: not counted
    assert rtcalib.margin(rows) == pytest.approx(0.4)
    assert rtcalib.margin(rows[2:]) == 0.0


def test_search_keeps_its_margin_below_every_bound(ts):
    proxy = rtsearch.build_proxy(ts, 40, 2000.0, seed=0)
    found = rtsearch.search(ts, proxy, pop=12, generations=5, verify_ms=3000, margin=0.5)
    assert all(found['simulated'][t.name] <= 0.5 * t.miss_bound for t in ts.tasks)
    assert found['margin'] == 0.5
    thetas = {c.theta for c in found['choices'].values()}
    assert thetas <= set(ts.thetas) and found['theta'] == max(thetas)
    with pytest.raises(ValueError, match='margin'):
        rtsearch.search(ts, proxy, pop=12, generations=3, verify_ms=2000, margin=1.5)


def test_the_bench_judges_model_and_proxy_on_a_runs_measured_files(ts, tmp_path):
    from bench import rtmdl
    strategies = [rtsearch.rate_monotonic(ts, rtsearch.largest, 'block:3', 0.0),
                  rtsearch.rate_monotonic(ts, rtsearch.smallest, 'whole', 0.0)]
    truth = {'step_host_ms': 0.1, 'request_host_ms': 0.4, 'noise_ms': 0.0,
             'pack_slowdown': 0.5}
    runs = _measured_runs(ts, truth, strategies, horizon=1500)
    (tmp_path / 'tasks.json').write_text(json.dumps(_doc()))
    (tmp_path / 'runs.json').write_text(json.dumps({f'r{i}': {
        'strategy': rtsearch.to_strategy(ts, c, th).to_json(), 'tasks': measured}
        for i, (c, th, measured) in enumerate(runs)}))
    rtsearch.to_strategy(ts, *strategies[1]).save(tmp_path / 'strategy.json')
    results = rtmdl.main(['--offline', str(tmp_path), '--out', str(tmp_path / 'out'),
                          '--samples', '20', '--pop', '8', '--generations', '2',
                          '--horizon-ms', '1000', '--fit-horizon-ms', '1000', '--margin', '0'])
    assert results['runs'] == 2 and results['model']['n'] == 2 * len(ts.tasks)
    assert isinstance(results['proxy']['same_pick'], bool) and results['proxy']['n'] == 4
    assert len(results['held_out']['rows']) == 4 and 'margin' in results['held_out']
    assert results['fit_to_all']['loss'] <= results['fit_to_all']['loss_before']
    assert json.loads((tmp_path / 'out' / 'results.json').read_text())['runs'] == 2
