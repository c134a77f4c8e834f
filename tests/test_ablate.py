"""The ablation runner's and its report's pure pieces, against hand computations: no training, no subprocesses."""

import json
import math
import os
import threading
import time

import pytest
import torch

import ablate
import common
import report
from ablate import ancestors, command, inputs, schedule
from report import (NODES, VARIANTS, build_summary, busy_wall, ckpt, claims, last_third, late_gamma, mean_ci95,
                    paired_shift_text, seed_shifts, shift_band, shift_gaps, study_time)


# ----------------------------------------------------------------------------- the plan

def test_every_variant_and_input_is_a_node_and_nodes_are_topologically_ordered():
    order = list(NODES)
    for node in NODES:
        for i in inputs(node):
            assert order.index(i) < order.index(node)
    assert all(final in NODES for final, _ in VARIANTS.values())
    # the full study is every node: nothing in the DAG is unused
    assert ancestors(list(VARIANTS)) == order


def test_ancestor_closure_by_hand():
    assert ancestors(["kd_only"]) == ["teacher", "s1_cluster", "s2"]
    assert ancestors(["upcycle_grpo"]) == ["teacher", "s1_random_subsets", "s3_grpo_upcycle"]
    assert ancestors(["padd"]) == ["teacher", "s1_cluster", "s2", "s3_prgrpo", "s4"]
    assert ancestors(["no_stage2", "kd_only"]) == ["teacher", "s1_cluster", "s2", "s3_prgrpo_nos2", "s4_nos2"]
    assert ancestors(["no_stage1"]) == ["teacher", "s1_random", "s2_random", "s3_prgrpo_random", "s4_random"]


def test_command_passes_the_seeds_teacher_explicitly():
    cmd = command("s4_nos2", 1, "tiny", "o")
    assert cmd == ["stage4_balance.py", "--preset", "tiny", "--seed", "1", "--in", os.path.join("o", "seed1", "s3_prgrpo_nos2.pt"),
                   "--teacher", os.path.join("o", "seed1", "teacher.pt"), "--out", os.path.join("o", "seed1", "s4_nos2.pt")]
    assert command("teacher", 2, "tiny", "o") == ["train_teacher.py", "--preset", "tiny", "--seed", "2",
                                                  "--out", os.path.join("o", "seed2", "teacher.pt")]
    s1 = command("s1_random", 0, "default", "o")
    assert "--teacher" not in s1 and s1[-2:] == ["--init", "random"]
    assert command("s3_grpo", 2, "tiny", "o")[-2:] == ["--algo", "grpo"]


# ----------------------------------------------------------------------------- the scheduler

def fake_runner(out, calls, seconds=0.0, fail=()):
    """Stands in for a subprocess: records the call, checks the inputs exist, writes the output."""
    lock = threading.Lock()

    def run(node, seed):
        assert all(os.path.exists(ckpt(out, seed, i)) for i in inputs(node)), f"{node} started before its inputs"
        with lock:
            calls.append((node, seed))
        time.sleep(seconds)
        if node in fail:
            return 1
        os.makedirs(os.path.dirname(ckpt(out, seed, node)), exist_ok=True)
        open(ckpt(out, seed, node), "w").close()
        return 0
    return run


def test_schedule_runs_each_missing_node_once_after_its_inputs(tmp_path):
    out, calls = str(tmp_path), []
    nodes = ancestors(["padd", "vanilla_grpo"])
    assert schedule(nodes, [0, 1], out, fake_runner(out, calls), jobs=2) == []
    # a teacher per seed, each first in its seed's chain
    assert sorted(calls) == sorted((n, s) for n in nodes for s in (0, 1))
    assert set(calls[:2]) == {("teacher", 0), ("teacher", 1)}
    for s in (0, 1):
        seq = [n for n, t in calls if t == s]
        assert seq.index("s1_cluster") < seq.index("s2") < seq.index("s3_prgrpo") < seq.index("s4")


def test_schedule_skips_nodes_whose_checkpoint_exists(tmp_path):
    out, calls = str(tmp_path), []
    for node in ("teacher", "s1_cluster"):
        os.makedirs(os.path.join(out, "seed0"), exist_ok=True)
        open(ckpt(out, 0, node), "w").close()
    schedule(ancestors(["kd_only"]), [0], out, fake_runner(out, calls), jobs=1)
    assert calls == [("s2", 0)]
    calls.clear()
    schedule(ancestors(["kd_only"]), [0], out, fake_runner(out, calls), jobs=1)
    assert calls == []  # everything exists: a rerun runs nothing


def test_schedule_runs_two_at_once(tmp_path):
    out, calls, done = str(tmp_path), [], []
    for s in range(4):
        os.makedirs(os.path.dirname(ckpt(out, s, "teacher")), exist_ok=True)
        open(ckpt(out, s, "teacher"), "w").close()  # each seed's s1_cluster starts from its teacher
    t0 = time.time()
    schedule(["s1_cluster"], [0, 1, 2, 3], out, fake_runner(out, calls, seconds=0.2), jobs=2,
             on_done=lambda n, s, rc, sec: done.append((n, s, rc, sec)))
    # 4 independent nodes of 0.2 s on 2 workers: 0.4 s, not 0.8
    assert time.time() - t0 < 0.7
    assert sorted(s for _, s, _, _ in done) == [0, 1, 2, 3]
    assert all(rc == 0 and sec >= 0.2 for _, _, rc, sec in done)


def test_schedule_stops_after_a_failure(tmp_path):
    out, calls = str(tmp_path), []
    failed = schedule(ancestors(["padd"]), [0], out, fake_runner(out, calls, fail={"s2"}), jobs=1)
    assert failed == [("s2", 0, 1)]
    assert calls == [("teacher", 0), ("s1_cluster", 0), ("s2", 0)]  # nothing after the failure
    # s1_random_subsets is ready when s1_cluster fails, and still does not start
    out, calls = str(tmp_path / "b"), []
    failed = schedule(ancestors(["kd_only", "upcycle_grpo"]), [0], out, fake_runner(out, calls, fail={"s1_cluster"}), jobs=1)
    assert failed == [("s1_cluster", 0, 1)] and calls == [("teacher", 0), ("s1_cluster", 0)]


def test_log_tail_collapses_progress_bars(tmp_path):
    p = tmp_path / "x.log"
    p.write_text("a\nstep 1\rstep 2\rstep 3\r   \r\n\nTraceback\nValueError: boom\n")
    assert ablate.log_tail(str(p), n=4) == "a\nstep 3\nTraceback\nValueError: boom"


# ----------------------------------------------------------------------------- the numbers

def test_mean_ci95_by_hand():
    m, h = mean_ci95([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    m, h = mean_ci95([0.5])
    assert m == 0.5 and h == 0.0
    # 12 values: 11 degrees of freedom falls between the table's 10 and 12, so 10's (wider)
    # t; the normal 1.96 only past 30
    xs = [0.0, 1.0] * 6
    sd = math.sqrt(sum((x - 0.5) ** 2 for x in xs) / 11)
    assert mean_ci95(xs)[1] == pytest.approx(2.228 * sd / math.sqrt(12))
    xs = [0.0, 1.0] * 20
    sd = math.sqrt(sum((x - 0.5) ** 2 for x in xs) / 39)
    assert mean_ci95(xs)[1] == pytest.approx(1.96 * sd / math.sqrt(40))
    assert mean_ci95([2.0, 4.0])[1] == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2))


def test_shift_band_and_last_third():
    band = shift_band([[[1, 0.1], [2, 0.2], [3, 0.3]], [[1, 0.3], [2, 0.2]]])
    assert band["steps"] == [1, 2]  # steps every seed logged
    assert band["mean"] == pytest.approx([0.2, 0.2])
    assert band["ci95"] == pytest.approx([12.706 * math.sqrt(0.02) / math.sqrt(2), 0.0])
    assert last_third([2, 4, 6, 8, 10, 12], [1, 2, 3, 4, 5, 6]) == [5, 6]  # steps > 8
    assert last_third([1], [7]) == [7]


def test_busy_wall_and_study_time(tmp_path):
    assert busy_wall([(0, 10), (5, 12), (20, 25)]) == 17  # overlap counted once, the pause not at all
    assert busy_wall([(0, 10), (2, 3)]) == 10
    p = tmp_path / "ablate.jsonl"
    recs = [dict(time=110, node="teacher", seed=0, seconds=10, returncode=0),
            dict(time=120, node="s1_cluster", seed=0, seconds=5, returncode=1),   # failed, then rerun
            dict(time=130, node="s1_cluster", seed=0, seconds=8, returncode=0)]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    total, wall, untimed, per_script = study_time(str(p), [("teacher", 0), ("s1_cluster", 0), ("s2", 0)])
    assert total == 18 and wall == 18 and untimed == [("s2", 0)]
    assert per_script == {"train_teacher.py": 10, "stage1_cluster.py": 8}


def test_node_commits_count_the_last_successful_record(tmp_path):
    p = tmp_path / "ablate.jsonl"
    recs = [dict(time=1, node="teacher", seed=0, seconds=1, returncode=0),                     # before the field
            dict(time=2, node="s1_cluster", seed=0, seconds=1, returncode=0, commit="aaa"),
            dict(time=3, node="s2", seed=0, seconds=1, returncode=0, commit="aaa"),
            dict(time=4, node="s2", seed=0, seconds=1, returncode=0, commit="bbb-dirty"),      # redone later
            dict(time=5, node="s2", seed=1, seconds=1, returncode=1, commit="ccc")]            # failed
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    keys = [("teacher", 0), ("s1_cluster", 0), ("s2", 0), ("s2", 1)]
    assert report.node_commits(str(p), keys) == {"unrecorded": 1, "aaa": 1, "bbb-dirty": 1}
    assert report.node_commits(str(p), keys[1:2]) == {"aaa": 1}
    assert report.node_commits(str(tmp_path / "none.jsonl"), keys) == {}
    assert report.newest_commit(str(p), keys) == "bbb-dirty"  # the failed run of time 5 made nothing
    assert report.newest_commit(str(p), keys[:1]) is None
    ms = fake_metrics([0], lambda n, s: 0.3)
    summ = build_summary(ms, [0], "tiny", "aaa")
    args = (summ, ms, claims(summ), "python ablate.py", [], (60.0, 30.0, [], {}), {}, str(tmp_path / "R.md"))
    assert "Checkpoints made at: `aaa` (1), `bbb-dirty` (1)" in report.markdown(*args, made_at={"aaa": 1, "bbb-dirty": 1})
    assert "Checkpoints made at" not in report.markdown(*args, made_at={"aaa": 3})
    assert "union of their runs' intervals" in report.markdown(*args, made_at={"aaa": 1, "bbb-dirty": 1})
    assert "union" not in report.markdown(*args, made_at={"aaa": 3})


def fake_metrics(seeds, acc):
    """{(node, seed): metrics} for every node, as the stage scripts write them; acc(node, seed)."""
    subs = ["algebra", "geometry"]
    ms = {}
    for s in seeds:
        for node in NODES:
            a = acc(node, s)
            m = dict(acc=a, per_subdomain={"algebra": a + 0.1, "geometry": a - 0.1}, active_params=100,
                     total_params=100 if node == "teacher" else 300)
            if node != "teacher":
                m.update(max_vio=0.05 * (s + 1), expert_load=[[1, 2, 3, 2], [2, 2, 2, 2]], max_vio_per_layer=[0.5, 0.0],
                         heatmap={x: [0.25] * 4 for x in subs})
            if node == "s1_cluster":
                m["teacher_heatmap"] = {x: [0.1, 0.2, 0.3, 0.4] for x in subs}
            if node.startswith("s3_"):
                scale = {"s3_grpo": 3.0, "s3_rspo": 2.0}.get(node, 1.0)
                m["router_shift_curve"] = [[u, scale * (u + s)] for u in range(1, 7)]
            ms[node, s] = m
    return ms


def test_build_summary_shape_and_values():
    ms = fake_metrics([0, 1, 2], lambda n, s: 0.3 + 0.1 * s if n == "s4" else 0.2 + 0.03 * s if n == "teacher" else 0.2)
    summ = build_summary(ms, [0, 1, 2], "tiny", "abc")
    assert set(summ) == {"seeds", "preset", "commit", "teacher", "variants", "router_shift", "drift"}
    assert set(summ["teacher"]) == {"acc", "acc_per_seed", "active_params", "total_params"}
    assert list(summ["variants"]) == list(VARIANTS)
    for v in summ["variants"].values():
        assert set(v) == {"acc", "acc_per_seed", "per_subdomain", "max_vio", "active_params", "total_params"}
    assert set(summ["router_shift"]) == set(report.RS_NODES)
    assert summ["drift"] == {}  # checkpoints older than drift_curve and train_acc_curve
    for r in summ["router_shift"].values():
        assert set(r) == {"steps", "mean", "ci95"}
    padd = summ["variants"]["padd"]
    assert padd["acc"] == pytest.approx(0.4) and padd["acc_per_seed"] == pytest.approx([0.3, 0.4, 0.5])
    assert padd["per_subdomain"] == pytest.approx({"algebra": 0.5, "geometry": 0.3})
    assert padd["max_vio"] == pytest.approx(0.1)  # mean of 0.05, 0.1, 0.15
    assert padd["total_params"] == 300
    # a teacher per seed: the summary's teacher is their mean, listed in seed order
    assert summ["teacher"]["acc_per_seed"] == pytest.approx([0.2, 0.23, 0.26])
    assert summ["teacher"]["acc"] == pytest.approx(0.23)
    g = summ["router_shift"]["grpo"]
    assert g["steps"] == [1, 2, 3, 4, 5, 6]
    assert g["mean"][0] == pytest.approx(3.0 * 2)  # 3 * (1 + mean seed 1)
    assert g["ci95"][0] == pytest.approx(4.303 * 3.0 / math.sqrt(3))  # sd of 3*{1,2,3} is 3
    json.dumps(summ)  # plain JSON


def test_build_summary_leaves_out_incomplete_variants():
    ms = fake_metrics([0, 1], lambda n, s: 0.2)
    del ms["s4", 1]
    summ = build_summary(ms, [0, 1], "tiny", "abc", variants=["padd", "kd_only"])
    assert list(summ["variants"]) == ["kd_only"]
    del ms["teacher", 1]  # one seed's teacher is missing: its chains have no teacher to compare with
    with pytest.raises(common.UserError, match="teacher"):
        build_summary(ms, [0, 1], "tiny", "abc")


def test_build_summary_names_a_missing_metric():
    ms = fake_metrics([0], lambda n, s: 0.2)
    del ms["s2", 0]["max_vio"]
    with pytest.raises(common.UserError, match="s2.*max_vio"):
        build_summary(ms, [0], "tiny", "abc", variants=["kd_only"])


def test_claims_from_the_numbers():
    ms = fake_metrics([0, 1, 2], lambda n, s: {"s4": 0.30, "teacher": 0.26, "s2": 0.31}.get(n, 0.2))
    verdicts = {t: (v, x) for t, v, x in claims(build_summary(ms, [0, 1, 2], "tiny", "abc"), wall_seconds=1800)}
    assert verdicts["PADD >= teacher + 3 points"][0] == "holds"  # +4 points
    assert "+4.0, +4.0, +4.0 (mean +4.0 ± 0.0)" in verdicts["PADD >= teacher + 3 points"][1]  # paired per seed
    ms["teacher", 1]["acc"], ms["s2", 2]["acc"] = 0.20, 0.25
    gaps = report.paired_gaps(build_summary(ms, [0, 1, 2], "tiny", "abc"))
    assert set(gaps) == {"teacher"} | set(VARIANTS) - {"padd"}
    assert gaps["teacher"][0] == pytest.approx([4.0, 10.0, 4.0]) and gaps["teacher"][1] == pytest.approx(6.0)
    assert gaps["kd_only"][0] == pytest.approx([-1.0, -1.0, 5.0])
    assert gaps["kd_only"][2] == pytest.approx(4.303 * math.sqrt(12) / math.sqrt(3))  # sd of {-1, -1, 5} is sqrt(12)
    v, x = verdicts["PADD above every baseline and ablation"]
    assert v == "does not hold" and "kd_only" in x and "rspo" not in x
    assert verdicts["router shift over the last third: PR-GRPO < RSPO < GRPO"][0] == "holds"
    assert verdicts["PADD MaxVio <= 0.2"][0] == "holds"  # 0.1
    assert verdicts["study wall time <= 60 min"][0] == "holds"
    ms = fake_metrics([0], lambda n, s: {"s4": 0.28, "teacher": 0.26}.get(n, 0.2))
    ms["s4", 0]["max_vio"] = 0.5
    verdicts = {t: v for t, v, _ in claims(build_summary(ms, [0], "tiny", "abc", variants=["padd"]))}
    assert verdicts["PADD >= teacher + 3 points"] == "does not hold"  # +2 points
    assert verdicts["PADD above every baseline and ablation"] == "not measured"  # nothing to compare with
    # one variant above PADD decides it even when others are missing; none above with some missing does not
    summ = build_summary(ms, [0], "tiny", "abc", variants=["padd", "kd_only"])
    assert {t: v for t, v, _ in claims(summ)}["PADD above every baseline and ablation"] == "not measured"
    ms["s2", 0]["acc"] = 0.5
    summ = build_summary(ms, [0], "tiny", "abc", variants=["padd", "kd_only"])
    assert {t: v for t, v, _ in claims(summ)}["PADD above every baseline and ablation"] == "does not hold"
    assert verdicts["PADD MaxVio <= 0.2"] == "does not hold"
    assert verdicts["study wall time <= 60 min"] == "not measured"


def test_problem_gaps_in_the_write_up_only_where_stored(tmp_path):
    ms = fake_metrics([0, 1], lambda n, s: 0.5)
    summ = build_summary(ms, [0, 1], "tiny", "abc")
    args = (summ, ms, claims(summ), "python ablate.py", [], (60.0, 30.0, [], {}), {}, str(tmp_path / "R.md"))
    assert report.problem_gaps(ms, [0, 1], VARIANTS) == {}
    assert "| kd_only | +0.0 +0.0 | +0.0 ± 0.0 | not stored |" in report.markdown(*args)
    for s in (0, 1):
        ms["s4", s]["correct"], ms["s2", s]["correct"], ms["teacher", s]["correct"] = "1100", "1100", "0101"
    gaps = report.problem_gaps(ms, [0, 1], VARIANTS)
    assert set(gaps) == {"teacher", "kd_only"} and gaps["kd_only"] == (0.0, 0.0)
    assert "| kd_only | +0.0 +0.0 | +0.0 ± 0.0 | [+0.0, +0.0] |" in report.markdown(*args, by_problem=gaps)


def test_claims_say_which_gaps_clear_the_test_problems():
    ms = fake_metrics([0, 1, 2], lambda n, s: {"s4": 0.30, "teacher": 0.26}.get(n, 0.2))
    summ = build_summary(ms, [0, 1, 2], "tiny", "abc")
    text = {t: x for t, _, x in claims(summ, by_problem={"teacher": (1.0, 7.0), "kd_only": (-2.0, 0.5),
                                                         "rspo": (0.5, 3.0), "no_stage2": (-4.0, -1.0)})}
    assert "[+1.0, +7.0] over the test problems" in text["PADD >= teacher + 3 points"]
    assert text["PADD above every baseline and ablation"].endswith(
        "over the test problems (95%), PADD is above rspo; below no_stage2; within the noise: kd_only")
    assert "test problems" not in claims(summ)[1][2]  # nothing stored, nothing said


def test_wall_time_is_judged_on_three_seeds_only():
    ms = {("teacher", 0): {"acc": 0.4, "active_params": 1, "total_params": 1}}
    summ = build_summary(ms, [0], "tiny", "abc", variants=[])
    [(_, verdict, text)] = [c for c in claims(summ, wall_seconds=600) if c[0] == "study wall time <= 60 min"]
    assert verdict == "not measured" and "1 seed" in text


def test_late_gamma_from_the_node_logs_explains_an_rspo_equal_to_grpo(tmp_path):
    out = str(tmp_path)
    for seed, g in [(0, 0.99), (1, 0.97)]:
        for algo, node in [("rspo", "s3_rspo"), ("prgrpo", "s3_prgrpo")]:
            d = os.path.dirname(ckpt(out, seed, node))
            os.makedirs(d, exist_ok=True)
            rows = [dict(step=u, gamma=1.0 if u <= 4 else g) for u in range(1, 7)] + [dict(step=6, final=True)]
            with open(os.path.join(d, node + ".jsonl"), "w") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows[:4] + [dict(step=5, gamma=0.5)] + rows[4:]))
            if seed == 0 or algo == "rspo":
                open(ckpt(out, seed, node), "w").close()
    # step 5 was logged twice (a resume): the later record counts; prgrpo of seed 1 never finished
    gamma = late_gamma(out, [0, 1])
    assert gamma == pytest.approx({"rspo": 0.98, "prgrpo": 0.99})  # steps 5, 6 of 6; prgrpo seed 0 only
    assert late_gamma(out, [5]) == {}
    ms = fake_metrics([0, 1, 2], lambda n, s: 0.3)
    summ = build_summary(ms, [0, 1, 2], "tiny", "abc")
    rs = "router shift over the last third: PR-GRPO < RSPO < GRPO"
    near = {t: x for t, _, x in claims(summ, gamma={"rspo": 0.998})}[rs]
    far = {t: x for t, _, x in claims(summ, gamma=gamma)}[rs]
    assert "rspo 0.9980" in near and "stays close to GRPO" in near
    assert "rspo 0.9800" in far and "stays close to GRPO" not in far


def test_paired_router_shift_is_read_seed_by_seed_from_the_nodes():
    ms = fake_metrics([0, 1, 2], lambda n, s: 0.3)
    for s, (g, r, p) in enumerate([(4.0, 3.8, 1.5), (4.0, 4.2, 1.5), (5.0, 4.5, 1.0)]):
        for node, v in (("s3_grpo", g), ("s3_rspo", r), ("s3_prgrpo", p)):
            ms[node, s]["router_shift"] = v
    shifts = seed_shifts(ms, [0, 1, 2])
    assert shifts == {"grpo": [4.0, 4.0, 5.0], "rspo": [3.8, 4.2, 4.5], "prgrpo": [1.5, 1.5, 1.0]}
    text = paired_shift_text(shifts)
    assert "rspo vs grpo -5%, +5%, -10% (2 of 3 below; mean -3% ± 19%)" in text
    assert "prgrpo vs rspo" in text and "(3 of 3 below;" in text
    del ms["s3_rspo", 2]  # an unfinished node leaves its algorithm out rather than pairing fewer seeds
    assert "rspo" not in seed_shifts(ms, [0, 1, 2]) and paired_shift_text(seed_shifts(ms, [0, 1, 2])) == ""
    summ = build_summary(fake_metrics([0, 1, 2], lambda n, s: 0.3), [0, 1, 2], "tiny", "abc")
    rs = "router shift over the last third: PR-GRPO < RSPO < GRPO"
    assert "2 of 3 below" in {t: x for t, _, x in claims(summ, shifts=shifts)}[rs]
    # the means are in order (the fake curves), but RSPO against GRPO is -5%, +5%, -10%: noise
    assert {t: v for t, v, _ in claims(summ)}[rs] == "holds"
    verdict, text = {t: (v, x) for t, v, x in claims(summ, shifts=shifts)}[rs]
    assert verdict == "does not hold" and "within the seeds' noise: rspo vs grpo" in text
    assert "prgrpo vs rspo" not in text.split("noise:")[1]
    clear = dict(shifts, rspo=[3.6, 3.5, 4.5])  # -10%, -12.5%, -10%: below on every seed, tightly
    assert {t: v for t, v, _ in claims(summ, shifts=clear)}[rs] == "holds"
    # a router that never moved (the tiny preset) has no relative gap: that seed is left out
    still = dict(shifts, grpo=[0.0, 4.0, 0.0])
    assert shift_gaps(still)["rspo", "grpo"][0] == pytest.approx([100 * (4.2 - 4.0) / 4.0])
    assert ("rspo", "grpo") not in shift_gaps(dict(shifts, grpo=[0.0, 0.0, 0.0]))
    assert "rspo vs grpo" not in paired_shift_text(dict(shifts, grpo=[0.0, 0.0, 0.0]))


# ----------------------------------------------------------------------------- the RL-algorithm study

def md_args(summ, ms, tmp_path, figs=None):
    """markdown()'s positional arguments for a study with no node commands, timings or sweeps."""
    return (summ, ms, claims(summ), "python ablate.py", [], (60.0, 30.0, [], {}), figs or {}, str(tmp_path / "R.md"))


def test_each_algorithm_runs_from_stage2_with_and_without_the_mismatch():
    assert report.MISMATCH == ["--lag", "2", "--rollout-dtype", "bf16"]
    assert report.ALGOS == ("grpo", "gspo", "r3", "rspo", "prgrpo")
    for a in report.ALGOS:
        plain, mm = command(f"s3_{a}", 0, "tiny", "o"), command(f"s3_{a}_mm", 0, "tiny", "o")
        assert inputs(f"s3_{a}_mm") == inputs(f"s3_{a}") == ["s2", "teacher"]
        assert plain[-2:] == ["--algo", a] and "--lag" not in plain
        assert mm[-6:] == ["--algo", a, "--lag", "2", "--rollout-dtype", "bf16"]
        at = plain.index("--out") + 1  # each writes its own checkpoint; otherwise the same command plus MISMATCH
        assert (plain[at], mm[at]) == (ckpt("o", 0, f"s3_{a}"), ckpt("o", 0, f"s3_{a}_mm"))
        assert mm[:at] + mm[at + 1:] == plain[:at] + plain[at + 1:] + report.MISMATCH
        assert report.RS_NODES[a] == f"s3_{a}" and report.RS_NODES[f"{a}+mismatch"] == f"s3_{a}_mm"
    # --extra still comes last, so a sweep can override the mismatch's flags
    assert command("s3_r3_mm", 0, "tiny", "o", ablate.parse_extra(["stage3=--lag 0"]))[-2:] == ["--lag", "0"]
    assert {v: VARIANTS[v][0] for v in VARIANTS if v.endswith("_mismatch")} == {
        "vanilla_grpo_mismatch": "s3_grpo_mm", "gspo_mismatch": "s3_gspo_mm", "r3_mismatch": "s3_r3_mm",
        "rspo_mismatch": "s3_rspo_mm", "prgrpo_mismatch": "s3_prgrpo_mm"}
    assert VARIANTS["gspo"][0] == "s3_gspo" and VARIANTS["r3"][0] == "s3_r3"
    assert len(report.RS_NODES) == 10 and len(NODES) == 23
    assert ancestors(["gspo_mismatch"]) == ["teacher", "s1_cluster", "s2", "s3_gspo_mm"]


def test_padd_is_compared_with_the_runs_without_the_mismatch(tmp_path):
    ms = fake_metrics([0, 1], lambda n, s: {"s4": 0.3, "s3_grpo_mm": 0.5}.get(n, 0.2))
    summ = build_summary(ms, [0, 1], "tiny", "abc")
    verdict, text = {t: (v, x) for t, v, x in claims(summ)}["PADD above every baseline and ablation"]
    assert verdict == "holds" and "mismatch" not in text
    assert "| vanilla_grpo_mismatch |" in report.markdown(*md_args(summ, ms, tmp_path))
    ms["s3_gspo", 1]["acc"] = 0.9  # a new baseline above PADD does count
    verdict, text = {t: (v, x) for t, v, x in claims(build_summary(ms, [0, 1], "tiny", "abc"))}[
        "PADD above every baseline and ablation"]
    assert verdict == "does not hold" and "gspo" in text


def test_sampled_accuracy_where_every_seed_stores_it(tmp_path):
    ms = fake_metrics([0, 1], lambda n, s: 0.2)
    for s, x in ((0, 0.1), (1, 0.3)):
        for node in ("teacher", "s2", "s4"):
            ms[node, s]["acc_sampled"] = x + (0.05 if node == "s4" else 0.0)
    del ms["s4", 1]["acc_sampled"]
    summ = build_summary(ms, [0, 1], "tiny", "abc")
    assert summ["teacher"]["acc_sampled"] == pytest.approx(0.2)
    assert summ["variants"]["kd_only"]["acc_sampled_per_seed"] == pytest.approx([0.1, 0.3])
    assert "acc_sampled" not in summ["variants"]["padd"]  # one seed without it: left out, not averaged over one
    assert "acc_sampled" not in summ["variants"]["rspo"]
    assert report.paired_gaps(summ, "acc_sampled") == {}
    text = report.markdown(*md_args(summ, ms, tmp_path))
    assert "| kd_only | Stages I-II: distillation only, no RL | 20.0 ± 0.0 | 20.0 20.0 | 20.0 ± 127.1 |" in text
    assert "| padd | Stages I-IV (PADD) | 20.0 ± 0.0 | 20.0 20.0 |  |" in text
    ms["s4", 1]["acc_sampled"] = 0.35
    gaps = report.paired_gaps(build_summary(ms, [0, 1], "tiny", "abc"), "acc_sampled")
    assert set(gaps) == {"teacher", "kd_only"} and gaps["kd_only"][0] == pytest.approx([5.0, 5.0])


def test_sampled_gaps_over_the_test_problems_use_k(tmp_path):
    ms = fake_metrics([0], lambda n, s: 0.5)
    for node, grades_k, acc in (("s4", "8888", 1.0), ("s2", "4444", 0.5), ("teacher", "4444", 0.5)):
        ms[node, 0].update(correct_sampled=grades_k, samples=8, acc_sampled=acc, correct="1100")
    ms["teacher", 0]["samples"] = 4  # another k: not paired
    gaps = report.problem_gaps(ms, [0], VARIANTS, sampled=True)
    assert gaps == {"kd_only": (50.0, 50.0)}  # every problem 8/8 against 4/8
    assert report.problem_gaps(ms, [0], VARIANTS)["kd_only"] == (0.0, 0.0)
    summ = build_summary(ms, [0], "tiny", "abc")
    text = report.markdown(*md_args(summ, ms, tmp_path), by_problem=report.problem_gaps(ms, [0], VARIANTS),
                           by_problem_sampled=gaps)
    assert "| kd_only | +0.0 | +0.0 ± 0.0 | [+0.0, +0.0] | +50.0 | +50.0 ± 0.0 | [+50.0, +50.0] |" in text
    # the teacher's greedy grades pair with PADD's; its sampled ones, at another k, do not
    assert "| teacher | +0.0 | +0.0 ± 0.0 | [+0.0, +0.0] | +50.0 | +50.0 ± 0.0 | not stored |" in text


def drift_metrics(seeds, late_rs):
    """fake_metrics plus drift curves (6 steps) for every RL node: late_rs(node, seed) is the
    router shift of steps 5 and 6 (the last third), 1.0 before; the probe is read every other step."""
    ms = fake_metrics(seeds, lambda n, s: 0.3)
    for (node, s), m in ms.items():
        if node in report.RS_NODES.values():
            rs = [None if u % 2 else (late_rs(node, s) if u > 4 else 1.0) for u in range(1, 7)]
            m.update(drift_curve={"step": list(range(1, 7)), "router_shift": rs, "topk_changed": [0.1 * s] * 6,
                                  "extreme_ratio": [0.01] * 6, "rs_samples": [0.0] * 6},
                     train_acc_curve=[0.1 * u for u in range(1, 7)], router_shift=late_rs(node, s))
    return ms


def test_drift_per_step_means_and_bands_by_hand():
    ms = fake_metrics([0, 1], lambda n, s: 0.3)
    for s, rs, topk, reward in ((0, [None, 0.2, 0.4], [0.1, 0.2, 0.3], [0.0, 0.5, 1.0]),
                                (1, [None, 0.4, 0.6], [0.3, float("nan"), 0.5], [0.5, 0.5, 0.5])):
        ms["s3_grpo", s].update(drift_curve={"step": [1, 2, 3], "router_shift": rs, "topk_changed": topk,
                                             "rs_samples": [0.0] * 3}, train_acc_curve=reward)
    ms["s3_grpo", 0]["drift_curve"]["extreme_ratio"] = [0.0] * 3  # seed 1 has none: left out
    ms["s3_rspo", 0]["drift_curve"] = ms["s3_grpo", 0]["drift_curve"]  # seed 1 of rspo has no curve at all
    # the reward probe: right samples of 4 on each of two problems, at the start and at the end
    ms["s3_grpo", 0]["reward_probe"] = dict(start=[1, 2], end=[2, 4], samples=4)
    ms["s3_grpo", 1]["reward_probe"] = dict(start=[0, 0], end=[0, 4], samples=4)
    summ = build_summary(ms, [0, 1], "tiny", "abc")
    assert set(summ["drift"]) == {"grpo"}
    d = summ["drift"]["grpo"]
    assert d["steps"] == [1, 2, 3]
    assert d["router_shift"][0] is None and d["router_shift_ci95"][0] is None  # not probed at step 1
    assert d["router_shift"][1:] == pytest.approx([0.3, 0.5])
    assert d["router_shift_ci95"][1:] == pytest.approx([12.706 * math.sqrt(0.02) / math.sqrt(2)] * 2)
    assert d["topk_changed"][0] == pytest.approx(0.2) and d["topk_changed"][1] is None  # a NaN: no mean of one seed
    assert d["reward"] == pytest.approx([0.25, 0.5, 0.75])
    assert "extreme_ratio" not in d and "extreme_ratio" not in d["last_third"]
    # the last third: steps past 2; each seed's mean, for the interval over seeds
    assert d["last_third"]["router_shift"] == pytest.approx([0.4, 0.6])
    assert d["last_third"]["topk_changed"] == pytest.approx([0.3, 0.5])
    assert d["reward_tenths"] == {"first": pytest.approx([0.0, 0.5]), "last": pytest.approx([1.0, 0.5])}
    assert d["reward_probe"]["start"] == pytest.approx([0.375, 0.0]) and d["reward_probe"]["end"] == pytest.approx([0.75, 0.5])
    # paired by problem over both seeds: problem 1 rose by 1 of 8 samples, problem 2 by 6 of 8;
    # a resample of two problems is both first (0.125), both second (0.75) or one each
    assert d["reward_probe"]["rise_interval"] == pytest.approx([0.125, 0.75])
    json.dumps(common.strict(summ), allow_nan=False)
    assert report.tenths({u: float(u) for u in range(1, 21)}) == (1.5, 19.5)  # 20 steps: two per tenth


def test_figure4_verdict_pairs_the_seeds():
    tight = {"prgrpo": [1.0, 1.1, 0.9], "rspo": [2.0, 2.1, 1.9], "grpo": [3.0, 3.1, 2.9]}
    verdict, lines = report.figure4_verdict(tight)
    assert verdict == "holds, beyond the seeds' 95% intervals" and len(lines) == 2
    assert lines[0].startswith("prgrpo 1 vs rspo 2: lower, beyond the seeds' 95% interval (per seed -50%, -48%, -53%;")
    # the seeds spread wide, but each seed's rspo is below its own grpo: paired, that is an order
    wide = {"prgrpo": [1.0, 2.0, 4.0], "rspo": [2.0, 4.0, 8.0], "grpo": [3.0, 6.0, 12.0]}
    assert report.figure4_verdict(wide)[0] == "holds, beyond the seeds' 95% intervals"
    # below in the mean, but one seed the other way: noise
    verdict, lines = report.figure4_verdict(dict(tight, rspo=[2.0, 3.2, 1.0]))
    assert verdict == "holds in the means only, within the seeds' noise"
    assert "rspo 2.067 vs grpo 3: lower in the mean, within the seeds' noise" in lines[1]
    assert report.figure4_verdict(dict(tight, prgrpo=[2.5, 2.6, 2.4]))[0] == "does not hold"
    zeros = {a: [0.0, 0.0] for a in report.FIG4}  # the tiny preset: no router ever moves
    verdict, lines = report.figure4_verdict(zeros)
    assert verdict == "does not hold" and all("not lower" in x for x in lines)
    verdict, lines = report.figure4_verdict({a: v[:1] for a, v in tight.items()})
    assert verdict == "holds in the means only, within the seeds' noise"
    assert "(one seed: no interval)" in lines[0]
    assert report.figure4_verdict(tight, "+mismatch")[0] == "not measured"
    mm = {f"{a}+mismatch": v for a, v in tight.items()}
    assert report.figure4_verdict(mm, "+mismatch")[1][0].startswith("prgrpo+mismatch 1 vs rspo+mismatch 2: lower")


def test_the_rl_section_reads_the_drift_curves_and_says_the_verdict(tmp_path):
    late = {"s3_prgrpo": 1.0, "s3_rspo": 2.0, "s3_grpo": 3.0}  # the mismatch runs: all 2.0 give or take a seed
    ms = drift_metrics([0, 1, 2], lambda n, s: late.get(n, 2.0 + 0.5 * (s - 1)) + 0.01 * s)
    for s in (0, 1, 2):
        ms["s3_grpo", s].update(acc=0.4, reward_probe=dict(start=[1, 1], end=[3, 3], samples=4))
    summ = build_summary(ms, [0, 1, 2], "tiny", "abc")
    assert set(summ["drift"]) == set(report.RS_NODES)
    assert summ["drift"]["prgrpo"]["last_third"]["router_shift"] == pytest.approx([1.0, 1.01, 1.02])  # step 6 only
    text = report.markdown(*md_args(summ, ms, tmp_path))
    assert "## RL algorithms" in text
    # one verdict per claim: without the mismatch it is the claims list's (paired over seeds)
    assert text.count("Figure 4's claim") == 1
    assert ("Figure 4's claim, router shift over the last third PR-GRPO < RSPO < GRPO, under the mismatch "
            "(without it: the claims list below): does not hold.") in text
    assert "- prgrpo+mismatch 2.01 vs rspo+mismatch 2.01: not lower (per seed +0%, +0%, +0%;" in text
    row = next(x for x in text.splitlines() if x.startswith("| grpo |"))
    # greedy 40.0, +10 points over kd_only on every seed; no sampled grades stored; reward 0.1 -> 0.6;
    # on the probe 0.25 -> 0.75
    assert row.startswith("| grpo | 40.0 ± 0.0 | +10.0 ± 0.0 |  |  | 0.1 ± 0 | 0.6 ± 0 | 0.5 ± 0 [+0.500, +0.500] | 3.01 ± ")
    assert row.endswith(f"| 0.1 ± {4.303 * 0.1 / math.sqrt(3):.4g} | 0.01 ± 0 |")  # top-k changed 0, 0.1, 0.2


def test_stage4_against_no_stage4_with_intervals(tmp_path):
    ms = fake_metrics([0, 1, 2], lambda n, s: 0.3)
    for s, v in enumerate([0.1, 0.2, 0.3]):
        ms["s4", s]["max_vio"], ms["s3_prgrpo", s]["max_vio"] = v, 0.5
    lines = report.stage4_lines(ms, [0, 1, 2])
    assert "| MaxVio | 0.5 | 0.2 | -0.4 -0.3 -0.2 | -0.3 ± 0.248 |  |" in lines
    assert f"- MaxVio: padd minus no_stage4 -0.3 ± 0.248, below 0 beyond its 95% interval." in lines
    assert "- greedy pass@1 (points): padd minus no_stage4 +0 ± 0, its 95% interval holds 0." in lines
    assert not any("sampled" in x for x in lines)  # not stored: not said
    for node in ("s4", "s3_prgrpo"):
        for s in (0, 1, 2):
            ms[node, s].update(acc_sampled=0.3, correct_sampled="40", samples=8, correct="10")
    lines = report.stage4_lines(ms, [0, 1, 2])
    assert ("- sampled pass@1 (points): padd minus no_stage4 +0 ± 0, its 95% interval holds 0; over the test "
            "problems [+0.0, +0.0], which holds 0.") in lines
    assert "## Stage IV against no_stage4" in report.markdown(*md_args(build_summary(ms, [0, 1, 2], "tiny", "abc"), ms, tmp_path))
    del ms["s4", 2]
    assert report.stage4_lines(ms, [0, 1, 2]) == []


def test_specialisation_from_the_route_counts(tmp_path):
    ms = fake_metrics([0, 1], lambda n, s: 0.3)
    diag, flat = [[10, 0], [0, 10]], [[5, 5], [5, 5]]  # 1 bit (the expert names the subject), 0 bits
    for s in (0, 1):
        ms["s1_cluster", s]["route_counts"] = [diag, diag]
        ms["s4", s]["route_counts"] = [flat, diag]
    summ = build_summary(ms, [0, 1], "tiny", "abc", teacher_counts={0: [diag, flat], 1: [diag, flat]})
    spec = summ["specialisation"]
    assert list(spec) == ["teacher_clusters", "stage1", "final", "random_router"]
    assert spec["stage1"]["per_layer"] == pytest.approx([1.0, 1.0]) and spec["stage1"]["mean"] == pytest.approx(1.0)
    assert spec["final"]["per_layer"] == pytest.approx([0.0, 1.0]) and spec["final"]["mean_per_seed"] == pytest.approx([0.5, 0.5])
    assert spec["teacher_clusters"]["per_layer"] == pytest.approx([1.0, 0.0])
    assert 0 <= spec["random_router"]["mean"] < 0.3  # a subject-blind router: near 0, above it by chance
    text = report.markdown(*md_args(summ, ms, tmp_path))
    assert "| stage1 | 1.0000 | 1.0000 | 1.0000 | 0.0000 |" in text and "| final | 0.0000 | 1.0000 | 0.5000 |" in text
    del ms["s4", 1]["route_counts"]  # one seed without them: the rows they feed are left out
    assert list(build_summary(ms, [0, 1], "tiny", "abc")["specialisation"]) == ["stage1"]
    del ms["s1_cluster", 0]["route_counts"]
    assert "specialisation" not in build_summary(ms, [0, 1], "tiny", "abc")
    assert "## Specialisation" not in report.markdown(*md_args(build_summary(ms, [0, 1], "tiny", "abc"), ms, tmp_path))


def test_the_teachers_route_counts_are_cached_under_the_digests(tmp_path):
    out = str(tmp_path)
    for node in ("teacher", "s1_cluster"):
        os.makedirs(os.path.dirname(ckpt(out, 0, node)), exist_ok=True)
        with open(ckpt(out, 0, node), "w") as f:
            f.write(f"not a checkpoint: {node}")  # loading one would fail, so a hit never loads
    key = {"teacher": common.file_digest(ckpt(out, 0, "teacher")),
           "s1_cluster": common.file_digest(ckpt(out, 0, "s1_cluster")), "n": 42}
    with open(ckpt(out, 0, "teacher_route_counts", ".json"), "w") as f:
        json.dump({"key": key, "counts": [[[1, 2]]]}, f)
    assert report.teacher_route_counts(out, 0, 42) == [[[1, 2]]]
    with pytest.raises(common.UserError):  # other problems (or another teacher): counted again
        report.teacher_route_counts(out, 0, 700)
    ms = fake_metrics([0], lambda n, s: 0.3)
    assert report.teacher_counts(out, [0], ms) == {}  # no route_counts stored to compare with: not counted
    for node in ("s1_cluster", "s4"):
        ms[node, 0].update(route_counts=[[[1, 1]]], correct="0" * 42)
    assert report.teacher_counts(out, [0], ms) == {0: [[[1, 2]]]}


def test_old_checkpoints_and_new_ones_draw_their_figures(tmp_path):
    old = fake_metrics([0, 1], lambda n, s: 0.3)  # no sampled pass@1, drift or route counts
    summ = build_summary(old, [0, 1], "tiny", "abc")
    figs = report.plot_all(summ, old, str(tmp_path / "old"))
    assert set(figs) == {"ablation_bars", "heatmaps", "router_shift", "router_shift_ecdf", "expert_load"}
    text = report.markdown(*md_args(summ, old, tmp_path), by_problem=report.problem_gaps(old, [0, 1], VARIANTS),
                           by_problem_sampled=report.problem_gaps(old, [0, 1], VARIANTS, sampled=True))
    assert "Figure 4's claim" in text and "## Specialisation" not in text and "sampled pass@1: the share" not in text
    new = drift_metrics([0, 1], lambda n, s: 1.0 + s)
    figs = report.plot_all(build_summary(new, [0, 1], "tiny", "abc"), new, str(tmp_path / "new"))
    assert {"drift_router_shift", "drift_topk_changed", "drift_extreme_ratio", "reward"} <= set(figs)
    assert all(os.path.getsize(p) > 0 for p in figs.values())
    report.markdown(*md_args(build_summary(new, [0, 1], "tiny", "abc"), new, tmp_path, figs))  # every figure has a caption


# ----------------------------------------------------------------------------- sweeps: --extra, --reuse

def test_extra_flags_reach_every_node_of_their_stage_and_nothing_else():
    extra = ablate.parse_extra(["stage3=--mu 4", "stage3=--lr 2e-4", "stage4=--steps 3"])
    assert extra == {"stage3_prgrpo.py": ["--mu", "4", "--lr", "2e-4"], "stage4_balance.py": ["--steps", "3"]}
    assert command("s3_rspo", 0, "tiny", "o", extra)[-6:] == ["--algo", "rspo", "--mu", "4", "--lr", "2e-4"]
    assert command("s2", 0, "tiny", "o", extra) == command("s2", 0, "tiny", "o")
    # what an extra flag can change: its stage's nodes and everything downstream of them
    assert [n for n in NODES if ablate.touched(n, extra)] == [n for n in NODES if NODES[n][0] in
                                                             ("stage3_prgrpo.py", "stage4_balance.py")]
    assert [n for n in NODES if ablate.touched(n, ablate.parse_extra(["stage2=--steps 9"]))] == [
        "s2", "s2_random", "s3_prgrpo", "s3_grpo", "s3_rspo", "s3_gspo", "s3_r3", "s3_grpo_mm", "s3_gspo_mm",
        "s3_r3_mm", "s3_rspo_mm", "s3_prgrpo_mm", "s3_prgrpo_random", "s4", "s4_nos3", "s4_random"]
    for bad in ["stage5=--mu 4", "--mu 4", "mu=4"]:
        with pytest.raises(common.UserError, match="STAGE=FLAGS"):
            ablate.parse_extra([bad])


def test_an_out_folder_keeps_its_plan(tmp_path):
    out = str(tmp_path / "o")
    plain, mu4 = {"preset": "tiny", "extra": {}}, {"preset": "tiny", "extra": {"stage3_prgrpo.py": ["--mu", "4"]}}
    ablate.check_plan(out, plain, write=False)  # nothing there, nothing written
    assert not os.path.exists(out)
    ablate.check_plan(out, plain, write=True)
    ablate.check_plan(out, plain, write=True)  # the same plan again: fine
    for other in (mu4, {"preset": "default", "extra": {}}):
        with pytest.raises(common.UserError, match="give another --out"):
            ablate.check_plan(out, other, write=True)


def test_reuse_links_only_what_the_extra_flags_cannot_change(tmp_path):
    src, out = str(tmp_path / "plain"), str(tmp_path / "mu4")
    nodes = ancestors(["rspo", "padd"])
    for node, seed in ablate.jobs_of(nodes, [0, 1]):
        os.makedirs(os.path.dirname(ckpt(src, seed, node)), exist_ok=True)
        with open(ckpt(src, seed, node), "w") as f:
            f.write(f"{node} {seed}")
    extra = ablate.parse_extra(["stage3=--mu 4"])
    assert ablate.check_reuse(src, "tiny") == {}  # an older study without plan.json counts as plain
    assert ablate.link_reused(nodes, [0, 1], out, src, extra) == 3 * 2  # teacher, s1_cluster and s2 per seed
    with open(ckpt(out, 1, "s2")) as f:
        assert f.read() == "s2 1"
    assert not os.path.exists(ckpt(out, 0, "s3_rspo")) and not os.path.exists(ckpt(out, 0, "s4"))
    assert ablate.link_reused(nodes, [0, 1], out, src, extra) == 0  # already there
    # the sweep's folder lends back to a plain run what its flags did not touch, same preset only
    ablate.check_plan(out, {"preset": "tiny", "extra": extra}, write=True)
    back = str(tmp_path / "plain_again")
    assert ablate.link_reused(nodes, [0, 1], back, out, {} | ablate.check_reuse(out, "tiny")) == 3 * 2
    assert not os.path.exists(ckpt(back, 0, "s3_rspo"))
    with pytest.raises(common.UserError, match="preset"):
        ablate.check_reuse(out, "default")
    # a source whose Stage II had flags of its own lends only the teacher and Stage I
    ablate.check_plan(src, {"preset": "tiny", "extra": {"stage2_distill.py": ["--steps", "9"]}}, write=True)
    fresh = str(tmp_path / "mu4_again")
    assert ablate.link_reused(nodes, [0, 1], fresh, src, extra | ablate.check_reuse(src, "tiny")) == 2 * 2
    assert not os.path.exists(ckpt(fresh, 0, "s2"))


def test_the_write_up_links_the_sweeps_beside_it(tmp_path):
    ms = fake_metrics([0, 1, 2], lambda n, s: 0.3)
    summ = build_summary(ms, [0, 1, 2], "tiny", "abc")
    md = str(tmp_path / "RESULTS.md")
    args = (summ, ms, claims(summ), "python ablate.py", [], (60.0, 30.0, [], {}), {}, md)
    text = report.markdown(*args, sweeps=[str(tmp_path / "results" / "mu4" / "RESULTS.md")])
    assert "## Earlier studies and sweeps" in text and f"- [{os.path.join('results', 'mu4', 'RESULTS.md')}]" in text
    assert "## Earlier studies and sweeps" not in report.markdown(*args)
    # earlier studies are in docs/journal.md, with or without sweeps beside this one
    for t in (text, report.markdown(*args)):
        assert "described in [docs/journal.md](" in t
    assert "## Earlier studies\n" in report.markdown(*args) and "- [" not in report.markdown(*args)
    assert "| padd | Stages I-IV (PADD) | 30.0 ± 0.0 |" in text


# ----------------------------------------------------------------------------- what a node was made from

def fake_ckpt(path, **extra):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(dict(model={}, config={}, stage="x", tokenizer={}, args={}, metrics={}, **extra), path)


def test_a_node_made_from_other_inputs_runs_again_with_everything_below_it(tmp_path):
    out = str(tmp_path)
    fake_ckpt(ckpt(out, 0, "teacher"))
    t = common.file_digest(ckpt(out, 0, "teacher"))
    fake_ckpt(ckpt(out, 0, "s1_cluster"), made_from={"in": t})
    s1 = common.file_digest(ckpt(out, 0, "s1_cluster"))
    fake_ckpt(ckpt(out, 0, "s2"), made_from={"in": s1, "teacher": t})
    done, nodes = ablate.node_done(out), ancestors(["kd_only"])
    assert ablate.pending_jobs(nodes, [0], done) == []
    fake_ckpt(ckpt(out, 0, "teacher"), note="another teacher copied in")  # s1 and s2 now stale
    done = ablate.node_done(out)
    assert ablate.pending_jobs(nodes, [0], done) == [("s1_cluster", 0), ("s2", 0)]
    with open(ckpt(out, 0, "teacher"), "r+b") as f:  # a teacher cut off: it too runs again
        f.truncate(20)
    assert ablate.pending_jobs(nodes, [0], ablate.node_done(out)) == [("teacher", 0), ("s1_cluster", 0), ("s2", 0)]


def test_schedule_waits_for_a_rerun_input_before_its_user(tmp_path):
    out, calls = str(tmp_path), []
    for node in ("teacher", "s1_cluster"):
        os.makedirs(os.path.join(out, "seed0"), exist_ok=True)
        open(ckpt(out, 0, node), "w").close()
    ran, runner = set(), fake_runner(out, calls)

    def done(node, seed):  # the teacher is stale (another one was copied in) until it has run again
        return (node, seed) in ran or (node != "teacher" and os.path.exists(ckpt(out, seed, node)))

    def run_node(node, seed):
        rc = runner(node, seed)
        ran.add((node, seed))
        return rc
    assert schedule(ancestors(["kd_only"]), [0], out, run_node, jobs=2, done=done) == []
    assert calls == [("teacher", 0), ("s1_cluster", 0), ("s2", 0)]


def test_a_stale_resume_file_of_a_node_is_dropped(tmp_path, capsys):
    out = str(tmp_path)
    fake_ckpt(ckpt(out, 0, "teacher"))
    path = ckpt(out, 0, "s1_cluster") + ".resume.pt"
    fake_ckpt(path, made_from={"in": "the digest of an earlier teacher"})
    ablate.drop_stale_resume(path, 0, "s1_cluster", out)
    assert not os.path.exists(path) and "other inputs" in capsys.readouterr().err
    fake_ckpt(path, made_from={"in": common.file_digest(ckpt(out, 0, "teacher"))})
    ablate.drop_stale_resume(path, 0, "s1_cluster", out)
    assert os.path.exists(path)  # its own inputs: --resume continues it


def test_a_torn_ablate_log_and_a_bad_plan_are_no_traceback(tmp_path, capsys):
    jsonl = tmp_path / "ablate.jsonl"
    jsonl.write_text(json.dumps(dict(node="teacher", seed=0, seconds=1.0, returncode=0, commit="c", time=5.0))
                     + '\n{"node": "s1_cluster", "se')
    assert report.node_commits(str(jsonl), [("teacher", 0), ("s1_cluster", 0)]) == {"c": 1}
    assert "torn" in capsys.readouterr().err
    (tmp_path / "plan.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(common.UserError, match="plan.json"):
        ablate.read_plan(str(tmp_path))
