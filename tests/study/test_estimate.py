"""The cost of a study point for `--status`: finished points first, then checkpoints scaled to
the whole run, then the other method's cost times the methods' ratio on other tasks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from loralab.study.estimate import MIN_SHARE, makespan, point_costs, training_chars, wall_per_cpu


def _pt(task, method, *, cpu_s=None, share=None, cpu_at=None, at=None, on=None, wall_s=None):
    return SimpleNamespace(task=task, method=method, finished=cpu_s is not None, cpu_s=cpu_s,
                           started_at=at, resumes_at=share, resumes_cpu_s=cpu_at, machine=on,
                           wall_s=wall_s)  # fmt: skip


def test_points_from_another_machine_count_at_this_ones_speed():
    """Here's own points of a (task, method) win; else another machine's count times how much
    slower here ran the (task, method)s both ran (the mean of those ratios)."""
    xeon, epyc = "Xeon[amx_bf16]", "AMD EPYC[avx2]"
    points = [
        _pt("sst2", "lora", cpu_s=140.0, on=xeon), _pt("sst2", "lora", cpu_s=360.0, on=epyc),
        _pt("sst2", "full", cpu_s=300.0, on=xeon), _pt("sst2", "full", cpu_s=900.0, on=epyc),
        _pt("mrpc", "lora", cpu_s=900.0, on=xeon),  # the EPYC has not run it
        _pt("rte", "lora", cpu_s=1000.0, on=xeon), _pt("rte", "lora", cpu_s=2000.0, on=epyc),
        _pt("rte", "full", cpu_s=1500.0, on=None),  # unrecorded machine: as it is
    ]  # fmt: skip
    # EPYC/Xeon: sst2 lora 360/140, sst2 full 3, rte lora 2: mean (18/7 + 3 + 2) / 3
    ratio = (360 / 140 + 3 + 2) / 3
    costs = point_costs(points, here=epyc)
    assert costs[("mrpc", "lora")] == pytest.approx(900.0 * ratio)
    assert costs[("sst2", "lora")] == pytest.approx(360.0)  # its own points only
    assert costs[("rte", "full")] == pytest.approx(1500.0)
    costs = point_costs(points, here=xeon)
    assert costs[("mrpc", "lora")] == pytest.approx(900.0) and costs[("rte", "lora")] == pytest.approx(1000.0)  # fmt: skip
    # No machine given, or one that ran nothing: every point as it is (the mean).
    for here in (None, "GPU"):
        costs = point_costs(points, here=here)
        assert costs[("mrpc", "lora")] == pytest.approx(900.0)
        assert costs[("sst2", "lora")] == pytest.approx(250.0)


def test_this_machines_points_count_only_among_the_newest_and_ratios_compare_one_window():
    """An old point of this machine (older code) loses to newer ones from another machine,
    scaled; the machines' ratio comes from points of one window, not a code change."""
    xeon, epyc, day = "Xeon[amx_bf16]", "AMD EPYC[avx2]", 86400.0
    points = [
        _pt("mrpc", "lora", cpu_s=3000.0, at=0.0, on=epyc),  # two days older: older code
        _pt("mrpc", "lora", cpu_s=900.0, at=2 * day, on=xeon),
        _pt("sst2", "lora", cpu_s=420.0, at=0.0, on=xeon),  # older code, left out of the ratio
        _pt("sst2", "lora", cpu_s=140.0, at=2 * day, on=xeon),
        _pt("sst2", "lora", cpu_s=360.0, at=2 * day + 60, on=epyc),
    ]  # fmt: skip
    costs = point_costs(points, here=epyc)
    assert costs[("mrpc", "lora")] == pytest.approx(900.0 * 360 / 140)


def test_finished_points_give_the_mean_and_win_over_checkpoints():
    costs = point_costs([_pt("sst2", "lora", cpu_s=100.0), _pt("sst2", "lora", cpu_s=140.0),
                         _pt("sst2", "lora", share=0.5, cpu_at=500.0)])  # fmt: skip
    assert costs == {("sst2", "lora"): pytest.approx(120.0)}


def test_finished_points_count_from_the_newest_day_on():
    """Points that started over a day before the newest one ran on older code or machines;
    points that do not record their start count only where none does."""
    day = 86400.0
    costs = point_costs([
        _pt("mrpc", "full", cpu_s=3200.0, at=1000.0), _pt("mrpc", "full", cpu_s=3300.0),
        _pt("mrpc", "full", cpu_s=1100.0, at=1000.0 + 2 * day),
        _pt("mrpc", "full", cpu_s=1200.0, at=1000.0 + 1.5 * day),  # within a day of the newest
        _pt("sst2", "lora", cpu_s=100.0), _pt("sst2", "lora", cpu_s=140.0),  # none recorded
        _pt("rte", "lora", cpu_s=900.0, at=5.0),
    ])  # fmt: skip
    assert costs == {
        ("mrpc", "full"): pytest.approx(1150.0),
        ("sst2", "lora"): pytest.approx(120.0),
        ("rte", "lora"): pytest.approx(900.0),
    }


def test_a_checkpoint_is_scaled_to_the_whole_run_unless_too_early():
    costs = point_costs([_pt("mrpc", "lora", share=0.25, cpu_at=300.0),
                         _pt("mrpc", "lora", share=0.5, cpu_at=500.0),
                         _pt("rte", "lora", share=MIN_SHARE / 2, cpu_at=10.0),
                         _pt("rte", "lora", share=0.5, cpu_at=None)])  # fmt: skip
    assert costs == {("mrpc", "lora"): pytest.approx((1200.0 + 1000.0) / 2)}


def test_a_missing_method_is_the_other_times_their_ratio_elsewhere():
    points = [
        _pt("sst2", "lora", cpu_s=100.0), _pt("sst2", "full", cpu_s=250.0),  # ratio 2.5
        _pt("rte", "lora", cpu_s=200.0), _pt("rte", "full", share=0.5, cpu_at=300.0),  # 3.0
        _pt("mrpc", "lora", cpu_s=400.0), _pt("mrpc", "full"),  # unstarted: 400 x 2.75
        _pt("squad_v2", "full", cpu_s=1000.0), _pt("squad_v2", "lora"),  # 1000 / 2.75
        _pt("new", "lora"), _pt("new", "full"),  # nothing to go by
    ]  # fmt: skip
    costs = point_costs(points)
    assert costs["mrpc", "full"] == pytest.approx(400.0 * 2.75)
    assert costs["squad_v2", "lora"] == pytest.approx(1000.0 * (100 / 250 + 200 / 600) / 2)
    assert ("new", "lora") not in costs and ("new", "full") not in costs
    assert costs["rte", "full"] == pytest.approx(600.0)  # its own checkpoint, not the ratio


def test_a_task_with_no_run_is_costed_from_the_others_cost_per_character():
    points = [_pt("sst2", "lora", cpu_s=100.0), _pt("mrpc", "lora", cpu_s=600.0),
              _pt("rte", "lora"), _pt("rte", "full"), _pt("new", "lora")]  # fmt: skip
    chars = {"sst2": 1000.0, "mrpc": 2000.0, "rte": 4000.0}  # 0.1 and 0.3 CPU s per character
    costs = point_costs(points, chars)
    assert costs["rte", "lora"] == pytest.approx(0.2 * 4000.0)
    assert ("rte", "full") not in costs  # no full run anywhere to take a rate from
    assert ("new", "lora") not in costs  # no training text known
    assert point_costs(points) == {("sst2", "lora"): 100.0, ("mrpc", "lora"): 600.0}


def test_training_chars_counts_the_text_a_run_sees(tmp_path):
    from conftest import write_sst2

    from loralab.config import build_config
    from loralab.tasks import get_task

    data = write_sst2(tmp_path / "sst2", n_train=40)
    raw = get_task("sst2").load("train", data_dir=str(data))
    mean = sum(len(t) for t in raw["text_a"]) / len(raw)  # text_b is "" for SST-2
    cfg = build_config(overrides=["data.task=sst2", f"data.data_dir={data}",
                                  "data.max_train_examples=10", "train.epochs=3"])  # fmt: skip
    assert training_chars(cfg) == pytest.approx(mean * 10 * 3)
    steps = build_config(overrides=["data.task=sst2", f"data.data_dir={data}",
                                    "train.max_steps=5", "train.batch_size=4"])  # fmt: skip
    assert training_chars(steps) == pytest.approx(mean * 5 * 4)
    assert training_chars(build_config(overrides=["data.task=sst2"])) is None  # the hub: no
    gone = build_config(overrides=["data.task=sst2", f"data.data_dir={tmp_path / 'nowhere'}"])
    assert training_chars(gone) is None


def test_makespan_gives_each_job_to_the_first_worker_free():
    assert makespan([], [100.0]) == 0.0  # no worker: no schedule
    assert makespan([30.0], [10.0, 20.0]) == pytest.approx(60.0)  # one worker: everything
    # Two workers free at 10 and 40: 50 goes to the first (60), 20 to the second (60), 5 to
    # either: 65; the last jobs cannot be split, so it is not the sum / 2 (62.5).
    assert makespan([40.0, 10.0], [50.0, 20.0, 5.0]) == pytest.approx(65.0)
    assert makespan([40.0, 10.0], []) == pytest.approx(40.0)


def test_wall_per_cpu_is_the_newest_points_ratio_preferring_this_machines():
    day, xeon, epyc = 86400.0, "Xeon", "EPYC"
    points = [
        _pt("sst2", "lora", cpu_s=100.0, wall_s=400.0, at=0.0, on=epyc),  # older window
        _pt("mrpc", "lora", cpu_s=100.0, wall_s=110.0, at=2 * day, on=epyc),
        _pt("mrpc", "lora", cpu_s=100.0, wall_s=130.0, at=2 * day, on=epyc),
        _pt("rte", "lora", cpu_s=200.0, wall_s=120.0, at=2 * day, on=xeon),  # two threads
        _pt("rte", "full", cpu_s=100.0, at=2 * day, on=xeon),  # wall time unrecorded
        _pt("rte", "full", share=0.5, cpu_at=50.0),  # unfinished
    ]  # fmt: skip
    assert wall_per_cpu(points, here=epyc) == pytest.approx(1.2)
    assert wall_per_cpu(points, here=xeon) == pytest.approx(0.6)
    # Summed, not a mean of ratios ((1.1 + 1.3 + 0.6) / 3 = 1.0): the longer point weighs more.
    assert wall_per_cpu(points) == pytest.approx((110 + 130 + 120) / 400)
    assert wall_per_cpu(points[-2:]) is None
