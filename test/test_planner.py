"""Cost model, differential evolution, plan tables, and plans executed through a real server."""

import json
import math
import statistics
import time

import pytest
import torch

from rrto_ros import OffloadResult
from rrto_ros.graph import GraphAnalysis
from rrto_ros.latency import parse_values, record_values
from rrto_ros.local_model import TorchModule
from rrto_ros.plan_cli import main as plan_main
from rrto_ros.plan_table import PlanSelector, PlanTable, PlanTableMismatch, program_key
from rrto_ros.planner import CostModel, Link, Profiles, optimise
from rrto_ros.preprocess import WithImageInput
from rrto_ros.split import Plan, as_program
from rrto_ros.zoo import keypoint_net
from rrto_wire import treespec

SHAPE = (1, 64, 48, 3)


@pytest.fixture(scope='module')
def prepared():
    model = WithImageInput(keypoint_net()).eval()
    x = torch.randint(0, 256, SHAPE, dtype=torch.uint8)
    flat, spec = treespec.flatten(((x,), {}))
    artifact = TorchModule(model).artifact(flat, spec)
    program = as_program(artifact.program)
    weights = artifact.weights()
    analysis = GraphAnalysis(program, {k: v.shape for k, v in weights.items()})
    return model, x, artifact, analysis


def _cost(analysis, robot_ms=1.0, server_ms=0.25, **io):
    nodes = [n.name for n in analysis.program.nodes]
    profiles = Profiles({n: robot_ms for n in nodes}, {n: server_ms for n in nodes},
                        call_overhead_ms=0.3, **io)
    return CostModel(analysis, profiles)


def test_extreme_links_pick_the_obvious_plans(prepared):
    cost = _cost(prepared[3])
    assert optimise(cost, Link(0.1, 50)).plan == Plan('local')
    assert optimise(cost, Link(100000, 0.01)).plan.kind in ('offload', 'hybrid')
    assert optimise(cost, Link(100000, 0.01)).estimate.latency_ms < cost.estimate(
        Plan('local'), Link(1, 1)).latency_ms / 2


@pytest.mark.parametrize('bandwidth', [1, 5, 20, 50, 100, 300, 1000])
@pytest.mark.parametrize('rtt', [1, 10, 40])
def test_differential_evolution_never_loses_to_the_baselines(prepared, bandwidth, rtt):
    cost = _cost(prepared[3], robot_ms=0.8, server_ms=0.2)
    solution = optimise(cost, Link(bandwidth, rtt), maxiter=15, popsize=6)
    for _, estimate in solution.baselines.values():
        assert solution.estimate.latency_ms <= estimate.latency_ms + 1e-9
    assert solution.evaluations > 0 and solution.solve_s > 0


def test_hybrid_overlaps_robot_compute_with_the_round_trip(prepared):
    cost = _cost(prepared[3], robot_ms=1.0, server_ms=1.0)
    cut = cost.cuts[-1]
    link = Link(1e6, 0.0)
    half = cost.estimate(Plan('hybrid', cut, 0.5), link)
    local = cost.estimate(Plan('local'), link)
    # equal speeds, free link: half the rows each (plus halo) beats doing all the rows alone
    assert half.latency_ms < 0.8 * local.latency_ms
    assert half.robot_compute_ms < local.robot_compute_ms
    assert half.bytes_up > 0 and half.bytes_down > 0


def test_energy_counts_compute_radio_and_idle(prepared):
    cost = _cost(prepared[3])
    link = Link(10, 10)
    local, offload = cost.estimate(Plan('local'), link), cost.estimate(Plan('offload'), link)
    assert local.bytes_up == 0 and offload.robot_compute_ms == 0
    assert local.energy_j == pytest.approx(cost.power.compute_w * local.latency_ms / 1e3
                                           + cost.power.idle_w * local.latency_ms / 1e3)
    assert offload.energy_j > cost.power.idle_w * offload.latency_ms / 1e3


def _table(artifact, analysis, entries):
    inputs = [spec.to_json() for spec in artifact.signature]
    return PlanTable(program_key(artifact), 'kp', inputs, entries, {}, {})


def test_plan_table_lookup_and_hysteresis(prepared, tmp_path):
    _, _, artifact, analysis = prepared
    cut = analysis.cut_candidates()[-1]
    slow = Plan('hybrid', cut, 0.75).to_json()
    entries = [{'bandwidth_mbps': 5, 'rtt_ms': 10, 'plan': Plan('local').to_json()},
               {'bandwidth_mbps': 20, 'rtt_ms': 10, 'plan': slow},
               {'bandwidth_mbps': 100, 'rtt_ms': 10, 'plan': Plan('offload').to_json()}]
    path = tmp_path / 'plans.json'
    _table(artifact, analysis, entries).save(path)
    table = PlanTable.load(path)
    assert table.lookup(4, 12)[0] == Plan('local')
    assert table.lookup(25, 3)[0] == Plan.from_json(slow)
    assert table.lookup(1000, 10)[0] == Plan('offload')
    selector = PlanSelector(table, switch_after=3)
    assert selector.choose(5, 10) == Plan('local')
    assert [selector.choose(100, 10).kind for _ in range(3)] == ['local', 'local', 'offload']
    assert selector.choose(5, 10).kind == 'offload' and selector.switches == 1
    for bad in ({'format': 'other'}, {'format': 'rrto-plan-table', 'version': 9}):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=str(path)):
            PlanTable.load(path)


def test_plans_run_through_the_server_and_switch_between_calls(prepared, server, offloaded):
    model, x, artifact, analysis = prepared
    cut = analysis.cut_candidates()[-1]
    mid = analysis.cut_candidates()[len(analysis.cut_candidates()) // 2]
    entries = [{'bandwidth_mbps': 5, 'rtt_ms': 5, 'plan': Plan('hybrid', cut, 0.6).to_json()},
               {'bandwidth_mbps': 50, 'rtt_ms': 5, 'plan': Plan('split', mid).to_json()},
               {'bandwidth_mbps': 500, 'rtt_ms': 5, 'plan': Plan('offload').to_json()}]
    om = offloaded(model, server.endpoint, timeout_ms=30000, switch_after=2, link=(5, 5),
                   plan_table=_table(artifact, analysis, entries), plan_feedback=False)
    assert om.warmup(x)
    with torch.inference_mode():
        expected = model(x)
    seen = []
    for bandwidth in [5, 5, 500, 500, 500, 50, 50, 50, 5, 5]:
        om.set_link(bandwidth, 5)
        before = om.stats()['infer_round_trips']
        out = om(x)
        assert om.last.result == OffloadResult.OFFLOADED, om.last.reason
        assert om.stats()['infer_round_trips'] - before == 1
        seen.append(om.last.plan)
        if om.last.plan != 'offload':   # the robot computed its part: it is in the record
            assert om.last.robot_compute_ms > 0
        for key in expected:
            torch.testing.assert_close(out[key], expected[key], rtol=1e-5,
                                       atol=1e-5 * float(expected[key].abs().max()))
    hybrid, split = Plan('hybrid', cut, 0.6).name, Plan('split', mid).name
    assert seen == [hybrid, hybrid, hybrid, 'offload', 'offload', 'offload', split, split,
                    split, hybrid]
    assert om.stats()['plan_switches'] == 3


def test_a_table_for_another_program_is_an_error_the_user_sees(prepared, server, offloaded):
    model, x, artifact, analysis = prepared
    entries = [{'bandwidth_mbps': 5, 'rtt_ms': 5, 'plan': Plan('local').to_json()}]
    other = PlanTable('0' * 64, 'other', _table(artifact, analysis, []).inputs, entries, {}, {})
    with pytest.raises(PlanTableMismatch, match='solved for program 000000000000'):
        offloaded(model, server.endpoint, plan_table=other)
    om = offloaded(model, server.endpoint, timeout_ms=30000)
    with pytest.raises(PlanTableMismatch):
        om.set_plan_table(other)
    assert om.table is None
    wider = dict(other.inputs[0], shape=[1, 64, 64, 3])   # the right network, another frame size
    table = PlanTable(program_key(artifact), 'kp', [wider], entries, {}, {})
    with pytest.raises(PlanTableMismatch):
        om.set_plan_table(table)


def test_plan_cli_table_binds_to_the_wrapped_module_as_the_readme_writes_it(
        tmp_path, capsys, server, offloaded):
    out = tmp_path / 'kp.json'
    rc = plan_main(['--model', 'python:rrto_ros.zoo:keypoint_net', '--image-input',
                    '--input-shape', ','.join(map(str, SHAPE)), '--server-speedup', '4',
                    '--bandwidths', '5,300', '--rtts', '2', '--repeats', '1', '--robot-span', '1',
                    '--out', str(out)])
    assert rc == 0
    table = PlanTable.load(out)
    assert len(table.entries) == 2 and table.solve_s > 0
    assert table.profiles['robot_ms'] and 'estimated' in table.profiles['server']
    assert 'solve time' in capsys.readouterr().out
    # another label (WithImageInput) for the same program: the table is used, not detached
    om = offloaded(WithImageInput(keypoint_net()), server.endpoint, timeout_ms=30000,
                   plan_table=str(out), link=(5, 2))
    assert om.table is not None and om.table.program == table.program


def test_same_profiles_give_the_same_table(prepared):
    solutions = []
    for _ in range(2):
        cost = _cost(prepared[3], robot_ms=0.9, server_ms=0.3, up_ms_per_mb=2.0,
                     down_ms_per_mb=1.0)
        solutions.append([optimise(cost, Link(b, 4)).plan for b in (5, 20, 50, 100, 300)])
    assert solutions[0] == solutions[1]
    assert all(round(p.ratio / 0.05, 6).is_integer() for p in solutions[0])


def test_contention_with_the_transfer_slows_the_robot_band(prepared):
    shared = _cost(prepared[3], 1.0, 0.1, up_ms_per_mb=400.0, contention=1.0)
    own_core = _cost(prepared[3], 1.0, 0.1, up_ms_per_mb=400.0, contention=0.0)
    link = Link(1e6, 0.0)
    plan = Plan('hybrid', shared.cuts[-1], 0.5)
    send, _ = shared.io_ms(shared.estimate(plan, link).bytes_up, 0)
    assert send > 0
    slowed = shared.estimate(plan, link).latency_ms - own_core.estimate(plan, link).latency_ms
    assert slowed > 0.5 * send
    # a whole offload pays the robot's cost of sending the frame on the critical path
    assert (shared.estimate(Plan('offload'), link).latency_ms
            - _cost(prepared[3], 1.0, 0.1).estimate(Plan('offload'), link).latency_ms
            == pytest.approx(shared.io_ms(shared.in_bytes, 0)[0]))


def test_calibration_corrects_a_plan_and_reports_its_error(prepared):
    cost = _cost(prepared[3])
    link = Link(1e6, 0.0)
    predicted = cost.estimate(Plan('offload'), link).latency_ms
    error = cost.calibrate(Plan('offload'), link, [predicted * f for f in (1.2, 1.25, 1.3)])
    assert error == pytest.approx(1 / 1.25 - 1)
    assert cost.estimate(Plan('offload'), link).latency_ms == pytest.approx(predicted * 1.25)
    assert cost.estimate(Plan('offload'), Link(10, 5)).latency_ms > predicted * 1.25
    # a gap within the spread of the measurements is noise: reported, not corrected
    local = cost.estimate(Plan('local'), link).latency_ms
    error = cost.calibrate(Plan('local'), link, [local * f for f in (0.6, 0.9, 1.2, 1.5)])
    assert error == pytest.approx(1 / 1.05 - 1)
    assert cost.estimate(Plan('local'), link).latency_ms == pytest.approx(local)


class SlowLocal(TorchModule):
    """A robot whose local inference is 60 ms slower than the table believes."""

    def run(self, args, kwargs):
        time.sleep(0.06)
        return super().run(args, kwargs)


def test_a_wrong_table_stops_being_used_within_20_inferences(prepared, server, offloaded):
    model, x, artifact, analysis = prepared
    slow = SlowLocal(model)
    entries = [{'bandwidth_mbps': 50, 'rtt_ms': 5, 'plan': Plan('local').to_json(),
                'predicted': {'latency_ms': 1.0},
                'baselines': {'local': {'plan': Plan('local').to_json(),
                                        'predicted': {'latency_ms': 1.0}},
                              'offload': {'plan': Plan('offload').to_json(),
                                          'predicted': {'latency_ms': 1.2}}}}]
    om = offloaded(slow, server.endpoint, timeout_ms=30000, plan_table=_table(
        artifact, analysis, entries), link=(50, 5), switch_after=2)
    assert om.warmup(x)
    plans = []
    for _ in range(30):
        om(x)
        plans.append(om.last.plan)
    assert plans[0] == 'local'
    last_local = max(i for i, p in enumerate(plans) if p == 'local')
    assert last_local < 20, plans
    assert plans[20:] == ['offload'] * 10


def test_a_hybrid_call_prices_the_robot_by_its_robot_compute(prepared, server, offloaded):
    # the engine hands each offloaded call's robot compute to the table's price: a hybrid in
    # use measures the robot's speed on every call, not only local explorations (session 14)
    model, x, artifact, analysis = prepared
    hybrid = Plan('hybrid', analysis.cut_candidates()[-1], 0.6)
    far = {'latency_ms': 1e4, 'robot_compute_ms': 1e4}   # no baseline plausible: no exploring
    entries = [{'bandwidth_mbps': 50, 'rtt_ms': 5, 'plan': hybrid.to_json(),
                'predicted': {'latency_ms': 600.0, 'robot_compute_ms': 5e3},
                'baselines': {'local': {'plan': Plan('local').to_json(), 'predicted': far},
                              'offload': {'plan': Plan('offload').to_json(),
                                          'predicted': dict(far, robot_compute_ms=1.0)}}}]
    om = offloaded(model, server.endpoint, timeout_ms=30000, link=(50, 5), switch_after=1,
                   plan_table=_table(artifact, analysis, entries))
    assert om.warmup(x)
    om(x)
    assert om.last.plan == hybrid.name and om.last.result == OffloadResult.OFFLOADED
    price = om.preparer.target(*treespec.flatten(((x,), {}))).selector.feedback.price
    assert price.factor() == pytest.approx(om.last.robot_compute_ms / 5e3)


def test_each_call_reports_the_tables_prediction_made_before_it_ran(
        prepared, server, offloaded):
    # the record (and /rrto/latency) carries the prediction of the plan the call ran, at the
    # robot's price held before the call: from the calls before it, never from its own time
    model, x, artifact, analysis = prepared
    far = {'latency_ms': 1e4, 'robot_compute_ms': 1.0}   # offload never plausible: no exploring
    local = {'latency_ms': 2.0, 'robot_compute_ms': 2.0}
    entries = [{'bandwidth_mbps': 50, 'rtt_ms': 5, 'plan': Plan('local').to_json(),
                'predicted': local,
                'baselines': {'local': {'plan': Plan('local').to_json(), 'predicted': local},
                              'offload': {'plan': Plan('offload').to_json(), 'predicted': far}}}]
    om = offloaded(model, server.endpoint, timeout_ms=30000, link=(50, 5), switch_after=1,
                   plan_table=_table(artifact, analysis, entries))
    assert om.warmup(x)
    totals, predicted = [], []
    for _ in range(4):
        om(x)
        assert om.last.plan == 'local'
        totals.append(om.last.total_ms)
        predicted.append(om.last.predicted_ms)
    assert predicted[0] == 2.0   # as solved: no call had timed the robot
    for n in (1, 2, 3):   # local at the price of the calls before: their median time
        assert predicted[n] == pytest.approx(statistics.median(totals[:n]))
    values = parse_values(record_values(om.last, task='t', server='s', stamp='0.000000000',
                                        preprocess_ms=0, age_ms=0))
    assert values['predicted_ms'] == pytest.approx(predicted[-1], abs=1e-3)
    plain = offloaded(model, server.endpoint, timeout_ms=30000, mode='local')
    plain(x)
    assert plain.last.predicted_ms == 0.0   # no table: no prediction
    assert math.isnan(parse_values(record_values(plain.last, task='t', server='s',
                                                 stamp='0.000000000', preprocess_ms=0,
                                                 age_ms=0))['predicted_ms'])


def test_without_feedback_the_table_is_followed(prepared, server, offloaded):
    model, x, artifact, analysis = prepared
    entries = [{'bandwidth_mbps': 50, 'rtt_ms': 5, 'plan': Plan('local').to_json()}]
    om = offloaded(SlowLocal(model), server.endpoint, timeout_ms=30000, link=(50, 5),
                   plan_table=_table(artifact, analysis, entries), plan_feedback=False)
    assert om.warmup(x)
    for _ in range(8):
        om(x)
        assert om.last.plan == 'local'


def test_refine_keeps_a_plan_only_if_its_measured_robot_side_still_wins(prepared):
    from rrto_ros.plan_solve import refine
    cost = _cost(prepared[3], robot_ms=1.0, server_ms=1.0)
    link = Link(1e6, 0.0)   # equal speeds, free link: splitting the rows pays
    solution = optimise(cost, link)
    assert solution.plan.kind == 'hybrid'
    kept = refine(cost, [solution], {solution.plan.name: solution.estimate.robot_compute_ms})
    assert kept[0].plan == solution.plan
    slow = refine(cost, [solution], {solution.plan.name: 1e6})   # measured: far too slow
    best = min(e.latency_ms for _, e in cost.baselines(link).values())
    assert slow[0].plan.kind in ('local', 'offload', 'split')
    assert slow[0].estimate.latency_ms == best


def test_the_robot_side_of_a_plan_runs_the_whole_inference_with_the_servers_part_done(prepared):
    # what plan_profile times round by round: the robot's slicing, band, merge and rest,
    # with the server's tensors computed beforehand; its outputs are the model's
    from rrto_ros.hybrid import PlanRuntime
    model, x, artifact, analysis = prepared
    weights = artifact.weights()
    cut = analysis.cut_candidates()[-1]
    runtime = PlanRuntime(analysis.program, analysis, weights, Plan('hybrid', cut, 0.5))
    outputs = runtime.robot_side([x], weights)()
    expected = treespec.flatten(model(x))[0]
    assert len(outputs) == len(expected)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outputs, expected))
    assert runtime.last_robot_ms > 0


def test_a_hybrid_correction_moves_only_the_side_that_bound_the_measurement(prepared):
    cost, fresh = _cost(prepared[3], 1.0, 0.05), _cost(prepared[3], 1.0, 0.05)
    plan = Plan('hybrid', cost.cuts[-1], 0.5)
    fast, slow = Link(1e6, 0.0), Link(1.0, 20.0)
    predicted = cost.estimate(plan, fast)
    assert predicted.busy_ms > predicted.remote_ms   # a free link: the robot's band binds
    error = cost.calibrate(plan, fast, [predicted.latency_ms + d for d in (19.0, 20.0, 21.0)])
    assert error < 0 and cost.correction_sides[plan.name] == 'robot'
    assert cost.estimate(plan, fast).latency_ms == pytest.approx(predicted.latency_ms + 20.0)
    # the estimate says how much of its robot band is that correction (what prices the robot)
    assert cost.estimate(plan, fast).robot_correction_ms == pytest.approx(20.0)
    assert predicted.robot_correction_ms == 0.0
    # on a slow link the robot waits for the server anyway: its band's error costs nothing
    waiting = fresh.estimate(plan, slow)
    assert waiting.remote_ms > waiting.busy_ms + 20.0
    assert cost.estimate(plan, slow).latency_ms == pytest.approx(waiting.latency_ms)
    # a gap on the server's side (the round trip binds) moves the round trip
    cost.calibrate(plan, slow, [waiting.latency_ms + d for d in (9.0, 10.0, 11.0)])
    assert cost.correction_sides[plan.name] == 'remote'
    assert cost.estimate(plan, slow).latency_ms == pytest.approx(waiting.latency_ms + 10.0)
    assert cost.estimate(plan, slow).robot_correction_ms == 0.0


def test_a_solve_against_a_server_measures_the_robot_side_of_its_candidates(
        prepared, server, monkeypatch):
    from rrto_ros import plan_profile, plan_solve
    model, x, _, _ = prepared
    timed = []
    original = plan_profile.measure_plans

    def measure_plans(model, program, analysis, weights, x, plans, repeats, clock):
        measured = original(model, program, analysis, weights, x, plans, repeats, clock)
        timed.append((list(plans), measured))
        return measured

    monkeypatch.setattr(plan_profile, 'measure_plans', measure_plans)
    links = [Link(b, 4.0) for b in (2, 20, 100, 1000)]
    solved = plan_solve.solve(TorchModule(model), x, links, server.endpoint, repeats=1,
                              rounds=1, robot_span_s=0.5)
    # the candidates first; a second calibration pass (when the corrected model prefers a
    # plan not yet timed end to end, which depends on this machine's timings) adds its own
    assert timed
    measured = {}
    # every pass's robot sides are priced at the robot's level over the whole solve
    clock = solved.table.calibration['robot_clock']
    level = clock['level_ms']
    assert clock['span_s'] >= 0.5
    assert len(clock['samples']) >= 1 + len(solved.table.calibration['samples']['~robot'])
    for plans, robot in timed:
        assert set(robot.ms) == {p.name for p in plans if p.kind in ('split', 'hybrid')}
        measured.update({n: ms * level / robot.reference_ms for n, ms in robot.ms.items()})
    assert solved.table.calibration['measured_robot_ms'] == pytest.approx(measured)
    assert {n: solved.cost.measured_robot_ms[n] for n in measured} == pytest.approx(measured)
    local = solved.cost.estimate(Plan('local'), Link(1e6, 0.0))
    assert solved.table.calibration['robot_reference_ms'] == pytest.approx(level)
    assert solved.cost.profiles.robot_ms == solved.table.profiles['robot_ms']
    assert local.robot_compute_ms == pytest.approx(level)
    assert set(solved.errors) >= {'local', 'offload'}   # and still timed end to end
    # every call's server compute time is kept, and the model uses it for that plan
    calibration = solved.table.calibration
    server = calibration['server_compute_ms']['offload']
    assert server['measured_ms'] > 0 and server['modelled_ms'] > 0
    assert solved.cost.measured_server_ms['offload'] == server['measured_ms']
    assert all(t[1] > 0 for t in calibration['samples']['offload'])
    assert all(t[1] == 0 for t in calibration['samples']['local'])


def test_the_server_time_each_call_reported_moves_the_server_side(prepared):
    cost, fresh = _cost(prepared[3], 1.0, 0.05), _cost(prepared[3], 1.0, 0.05)
    plan = Plan('hybrid', cost.cuts[-1], 0.5)
    fast, slow = Link(1e6, 0.0), Link(1.0, 20.0)
    before = cost.estimate(plan, fast)
    assert before.busy_ms > before.remote_ms   # the model: the robot's band binds here
    suffix = before.latency_ms - before.busy_ms
    # the server took 30 ms more than its profile says: its round trip binds after all
    total = before.remote_ms + 30.0 + suffix
    server = before.server_compute_ms + 30.0
    error = cost.calibrate(plan, fast, [total - 1, total, total + 1], [server] * 3)
    assert error == pytest.approx((before.latency_ms - total) / total)
    assert plan.name not in cost.corrections   # the measured server time explains the gap
    assert cost.estimate(plan, fast).latency_ms == pytest.approx(total)
    # on a slow link the round trip binds anyway: the server's 30 ms are on it there too
    # (a correction of the total on the side that bound at the fast link would miss them)
    waiting = fresh.estimate(plan, slow)
    assert cost.estimate(plan, slow).latency_ms == pytest.approx(waiting.latency_ms + 30.0)
    assert cost.estimate(plan, slow).server_compute_ms == pytest.approx(server)
    offload = cost.estimate(Plan('offload'), slow)
    cost.calibrate(Plan('offload'), fast, [1e3] * 3, [offload.server_compute_ms + 5.0] * 3)
    assert cost.estimate(Plan('offload'), Link(1e6, 0.0)).server_compute_ms == pytest.approx(
        offload.server_compute_ms + 5.0)


def test_plan_cli_names_the_link_it_calibrates_over(tmp_path, server):
    out = tmp_path / 'kp.json'
    assert plan_main(['--model', 'python:rrto_ros.zoo:keypoint_net', '--image-input',
                      '--input-shape', ','.join(map(str, SHAPE)), '--server', server.endpoint,
                      '--link', '300,4', '--bandwidths', '300', '--rtts', '4',
                      '--repeats', '1', '--robot-span', '1', '--out', str(out)]) == 0
    calibration = PlanTable.load(out).calibration
    assert calibration['link'] == {'bandwidth_mbps': 300.0, 'rtt_ms': 4.0}
    assert calibration['server_compute_ms']['offload']['measured_ms'] > 0
    with pytest.raises(SystemExit):
        plan_main(['--model', 'x', '--link', '300', '--out', str(out)])


def test_the_per_call_overhead_leaves_out_the_calibration_links_own_time(
        prepared, server):
    from rrto_ros import plan_solve
    model, x, _, _ = prepared
    module = TorchModule(model)
    prepared_model = plan_solve.prepare(module, x)
    fast, _ = plan_solve.profile(module, x, prepared_model, server.endpoint, 1)
    assert fast.call_overhead_ms > 0
    # a link of 1 s RTT explains the whole overhead measured on this loopback: nothing is left
    slow, _ = plan_solve.profile(module, x, prepared_model, server.endpoint, 1,
                                 link=Link(1e6, 1000.0))
    assert slow.call_overhead_ms == 0


def test_the_margin_comes_from_held_out_error_not_from_a_bias_the_correction_removes(
        prepared, server, monkeypatch):
    from rrto_ros import plan_calibrate, plan_profile, plan_solve
    model, x, _, analysis = prepared
    cost = _cost(analysis)
    link = Link(1e6, 0.0)
    local, offload = Plan('local'), Plan('offload')
    biased = {p.name: [cost.estimate(p, link).latency_ms * 1.3 * f
                       for f in (0.99, 1.01, 1.0, 1.0, 1.01, 0.99)] for p in (local, offload)}
    biased = {name: [plan_profile.Timed(ms) for ms in times] for name, times in biased.items()}
    held = plan_calibrate.held_out_errors(cost, [local, offload], biased, link)
    assert max(abs(e) for e in held.values()) < 0.02   # 30 % off, but consistently
    noisy = {'local': [plan_profile.Timed(cost.estimate(local, link).latency_ms * f)
                       for f in (0.7, 1.3, 0.7, 1.3, 0.7, 1.3)]}
    assert abs(plan_calibrate.held_out_errors(cost, [local], noisy, link)['local']) > 0.2
    # the whole solve: end-to-end times far from the model, but consistent between rounds

    def measure_end_to_end(model, endpoint, table, x, plans, rounds, first=0, clock=None):
        return {p.name: [plan_profile.Timed(100.0 * (i + 1) * f)
                         for f in (0.99, 1.01, 1.0, 1.0, 1.01, 0.99)]
                for i, p in enumerate(plans)}

    monkeypatch.setattr(plan_profile, 'measure_end_to_end', measure_end_to_end)
    solved = plan_solve.solve(TorchModule(model), x, [Link(20, 4.0)], server.endpoint,
                              repeats=1, rounds=6, robot_span_s=0.0)
    assert plan_calibrate.margin_from(solved.errors.values()) > 0.05   # the biased errors
    assert solved.table.margin == plan_calibrate.MARGIN_BOUNDS[0]
    assert set(solved.table.calibration['held_out_errors']) == set(solved.errors)


def test_a_plan_chosen_only_after_calibration_is_timed_end_to_end_too(
        prepared, server, monkeypatch):
    from rrto_ros import plan_profile, plan_solve
    model, x, _, _ = prepared
    calls = []

    def measure_end_to_end(model, endpoint, table, x, plans, rounds, first=0, clock=None):
        # local 50 ms, offload 500 ms, every split or hybrid timed 1 s: far from the model,
        # so after the correction the model prefers a split it has not timed yet
        calls.append([p.name for p in plans])
        slow = {'local': 50.0, 'offload': 500.0}
        return {p.name: [plan_profile.Timed(slow.get(p.name, 1000.0), 0.0)] * rounds
                for p in plans}

    monkeypatch.setattr(plan_profile, 'measure_end_to_end', measure_end_to_end)
    solved = plan_solve.solve(TorchModule(model), x, [Link(20, 4.0)], server.endpoint,
                              repeats=1, rounds=2, robot_span_s=0.0)
    assert len(calls) >= 2
    first, second = set(calls[0]), set(calls[1])
    assert second - first and {'local', 'offload'} <= second   # new plans, beside anchors
    measured = solved.table.calibration['measured_ms']
    assert all(measured[name] == 1000.0 for name in second - first)


def _rounds(times, server_ms=0.0):
    from rrto_ros.plan_profile import Timed
    return [Timed(ms, server_ms, i) for i, ms in enumerate(times)]


def test_the_margin_comes_from_each_plans_ratio_to_the_best_baseline_round_by_round(prepared):
    from rrto_ros import plan_calibrate
    cost = _cost(prepared[3])
    link = Link(1e6, 0.0)
    plans = [Plan('local'), Plan('offload'), Plan('split', cost.cuts[1])]
    drift = (0.7, 1.3, 0.7, 1.3, 0.7, 1.3, 0.7, 1.3)   # the machine's speed, round by round
    predicted = {p.name: cost.estimate(p, link).latency_ms for p in plans}
    samples = {name: _rounds([ms * 1.2 * d for d in drift]) for name, ms in predicted.items()}
    result = plan_calibrate.calibrate_plans(cost, plans, samples, link, 0.0, {'local', 'offload'})
    # each plan alone: the drift makes its held-out error ~30 %; its ratio to the best
    # baseline in the same round never moves, and the corrected model predicts it
    assert min(abs(e) for e in result.held_out.values()) > 0.2
    assert result.reference == min(('local', 'offload'), key=predicted.get)
    assert set(result.paired) == {p.name for p in plans} - {result.reference}
    assert max(abs(e) for e in result.paired.values()) < 1e-9
    assert result.margin() == plan_calibrate.MARGIN_BOUNDS[0]
    # a ratio that does move between rounds (the split 30 % slower in every odd round)
    # widens the margin
    slow = {name: list(timed) for name, timed in samples.items()}
    split = plans[2].name
    slow[split] = _rounds([t.total_ms * (1.3 if t.round % 2 else 1.0) for t in slow[split]])
    wide = plan_calibrate.calibrate_plans(_cost(prepared[3]), plans, slow, link, 0.0,
                                          {'local', 'offload'})
    assert wide.margin() > 0.1


def test_local_is_calibrated_beside_the_robots_own_speed_in_the_same_rounds(prepared):
    from rrto_ros import plan_calibrate
    from rrto_ros.plan_profile import REFERENCE
    cost = _cost(prepared[3], robot_ms=1.0, server_ms=0.05)
    link = Link(1e6, 0.0)
    local, offload = Plan('local'), Plan('offload')
    level = cost.estimate(local, link).latency_ms   # the robot's local time, as profiled
    remote = cost.estimate(offload, link).latency_ms
    slow = (1.7, 1.8, 1.7, 1.6, 1.7)   # a slow phase of the robot's core while calibrating
    samples = {'local': _rounds([level * 1.02 * f for f in slow]),   # 2 % engine overhead
               REFERENCE: _rounds([level * f for f in slow]),
               'offload': _rounds([remote] * 5)}   # link-bound: the phase does not slow it
    result = plan_calibrate.calibrate_plans(cost, [local, offload], samples, link, level,
                                            {'local', 'offload'})
    assert result.phase_free == ['local']
    assert cost.estimate(local, link).latency_ms == pytest.approx(level * 1.02)
    assert cost.estimate(offload, link).latency_ms == pytest.approx(remote)
    # without the robot's speed in those rounds, the slow phase is all local has
    plain = _cost(prepared[3], robot_ms=1.0, server_ms=0.05)
    del samples[REFERENCE]
    plan_calibrate.calibrate_plans(plain, [local, offload], samples, link, level,
                                   {'local', 'offload'})
    assert plain.estimate(local, link).latency_ms > 1.6 * level


def test_robot_sides_are_timed_round_by_round_beside_the_local_model(prepared, monkeypatch):
    from rrto_ros import plan_profile
    _, x, artifact, analysis = prepared
    clock, calls = [0.0], []

    def spend(ms):   # the robot's core is 3x slow for the first six calls
        def call():
            clock[0] += ms * (3.0 if len(calls) < 6 else 1.0) / 1e3
            calls.append(ms)
        return call

    class Model:
        run = staticmethod(lambda args, kwargs: spend(20.0)())

    class Runtime:
        def __init__(self, program, analysis, weights, plan):
            pass

        def robot_side(self, flat, weights):
            return spend(10.0)

    monkeypatch.setattr(plan_profile, 'PlanRuntime', Runtime)
    monkeypatch.setattr(plan_profile.time, 'perf_counter', lambda: clock[0])
    plan = Plan('hybrid', analysis.cut_candidates()[-1], 0.5)
    sides = plan_profile.measure_plans(Model(), analysis.program, analysis,
                                       artifact.weights(), x, [plan, Plan('local')], 4)
    assert calls.count(20.0) == calls.count(10.0) == 5   # one each per round, a warm-up round
    assert all(sorted(calls[i:i + 2]) == [10.0, 20.0] for i in range(0, 10, 2))
    assert sides.reference_ms == pytest.approx(40.0)   # median of 60, 60, 20, 20
    assert sides.ms == {plan.name: pytest.approx(0.5 * sides.reference_ms)}


def test_the_robot_is_priced_over_the_whole_solve_not_the_spell_its_calibration_saw(
        prepared, server, monkeypatch):
    # the H200 host: the robot's core at two speeds 1.4x apart in spells of seconds; here
    # local takes 112 ms for the first 4 s (every measuring step of the solve), 80 ms after
    from rrto_ros import plan_profile, plan_solve, plan_speed
    from rrto_ros.plan_profile import REFERENCE, RobotSides
    model, x, _, _ = prepared
    now = [0.0]

    def robot():
        now[0] += (0.112 if now[0] < 4.0 else 0.080)

    def fake_clock(call):
        return plan_speed.RobotClock(robot, now=lambda: now[0],
                                     sleep=lambda s: now.__setitem__(0, now[0] + s))

    def measure_plans(model, program, analysis, weights, x, plans, repeats, clock):
        level = statistics.median(clock.time() for _ in range(repeats))   # back to back
        return RobotSides({p.name: level / 2 for p in plans if p.kind in ('split', 'hybrid')},
                          level)

    def measure_end_to_end(model, endpoint, table, x, plans, rounds, first=0, clock=None):
        reference = _rounds([clock.time() for _ in range(rounds)])
        timed = {p.name: _rounds([t.total_ms + 2.0 if p.name == 'local' else 500.0
                                  for t in reference]) for p in plans}
        return dict(timed, **{REFERENCE: reference})

    monkeypatch.setattr(plan_solve, 'RobotClock', fake_clock)
    monkeypatch.setattr(plan_profile, 'measure_plans', measure_plans)
    monkeypatch.setattr(plan_profile, 'measure_end_to_end', measure_end_to_end)
    solved = plan_solve.solve(TorchModule(model), x, [Link(20, 4.0)], server.endpoint,
                              repeats=1, rounds=8, robot_span_s=20.0)
    calibration = solved.table.calibration
    assert calibration['robot_clock']['span_s'] >= 20.0
    assert [round(t[0]) for t in calibration['samples'][REFERENCE]][:8] == [112] * 8
    assert calibration['robot_reference_ms'] == pytest.approx(80.0)   # not 112
    assert all(ms == pytest.approx(40.0) for ms in calibration['measured_robot_ms'].values())
    assert solved.cost.estimate(Plan('local'), Link(1e6, 0.0)).robot_compute_ms == (
        pytest.approx(80.0))
    # local's end-to-end samples (2 ms over the reference beside them, in either spell) are
    # taken relative to it: 2 ms over 80, not 114
    assert 80.0 * 114.0 / 112.0 - 1e-6 <= calibration['measured_ms']['local'] <= 82.0 + 1e-6


def test_the_robot_clocks_level_weighs_time_not_calls():
    from rrto_ros.plan_speed import RobotClock
    now, speed = [0.0], [0.112]

    def robot():
        now[0] += speed[0]

    clock = RobotClock(robot, now=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    for _ in range(40):          # a calibration burst: 40 calls in 4.5 s of a slow spell
        clock.time()
    speed[0] = 0.080
    clock.spread(12.0)           # then one call a second, in a fast spell
    assert 12.0 <= clock.span_s() < 13.0
    assert len(clock.samples) == 40 + 8
    assert statistics.median(ms for _, ms in clock.samples) == pytest.approx(112.0)
    assert clock.level() == pytest.approx(80.0)   # 8 fast seconds of 13 outweigh 5 slow ones
    assert RobotClock(robot).level(default=7.0) == 7.0
    with pytest.raises(ValueError):
        RobotClock(robot, every_s=0)


def test_each_timed_plan_is_guarded_by_its_own_measured_error(prepared):
    from rrto_ros import plan_calibrate
    from rrto_ros.plan_solve import refine
    cost = _cost(prepared[3], robot_ms=1.0, server_ms=1.0)
    link = Link(1e6, 0.0)   # equal speeds, free link: splitting the rows pays
    solution = optimise(cost, link)
    assert solution.plan.kind == 'hybrid'
    best = min(e.latency_ms for _, e in cost.baselines(link).values())
    gain = 1 - solution.estimate.latency_ms / best
    assert gain > 0.05
    name = solution.plan.name
    robot = {name: solution.estimate.robot_compute_ms}
    # a wide table margin (set by plans nobody would choose) does not block a plan whose
    # own error is small; a plan whose own error exceeds its predicted gain stays out
    wide = gain + 0.01
    assert refine(cost, [solution], robot, wide, {name: 0.02})[0].plan == solution.plan
    assert refine(cost, [solution], robot, 0.02, {name: wide})[0].plan.kind != 'hybrid'
    assert refine(cost, [solution], robot, wide)[0].plan.kind != 'hybrid'   # the table's margin
    calibrated = plan_calibrate.Calibrated(paired={name: 0.001, 'split@3': -0.4})
    assert calibrated.margins() == {name: 0.02, 'split@3': 0.15}   # within the bounds
    assert calibrated.margin() > 0.1   # the table's margin still covers plans not timed


def test_the_paired_error_uses_every_round_to_calibrate_and_to_judge(prepared):
    from rrto_ros import plan_calibrate
    cost = _cost(prepared[3])
    link = Link(1e6, 0.0)
    plans = [Plan('local'), Plan('offload')]
    local = cost.estimate(plans[0], link).latency_ms
    offload = cost.estimate(plans[1], link).latency_ms
    # four rounds; offload's ratio to local is 40 % off in round 3 alone: an even/odd split
    # judged rounds 1 and 3 on rounds 0 and 2 and called it a 17 % error; drawn and judged
    # over every round, one outlying round of four moves the error much less
    samples = {'local': _rounds([local] * 4),
               'offload': _rounds([offload * f for f in (1.0, 1.0, 1.0, 1.4)])}
    errors = plan_calibrate.paired_errors(cost, plans, samples, link, 'local')
    again = plan_calibrate.paired_errors(cost, plans, samples, link, 'local')
    assert errors == again   # a fixed seed: the same samples, the same error
    assert abs(errors['offload']) < 0.1
    flip = {'local': samples['local'],   # a ratio that moves from round to round widens it
            'offload': _rounds([offload * f for f in (1.0, 1.25, 1.0, 1.25)])}
    assert plan_calibrate.paired_errors(cost, plans, flip, link, 'local')['offload'] > 0.15
    steady = {'local': samples['local'], 'offload': _rounds([offload * 1.25] * 4)}
    assert plan_calibrate.paired_errors(cost, plans, steady, link, 'local')['offload'] < 1e-9
