"""The planner's search and lookups on measured curves (no model: synthetic measurements)."""

import pytest

from dyncompile.plan import Measurement, Plan, search


def _fake(costs, losses, rows=400):
    """measure(knobs) for forms whose saving and loss add up: ``costs[f](k)`` is the share
    of the model's work form ``f`` saves at knob ``k``, ``losses[f](k)`` the loss it adds."""
    calls = []

    def measure(knobs):
        calls.append(dict(knobs))
        saved = sum(costs[f](k) for f, k in knobs.items())
        loss = sum(losses[f](k) for f, k in knobs.items())
        return Measurement(1.0 - saved, 1.0 - 0.8 * saved, [loss] * rows)

    return measure, calls


COSTS = {"cheap": lambda k: 0.4 * (1 - k), "costly": lambda k: 0.4 * (1 - k)}
LOSSES = {"cheap": lambda k: 0.01 * (1 - k), "costly": lambda k: 0.2 * (1 - k)}


def test_the_plan_spends_the_form_that_loses_least_per_flop_first():
    fit, _ = _fake(COSTS, LOSSES)
    test, calls = _fake(COSTS, LOSSES)
    plan = search(["cheap", "costly"], fit, test)
    knobs = [p.knobs for p in sorted(plan.points, key=lambda p: p.step)]
    assert knobs[0] == {"cheap": 1.0, "costly": 1.0}
    # "cheap" alone saves up to 0.32: every frontier point spending 0.68 or more leaves
    # "costly" dense ("costly" alone is measured too, and loses)
    front = plan.frontier()
    assert all(p.knobs["costly"] == 1.0 for p in front if p.flops >= 0.68 - 1e-9)
    assert any(p.knobs["costly"] < 1.0 for p in front)      # needed below 0.68
    assert [p.flops for p in plan.points] == sorted((p.flops for p in plan.points),
                                                    reverse=True)  # path: costliest first
    assert len(calls) == len(knobs)  # each path point measured jointly once


def test_a_form_whose_first_steps_cost_more_than_they_save_is_still_chosen():
    # a router: its first knob steps spend more than dense, later ones save a lot cheaply
    costs = {"router": lambda k: -0.05 if k >= 0.85 else 0.6 * (1 - k),
             "steep": lambda k: 0.3 * (1 - k) ** 0.5}
    losses = {"router": lambda k: 0.1 * (1 - k), "steep": lambda k: 0.5 * (1 - k) ** 0.5}
    fit, _ = _fake(costs, losses)
    plan = search(["router", "steep"], fit, fit)
    k = plan.knobs_for_budget(0.8)
    assert k["router"] < 0.85 and k["steep"] == 1.0


def test_budget_picks_the_most_expensive_frontier_point_within_it_and_dense_at_one():
    fit, _ = _fake(COSTS, LOSSES)
    plan = search(["cheap", "costly"], fit, _fake(COSTS, LOSSES)[0])
    assert plan.knobs_for_budget(1.0) == {"cheap": 1.0, "costly": 1.0}
    for b in (0.95, 0.8, 0.63, 0.5):
        k = plan.knobs_for_budget(b)
        spent = 1.0 - sum(COSTS[f](v) for f, v in k.items())
        assert b - 0.04 - 1e-9 <= spent <= b + 1e-9   # grid steps save 0.04 each
    assert plan.knobs_for_budget(0.8)["costly"] == 1.0  # the cheap form alone covers 0.8
    with pytest.warns(UserWarning, match="below every planned point"):
        assert plan.knobs_for_budget(0.01) == plan.frontier()[0].knobs
    assert plan.frontier()[0].flops == pytest.approx(min(p.flops for p in plan.points))


def test_flat_steps_are_jumped_and_a_form_that_saves_nothing_is_never_lowered():
    costs = {"stepped": lambda k: 0.3 if k <= 0.65 else 0.0, "useless": lambda k: 0.0}
    losses = {"stepped": lambda k: 0.01, "useless": lambda k: 0.0}
    fit, _ = _fake(costs, losses)
    plan = search(["stepped", "useless"], fit, fit)
    assert all(p.knobs["useless"] == 1.0 for p in plan.points)
    assert [p.knobs["stepped"] for p in plan.points] == [1.0, 0.6]


def test_time_unit_plans_on_measured_time():
    fit, _ = _fake(COSTS, LOSSES)
    plan = search(["cheap", "costly"], fit, fit, unit="time")
    k = plan.knobs_for_budget(0.9)
    saved = sum(COSTS[f](v) for f, v in k.items())
    assert 0.9 - 0.032 - 1e-9 <= 1.0 - 0.8 * saved <= 0.9 + 1e-9
    with pytest.raises(ValueError, match="budget_unit"):
        search(["cheap"], fit, fit, unit="seconds")


def test_certify_picks_the_cheapest_point_within_the_tolerance_in_path_order():
    fit, _ = _fake(COSTS, LOSSES)
    plan = search(["cheap", "costly"], fit, fit)
    cert = plan.certify(0.05)
    assert cert.point.loss < 0.05 and cert.bound <= 0.05 + 1e-9 and cert.rows == 400
    later = [p for p in plan.points if p.step > cert.point.step]
    assert later and later[0].loss >= cert.bound - 0.02  # the next one was not certified
    assert "held-out rows" in str(cert)
    with pytest.raises(ValueError, match="needs at least"):
        plan.certify(0.001)


def test_certify_refuses_without_held_out_rows():
    fit, _ = _fake(COSTS, LOSSES)
    plan = search(["cheap"], fit, fit, held_out=False)
    with pytest.raises(ValueError, match="held-out"):
        plan.certify(0.1)


def test_plan_round_trips_through_a_dict_and_prints_a_table(tmp_path):
    fit, _ = _fake(COSTS, LOSSES)
    plan = search(["cheap", "costly"], fit, fit)
    again = Plan.from_dict(plan.to_dict())
    assert again.points == plan.points and again.single == plan.single
    assert again.knobs_for_budget(0.6) == plan.knobs_for_budget(0.6)
    table = str(plan)
    assert table.splitlines()[0].split() == ["budget", "cheap", "costly", "loss", "flops",
                                              "time"]
    out = plan.plot(tmp_path / "plan.png")
    assert out.stat().st_size > 1000


def test_a_form_alone_wins_when_the_mix_measures_worse_than_the_sum_predicts():
    # Two forms that look additive on the fitting rows, but interact: jointly they lose
    # far more than the sum (early exit's confidence reads hidden states another form
    # perturbed). The held-out measurement must let the form alone win.
    costs = {"exit": lambda k: 0.9 * (1 - k), "ffn": lambda k: 0.3 * (1 - k)}
    losses = {"exit": lambda k: 0.2 * (1 - k), "ffn": lambda k: 0.02 * (1 - k)}
    fit, _ = _fake(costs, losses)
    joint, calls = _fake(costs, losses)

    def test(knobs):
        m = joint(knobs)
        if knobs.get("exit", 1.0) < 1.0 and knobs.get("ffn", 1.0) < 1.0:
            m.losses = [x + 0.3 for x in m.losses]
        return m

    plan = search(["exit", "ffn"], fit, test)
    assert {tuple(sorted(c.items())) for c in calls} >= {(("exit", 0.5), ("ffn", 1.0))}
    k = plan.knobs_for_budget(0.55)
    assert k["ffn"] == 1.0 and k["exit"] == 0.5  # exit alone, not the mix the sum prefers
    steps = sorted(plan.points, key=lambda p: p.step)
    assert [p.step for p in steps] == list(range(len(steps)))


def test_a_budget_does_not_give_its_spend_away_on_held_out_noise():
    from dyncompile.plan import Point

    dense = Point({"f": 1.0}, 1.0, 1.0, 0.0, 64, 0)
    near = Point({"f": 0.8}, 0.74, 0.8, 0.050, 64, 1, se=0.027)   # 3.2 of 64 rows flip
    lucky = Point({"f": 0.5}, 0.45, 0.5, 0.047, 64, 2, se=0.026)  # 3 flip, by chance
    far = Point({"f": 0.3}, 0.30, 0.3, 0.200, 64, 3, se=0.05)
    plan = Plan(["f"], [dense, near, lucky, far])
    assert plan.frontier()[:2] == [far, lucky]   # the Pareto view drops "near" ...
    assert plan.point_for_budget(0.75) is near   # ... but a 0.75 budget spends 0.74
    assert plan.point_for_budget(0.5) is lucky
    with pytest.warns(UserWarning, match="below every planned point: the cheapest spends 0.300"):
        assert plan.point_for_budget(0.2) is far  # nothing within: the cheapest, said
    assert plan.point_for_budget(1.0) is dense
    assert plan.run_points() == [dense, near, lucky, far]
    assert [line.split()[0] for line in plan.table().splitlines()[2:6]] == [
        "1.000", "0.740", "0.450", "0.300"]             # the table shows what budgets run
    sure = Point({"f": 0.5}, 0.45, 0.5, 0.010, 400, 2, se=0.005)  # clearly better
    plan = Plan(["f"], [dense, near, sure, far])
    assert plan.point_for_budget(0.75) is sure
    assert Plan.from_dict(plan.to_dict()).points == plan.points
