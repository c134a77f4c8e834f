"""
End to end: the tiny pipeline (what `make smoke` runs) once per test session, then the
checkpoint contract, parameter counts, logs, user errors and determinism on its outputs.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["teacher", "stage1", "stage2", "stage3", "stage4"]


def run(*argv, check=True):
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{argv} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    d = tmp_path_factory.mktemp("smoke")
    r = subprocess.run(["make", "--no-print-directory", "pipeline", f"DIR={d}", "PRESET=tiny",
                        f"PY={sys.executable}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return d, r.stdout


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_checkpoint_contract(smoke):
    d, _ = smoke
    for stage in STAGES:
        ck = load(d / f"{stage}.pt")
        assert ck["stage"] == stage
        assert {"n_expert", "top_k"} <= set(ck["config"])
        assert isinstance(ck["args"], dict) and ck["args"]["preset"] == "tiny"
        m = ck["metrics"]
        assert 0.0 <= m["acc"] <= 1.0
        # the per-problem grades ablate.py pairs variants on: one "0"/"1" per test problem
        assert m["correct"] and set(m["correct"]) <= {"0", "1"}
        assert m["correct"].count("1") / len(m["correct"]) == m["acc"]
        assert m["active_params"] > 0 and m["total_params"] >= m["active_params"]
        assert all(torch.is_tensor(v) for v in ck["model"].values())
        assert "ranks" in ck["tokenizer"]
        assert not os.path.exists(d / f"{stage}.pt.resume.pt")  # removed once the stage finished
    assert load(d / "stage1.pt")["clusters"] is not None


def test_stage4_keeps_stage3s_logit_scale(smoke):
    """Stage III learns a logit scale and bakes it into ln_f; Stage IV takes it back out and
    holds it (--lr-scale 0), so its checkpoint records the same scale."""
    d, _ = smoke
    s3, s4 = (load(d / f"{stage}.pt")["metrics"]["logit_scale"] for stage in ("stage3", "stage4"))
    assert s3 != 1.0 and s4 == pytest.approx(s3, rel=1e-6)


def test_checkpoint_decodes_with_its_own_tokenizer(smoke):
    import data
    d, _ = smoke
    enc = data.tokenizer_from_dict(load(d / "stage4.pt")["tokenizer"])
    text = "What is 12 + 30?\n12 + 30 = 42\n#### 42"
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc.n_vocab == data.get_tokenizer().n_vocab


def test_student_matches_teacher_cost(smoke):
    d, _ = smoke
    t = load(d / "teacher.pt")["metrics"]
    for stage in STAGES[1:]:
        ck = load(d / f"{stage}.pt")
        m = ck["metrics"]
        assert ck["config"]["n_expert"] > 1
        assert abs(m["active_params"] - t["active_params"]) / t["active_params"] <= 0.02
        assert m["total_params"] > t["total_params"]


def test_logs_and_table(smoke):
    d, out = smoke
    for stage in STAGES:
        lines = [json.loads(l) for l in open(d / f"{stage}.jsonl")]
        assert lines, stage
    rs = [l for l in map(json.loads, open(d / "stage3.jsonl")) if "router_shift" in l]
    assert rs and all(l["router_shift"] >= 0 for l in rs)
    assert (d / "stage1_heatmap.png").stat().st_size > 0
    *rows, legend = out.strip().splitlines()[-len(STAGES) - 1:]  # eval_math --table: a row per checkpoint
    assert [row.split()[0] for row in rows] == STAGES
    assert legend.startswith("acc: greedy pass@1; sampled: pass@1 of")


def test_eval_cli_pairs_later_checkpoints_with_the_first(smoke, tmp_path):
    d, _ = smoke
    js = tmp_path / "eval.json"
    r = run("eval_math.py", "--ckpt", str(d / "teacher.pt"), str(d / "stage2.pt"), "--n", "8", "--json", str(js),
            "--device", "cpu")
    res = json.loads(js.read_text())
    t, s = res[str(d / "teacher.pt")], res[str(d / "stage2.pt")]
    assert len(t["correct"]) == len(s["correct"]) == 8 and "minus_first" not in t
    assert s["minus_first"]["points"] == pytest.approx(100 * (s["acc"] - t["acc"]))
    lo, hi = s["minus_first"]["ci95"]
    assert lo <= s["minus_first"]["points"] <= hi
    assert f"stage2.pt minus {d / 'teacher.pt'}" in r.stdout


@pytest.mark.parametrize("script,inp,what,extra", [
    ("stage2_distill.py", "teacher.pt", "dense model", []),      # dense where a student is expected
    ("stage1_cluster.py", "stage2.pt", "MoE student", []),       # student where the teacher is expected
    ("stage3_prgrpo.py", "nope.pt", "not found", []),            # a wrong path
    ("stage1_cluster.py", "teacher.pt", "--n-test", ["--n-test", "0"]),  # nothing to grade
    ("stage3_prgrpo.py", "stage2.pt", "--mu 0", ["--mu", "0"]),  # no update at all
])
def test_user_error_is_one_line_and_harmless(smoke, tmp_path, script, inp, what, extra):
    d, _ = smoke
    out = tmp_path / "existing.pt"
    out.write_bytes(b"an earlier checkpoint")
    r = run(script, "--preset", "tiny", "--in", str(d / inp), "--out", str(out), *extra, check=False)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and what in r.stderr
    assert out.read_bytes() == b"an earlier checkpoint"


def test_corrupt_checkpoint_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = run("eval_math.py", "--ckpt", str(bad), check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "bad.pt" in r.stderr


def test_same_seed_same_numbers(smoke, tmp_path):
    """Stage III (sampling, rewards, updates) run again with the pipeline's arguments."""
    d, _ = smoke
    out = tmp_path / "again.pt"
    run("stage3_prgrpo.py", "--preset", "tiny", "--seed", "0", "--in", str(d / "stage2.pt"), "--out", str(out),
        "--log", str(tmp_path / "again.jsonl"))
    a, b = load(d / "stage3.pt"), load(out)
    drop = lambda m: {k: v for k, v in m.items() if k not in ("seconds", "peak_mem_mib")}  # machine state
    assert drop(a["metrics"]) == drop(b["metrics"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def resume_matches_full_run(tmp_path, script, args):
    """Run `script` to the end; run it again stopped at step 4 and resumed; same weights."""
    full, part = tmp_path / "full.pt", tmp_path / "part.pt"
    run(script, *args, "--out", str(full), "--log", str(tmp_path / "f.jsonl"))
    run(script, *args, "--stop-after", "4", "--out", str(part), "--log", str(tmp_path / "p.jsonl"))
    assert not part.exists() and (tmp_path / "part.pt.resume.pt").exists()
    run(script, *args, "--resume", "--out", str(part), "--log", str(tmp_path / "p.jsonl"))
    a, b = load(full)["model"], load(part)["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_resume_gives_the_same_model(smoke, tmp_path):
    """Stopping half-way and resuming lands where an uninterrupted run does."""
    d, _ = smoke
    resume_matches_full_run(tmp_path, "stage2_distill.py", ["--preset", "tiny", "--in", str(d / "stage1.pt"), "--device", "cpu",
                                                            "--steps", "8", "--eval-every", "4", "--n-test", "5"])
    # the resumed run logs on from step 4: one step-0 record, one record per step, the final
    # one (with acc) last, all as in the uninterrupted run's log
    steps = lambda log: [(r["step"], "acc" in r) for r in map(json.loads, open(tmp_path / log))]
    assert steps("p.jsonl") == steps("f.jsonl") == [(0, False), (4, False), (8, False), (8, True)]


def test_teacher_resume_keeps_its_weight_average(tmp_path):
    """The teacher's checkpoint is its weight average (--ema): a resumed run must pick the average
    up from the resume file, not restart it from the weights, to land where an uninterrupted run does."""
    resume_matches_full_run(tmp_path, "train_teacher.py", ["--preset", "tiny", "--device", "cpu", "--steps", "8",
                                                           "--eval-every", "4", "--n-test", "4", "--ema", "0.9"])


@pytest.mark.parametrize("algo,extra", [("grpo", []), ("rspo", [])])
def test_router_shift_and_lr_logged_for_every_algo(smoke, tmp_path, algo, extra):  # prgrpo: the smoke pipeline's
    d, _ = smoke
    log = tmp_path / "s3.jsonl"
    run("stage3_prgrpo.py", "--preset", "tiny", "--steps", "2", "--n-test", "5", "--algo", algo, "--in",
        str(d / "stage2.pt"), "--out", str(tmp_path / "s3.pt"), "--log", str(log), "--device", "cpu", *extra)
    rs = [l for l in map(json.loads, open(log)) if "router_shift" in l]
    assert rs and all(l["algo"] == algo and l["router_shift"] >= 0 for l in rs)
    # and the default schedule: 3e-5 cosine-decayed to 10% over the run's 2 steps
    lrs = [l["lr"] for l in map(json.loads, open(log)) if "lr" in l]
    assert lrs == [common.lr_at(s, 2, 3e-5, final=0.1) for s in range(2)] and lrs[1] < lrs[0]


@pytest.mark.parametrize("algo", ["grpo", "prgrpo"])
def test_policy_gradient_raises_the_reward_it_is_given(smoke, tmp_path, algo):
    """The RL loop learns what its reward asks. The tiny student never answers right, so the
    reward here is a length one, -(completion tokens), group-normalised like GRPO's and passed
    in through the advantages hook Stage IV uses; everything after the reward is the real loop
    (rollout, buckets, clipped surrogate, mu passes, AdamW). 8 steps at a large lr must shorten
    the samples (with the sign flipped, checked by hand, they grow to the 32-token cap instead).
    Both run without the gold term, which pulls toward the gold solutions' length whatever the
    reward says (with it, the lengths turn back up after step 6)."""
    import stage3_prgrpo as s3
    from rl import group_advantages
    d, _ = smoke
    lengths = []

    def advantages(student, ro):
        n = (ro["targets"] >= 0).sum(1).float()
        lengths.append(float(n.mean()))
        return group_advantages(-n, args.group)

    args = s3.parser.parse_args(["--preset", "tiny", "--algo", algo, "--steps", "8", "--lr", "3e-3", "--lr-final", "1",
                                 "--n-test", "2", "--in", str(d / "stage2.pt"), "--device", "cpu",
                                 "--out", str(tmp_path / "s3.pt"), "--log", str(tmp_path / "s3.jsonl"), "--w-gold", "0"])
    args.max_new = 32  # a preset value: shorter than the tiny preset's, so that 8 steps show the trend
    s3.train(args, advantages=advantages)
    assert len(lengths) == 8
    assert sum(lengths[-3:]) / 3 < 0.5 * lengths[0], lengths


@pytest.mark.parametrize("algo", ["gspo", "r3"])
def test_the_mismatch_runs_and_every_step_logs_the_drift(smoke, tmp_path, algo):
    """--lag and --rollout-dtype through the real loop: rollouts from a bf16 copy one update
    behind, so the first pass's ratio is no longer exactly 1; the drift metrics of every step
    are stored, and the probe's router shift every rs_every steps."""
    import stage3_prgrpo as s3
    d, _ = smoke
    out = tmp_path / "s3.pt"
    s3.train(s3.parser.parse_args(["--preset", "tiny", "--algo", algo, "--steps", "3", "--lag", "1", "--rollout-dtype",
                                   "bf16", "--n-test", "2", "--in", str(d / "stage2.pt"), "--device", "cpu",
                                   "--out", str(out), "--log", str(tmp_path / "s3.jsonl")]))
    m = load(out)["metrics"]
    assert m["lag"] == 1 and m["rollout_dtype"] == "bf16"
    drift = m["drift_curve"]
    assert drift["step"] == [1, 2, 3]
    for k in ("topk_changed", "extreme_ratio", "rs_samples", "router_shift"):
        assert len(drift[k]) == 3 and all(v is not None and 0 <= v <= 2 for v in drift[k]), (k, drift[k])
    assert sum(drift["rs_samples"]) > 0  # bf16 routing is not fp32's
    steps = [r for r in map(json.loads, open(tmp_path / "s3.jsonl")) if not r.get("final")]
    assert [r["topk_changed"] for r in steps] == drift["topk_changed"]


def test_stage3_gold_term_lowers_the_gold_cross_entropy(smoke, tmp_path):
    """PR-GRPO's kept Stage II cross-entropy (--w-gold) must pull the student toward the gold
    solutions: the same 3 steps, with and without it, from the same Stage II student."""
    import data
    d, _ = smoke
    teacher = load(d / "teacher.pt")
    train = data.build_splits(seed=common.data_seed(teacher))["train"].to_list()[:64]

    def gold_ce(path):
        ck = load(path)
        enc = data.tokenizer_from_dict(ck["tokenizer"])
        idx, targets, _ = common.pad_batch(*zip(*[data.encode_example(enc, ex) for ex in train]), "cpu")
        with torch.no_grad():
            return float(common.build_model(ck, "cpu").eval()(idx, targets)[1])

    ce = {}
    for wg in ("0", "20"):
        out = tmp_path / f"s3_wg{wg}.pt"
        run("stage3_prgrpo.py", "--preset", "tiny", "--steps", "3", "--n-test", "2", "--lr", "1e-3", "--w-gold", wg,
            "--in", str(d / "stage2.pt"), "--out", str(out), "--device", "cpu", "--log", str(tmp_path / "s3.jsonl"))
        ce[wg] = gold_ce(out)
    assert ce["20"] < ce["0"]
    logged = [l["loss_gold"] for l in map(json.loads, open(tmp_path / "s3.jsonl")) if "loss_gold" in l]
    assert len(logged) == 3  # one per step, from the --w-gold 20 run only


def test_stage2_bias_balances_the_routing(smoke, tmp_path):
    """Stage II's selection bias (--bias-rate) must even out the experts' load: the same 12 steps
    from the same Stage I student, with and without it, routed on the same training problems."""
    import data
    import eval_math
    d, _ = smoke
    train = data.build_splits(seed=common.data_seed(load(d / "teacher.pt")))["train"].to_list()[:128]

    def routed_max_vio(path):
        ck = load(path)
        enc = data.tokenizer_from_dict(ck["tokenizer"])
        idx, _, valid = common.pad_batch(*zip(*[data.encode_example(enc, ex) for ex in train]), "cpu")
        model = common.build_model(ck, "cpu").eval()
        with torch.no_grad():
            model(idx)
        load_ = common.global_load([f.topk_idx[valid.flatten()] for f in model.ffns], model.config.n_expert)
        return float(eval_math.max_vio(load_).mean()), ck["model"]

    vio = {}
    for u in ("0", "0.05"):
        out = tmp_path / f"s2_u{u}.pt"
        run("stage2_distill.py", "--preset", "tiny", "--steps", "12", "--n-test", "2", "--bias-rate", u,
            "--in", str(d / "stage1.pt"), "--out", str(out), "--device", "cpu", "--log", str(tmp_path / "s2.jsonl"))
        vio[u], weights = routed_max_vio(out)
        biases = [v for k, v in weights.items() if k.endswith("select_bias")]
        assert biases and all((b.abs().sum() > 0) == (u != "0") for b in biases)
    assert vio["0.05"] < vio["0"]


def test_stage3_resume_with_the_logit_scale_lands_where_a_full_run_does(smoke, tmp_path, monkeypatch):
    """The resume file holds the student with its logit scale (parametrized names), the
    scale's optimizer group and the reward probe's start; resumed from step 10 of 12, with a
    lagged bf16 copy that also carries the scale, the run ends on the uninterrupted run's
    weights, scale and probe."""
    import common
    import stage3_prgrpo as s3
    d, _ = smoke
    monkeypatch.setattr(common, "clear_resume", lambda args: None)  # keep step 10's resume file

    def train(name, *extra):
        return s3.train(s3.parser.parse_args(["--preset", "tiny", "--steps", "12", "--n-test", "2", "--lag", "1",
                                              "--rollout-dtype", "bf16", "--in", str(d / "stage2.pt"), "--device", "cpu",
                                              "--out", str(tmp_path / name), "--log", str(tmp_path / f"{name}.jsonl"),
                                              *extra]))
    m = train("full.pt")
    assert m["logit_scale"] != 1.0
    os.replace(tmp_path / "full.pt.resume.pt", tmp_path / "part.pt.resume.pt")
    calls = []
    probe = s3.probe_reward
    monkeypatch.setattr(s3, "probe_reward", lambda *a: calls.append(1) or probe(*a))
    r = train("part.pt", "--resume")
    assert r["logit_scale"] == m["logit_scale"]
    # the reward probe's start is the resume file's, measured before step 1: the resumed run
    # probes once, at its end
    assert len(calls) == 1 and r["reward_probe"] == m["reward_probe"] and len(m["reward_probe"]["start"]) == 16
    assert all(0 <= c <= m["reward_probe"]["samples"] for c in m["reward_probe"]["start"] + m["reward_probe"]["end"])
    logged = [r["step"] for r in map(json.loads, open(tmp_path / "part.pt.jsonl")) if not r.get("final")]
    assert logged == [11, 12]  # it went on from the resume file, not from the start
    a, b = load(tmp_path / "full.pt")["model"], load(tmp_path / "part.pt")["model"]
    assert set(a) == set(b) and not any("parametrizations" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
