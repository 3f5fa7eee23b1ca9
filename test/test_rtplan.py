"""The variant/priority planner: response times, choices under deadlines and storage."""

import json
import math
import random

import pytest

from rrto_server import rtplan
from rrto_server.rtplan import Task, Variant, plan, response_time, simulate


def _task(name, period, deadline=None, *variants, weight=1.0):
    return Task(name, period, deadline or period, tuple(variants), weight)


def test_response_time_matches_the_textbook_example():
    higher = [(1.0, 4.0), (2.0, 6.0)]
    assert response_time(3.0, 12.0, 0.0, higher) == 10.0
    assert response_time(3.0, 12.0, 1.0, higher) == 11.0       # one blocking segment
    assert math.isinf(response_time(3.0, 8.0, 0.0, higher))


def test_feasible_set_gets_deadline_monotonic_priorities_and_no_simulated_miss():
    tasks = [_task('slow', 100, 90, Variant('a', 20, 0.7, 40, segment_ms=2)),
             _task('fast', 33, 20, Variant('b', 4, 0.6, 10)),
             _task('mid', 50, 50, Variant('c', 10, 0.5, 20, segment_ms=2))]
    result = plan(tasks)
    assert result.misses == []
    assert result.response_ms['fast'] == 2 + 4          # one blocking segment, no interference
    unsegmented = [tasks[0], tasks[1], _task('mid', 50, 50, Variant('c', 10, 0.5, 20))]
    assert plan(unsegmented).response_ms['fast'] == 10 + 4
    assert result.priorities['fast'] > result.priorities['mid'] > result.priorities['slow']
    simulated = simulate(tasks, result, horizon_ms=3000)
    for task in tasks:
        assert simulated[task.name]['misses'] == 0
        assert simulated[task.name]['max_response_ms'] <= result.response_ms[task.name] + 1e-9


def test_accurate_variant_is_chosen_only_when_it_keeps_deadlines():
    detector = _task('detect', 33, 15, Variant('small', 3, 0.60, 10),
                     Variant('large', 9, 0.75, 60))
    mapping = _task('mapping', 100, 100, Variant('r18', 30, 0.7, 45, segment_ms=3))
    loose = plan([detector, mapping])
    assert loose.variants['detect'].name == 'large' and loose.misses == []
    tight = _task('detect', 33, 8, *detector.variants)
    strict = plan([tight, mapping])
    assert strict.variants['detect'].name == 'small' and strict.misses == []


def test_storage_budget_limits_the_variants():
    tasks = [_task('a', 50, None, Variant('a-big', 5, 0.9, 100), Variant('a-small', 4, 0.8, 30)),
             _task('b', 50, None, Variant('b-big', 5, 0.9, 100), Variant('b-small', 4, 0.8, 30))]
    assert plan(tasks).storage_mb == 200
    budget = plan(tasks, storage_mb=130)
    assert budget.storage_mb == 130 and budget.accuracy == pytest.approx(1.7)
    with pytest.raises(ValueError, match='storage budget'):
        plan(tasks, storage_mb=50)


def test_segmented_variant_removes_the_blocking_that_breaks_a_deadline():
    urgent = _task('urgent', 20, 6, Variant('k', 2, 0.5, 5))
    whole = Variant('r18-whole', 12, 0.7, 45)
    segmented = Variant('r18-block3', 13, 0.7, 45, segment_ms=1.5)   # a little overhead
    background = _task('mapping', 200, 200, whole, segmented)
    result = plan([urgent, background])
    assert result.variants['mapping'] is segmented and result.misses == []
    forced = plan([urgent, _task('mapping', 200, 200, whole)])
    assert forced.misses == ['urgent'] or 'urgent' in forced.misses


def test_overload_minimises_the_number_of_missing_tasks():
    tasks = [_task('a', 10, None, Variant('a1', 6, 0.9, 1), Variant('a0', 3, 0.5, 1)),
             _task('b', 10, None, Variant('b1', 6, 0.9, 1), Variant('b0', 3, 0.5, 1)),
             _task('c', 10, None, Variant('c1', 8, 0.9, 1, segment_ms=1))]
    result = plan(tasks)
    assert result.misses == ['c']
    # both accurate variants cannot meet their deadlines together; one of them can
    assert sorted(v.name for v in result.variants.values()) in (['a0', 'b1', 'c1'],
                                                                ['a1', 'b0', 'c1'])
    assert result.accuracy == pytest.approx(0.9 + 0.5 + 0.9)
    assert simulate(tasks, result, horizon_ms=200)[result.misses[0]]['misses'] > 0


def test_greedy_search_agrees_with_exhaustive_search_on_misses():
    rng = random.Random(3)
    for _ in range(20):
        tasks = []
        for i in range(4):
            period = rng.choice([20, 33, 50, 100])
            variants = tuple(Variant(f't{i}v{j}', rng.uniform(1, period / 3), rng.random(),
                                     rng.uniform(5, 50), rng.choice([None, 1.0, 2.0]))
                             for j in range(3))
            tasks.append(Task(f't{i}', period, period * rng.uniform(0.5, 1.0), variants))
        exhaustive = plan(tasks)
        greedy = plan(tasks, max_combinations=1)
        assert len(greedy.misses) <= len(exhaustive.misses) + 1
        assert len(exhaustive.misses) <= len(greedy.misses)


def test_plans_without_predicted_misses_never_miss_in_simulation():
    rng = random.Random(7)
    checked = 0
    for _ in range(60):
        tasks = []
        for i in range(rng.randint(2, 5)):
            period = rng.choice([10, 20, 25, 40, 50, 100])
            latency = rng.uniform(0.5, period / 2)
            tasks.append(Task(f't{i}', period, period * rng.uniform(0.6, 1.0), (
                Variant('v', latency, 1.0, 1.0, rng.choice([None, latency / 4])),)))
        result = plan(tasks)
        if result.misses:
            continue
        checked += 1
        for name, entry in simulate(tasks, result, horizon_ms=2000).items():
            assert entry['misses'] == 0, (tasks, result)
            assert entry['max_response_ms'] <= result.response_ms[name] + 1e-6
    assert checked > 10


def test_command_line_prints_a_plan(tmp_path, capsys):
    doc = [{'name': 'detect', 'period_ms': 33, 'deadline_ms': 20,
            'variants': [{'name': 'small', 'latency_ms': 3, 'accuracy': 0.6, 'size_mb': 10}]},
           {'name': 'map', 'period_ms': 100,
            'variants': [{'name': 'r18', 'latency_ms': 30, 'accuracy': 0.7, 'size_mb': 45,
                          'segment_ms': 3}]}]
    path = tmp_path / 'tasks.json'
    path.write_text(json.dumps(doc))
    assert rtplan.main([str(path), '--storage-mb', '100']) == 0
    out = json.loads(capsys.readouterr().out)
    assert out['plan']['priorities']['detect'] > out['plan']['priorities']['map']
    assert out['simulated']['detect']['misses'] == 0
    path.write_text('[{"name": "x", "period_ms": 10, "variants": []}]')
    assert rtplan.main([str(path)]) == 2
