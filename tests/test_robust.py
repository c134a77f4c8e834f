"""
What a user can type or do to a run: kill -9 during training and during the save (the old
checkpoint survives, the resumed run lands where an uninterrupted one does), arguments refused
before any work with one line, checkpoints that do not build, torn and non-strict JSON lines.
One tiny teacher of 24 steps is trained per session; everything else is in-process or fails fast.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = ["--preset", "tiny", "--steps", "24", "--eval-every", "4", "--n-test", "2", "--device", "cpu"]
OLD = b"an earlier checkpoint"


def run(*argv, check=True):
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{argv} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def same_weights(a, b):
    a, b = load(a)["model"], load(b)["model"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_line_error(r, what):
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and what in r.stderr, r.stderr


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The uninterrupted run every killed run is compared with."""
    d = tmp_path_factory.mktemp("ref")
    run("train_teacher.py", *TEACHER, "--out", str(d / "teacher.pt"), "--log", str(d / "teacher.jsonl"))
    return d / "teacher.pt"


# ----------------------------------------------------------------------------- kill -9

def test_kill_during_training_keeps_the_old_checkpoint_and_resumes_honestly(teacher, tmp_path):
    out = tmp_path / "teacher.pt"
    out.write_bytes(OLD)
    cmd = [sys.executable, "train_teacher.py", *TEACHER, "--out", str(out), "--log", str(tmp_path / "t.jsonl"), "--resume"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume = tmp_path / "teacher.pt.resume.pt"
    t0 = time.time()
    while not resume.exists() and p.poll() is None and time.time() - t0 < 60:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert resume.exists() and out.read_bytes() == OLD
    # the resume file is another run's once a flag that shapes training differs: refused, untouched
    import train_teacher
    other = train_teacher.parser.parse_args(cmd[2:] + ["--lr", "1e-3"])
    common.setup(other, train_teacher.PRESETS, "teacher", train_teacher.LIMITS)
    model = common.build_model(load(resume), "cpu")
    with pytest.raises(common.UserError, match="--lr 0.003 there, 0.001 here"):
        common.maybe_resume(other, model, torch.optim.AdamW(model.parameters()))
    assert resume.exists() and out.read_bytes() == OLD
    run(*cmd[1:])
    assert same_weights(out, teacher) and not resume.exists()


KILL_IN_SAVE = """
import os, runpy, signal, sys, torch
target, left, real = sys.argv[1], [int(sys.argv[2])], torch.save
def save(obj, f, *a, **k):
    if str(f).startswith(target + ".tmp."):
        if left[0] == 0:  # this save dies: half a file on disk, then kill -9
            with open(f, "wb") as h:
                h.write(b"PK half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        left[0] -= 1
    return real(obj, f, *a, **k)
torch.save = save
sys.argv = ["train_teacher.py"] + sys.argv[3:]
runpy.run_path("train_teacher.py", run_name="__main__")
"""


def test_kill_during_the_save_keeps_the_old_file_and_cleans_up(teacher, tmp_path):
    """Killed writing a resume file, then (resumed) killed writing the checkpoint itself."""
    out, resume = tmp_path / "teacher.pt", tmp_path / "teacher.pt.resume.pt"
    out.write_bytes(OLD)
    args = [*TEACHER, "--out", str(out), "--log", str(tmp_path / "t.jsonl"), "--resume"]
    temps = lambda: sorted(p.name.split(".tmp.")[0] for p in tmp_path.glob("*.tmp.*"))
    r = run("-c", KILL_IN_SAVE, str(resume), "1", *args, check=False)  # step 4's written, step 8's dies
    assert r.returncode == -signal.SIGKILL
    assert out.read_bytes() == OLD and load(resume)["step"] == 4 and temps() == ["teacher.pt.resume.pt"]
    r = run("-c", KILL_IN_SAVE, str(out), "0", *args, check=False)  # on from step 4, dies in the final save
    assert r.returncode == -signal.SIGKILL
    assert out.read_bytes() == OLD and load(resume)["step"] == 20 and temps() == ["teacher.pt"]
    run("train_teacher.py", *args)
    assert same_weights(out, teacher) and not resume.exists()
    assert temps() == []  # each killed save's temp file removed by the next save of that file


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("script,argv,what", [
    ("train_teacher", ["--steps", "0"], "--steps 0: must be at least 1"),
    ("train_teacher", ["--steps", "-5"], "--steps -5"),
    ("train_teacher", ["--eval-every", "0"], "--eval-every 0"),
    ("train_teacher", ["--batch-size", "0"], "--batch-size 0"),
    ("train_teacher", ["--seed", "-1"], "--seed -1"),
    ("train_teacher", ["--lr", "nan"], "--lr nan"),
    ("train_teacher", ["--device", "tpu"], "--device tpu"),
    ("stage1_cluster", ["--n-expert", "1"], "--n-expert 1"),
    ("stage1_cluster", ["--top-k", "0"], "--top-k 0"),
    ("stage2_distill", ["--eval-every", "0"], "--eval-every 0"),
    ("stage2_distill", ["--stop-after", "0"], "--stop-after 0"),
    ("stage3_prgrpo", ["--group", "1"], "--group 1: must be at least 2"),
    ("stage3_prgrpo", ["--lr-scale", "-1"], "--lr-scale -1"),
])
def test_bad_values_are_refused_before_any_work(tmp_path, script, argv, what):
    mod = __import__(script)
    inp = [] if script == "train_teacher" else ["--in", str(tmp_path / "missing.pt")]
    args = mod.parser.parse_args(["--preset", "tiny", *inp, "--out", str(tmp_path / "o.pt"), *argv])
    stage = getattr(args, "stage", script.split("_")[0])
    with pytest.raises(common.UserError, match=what.replace("-", r"\-")):
        common.setup(args, mod.PRESETS, stage, mod.LIMITS)
    assert not os.listdir(tmp_path)


def test_output_must_differ_from_every_input_and_be_writable(tmp_path):
    inp, teacher = tmp_path / "stage1.pt", tmp_path / "teacher.pt"
    inp.write_bytes(OLD)
    teacher.write_bytes(OLD)

    def check(**kw):
        a = dict(inp=str(inp), teacher=None, out=str(tmp_path / "s2.pt"), log=None, seed=0)
        a.update(kw)
        common.check_args(argparse.Namespace(**a), {}, a["log"] or str(tmp_path / "s2.jsonl"))

    check()
    for kw, what in [(dict(out=str(inp)), "--out .* same file as --in"),
                     (dict(out=str(tmp_path / "." / "teacher.pt")), "--out .* same file as --teacher"),  # the implicit one
                     (dict(log=str(teacher)), "--log .* same file as --teacher"),
                     (dict(out=str(tmp_path)), "is a folder"),
                     (dict(out="/proc/no/such/s2.pt"), "cannot write in /proc/no/such")]:
        with pytest.raises(common.UserError, match=what):
            check(**kw)
    assert inp.read_bytes() == teacher.read_bytes() == OLD


def test_stage1_checks_the_experts_against_the_teacher(teacher, tmp_path):
    r = run("stage1_cluster.py", "--preset", "tiny", "--in", str(teacher), "--out", str(tmp_path / "s1.pt"),
            "--n-expert", "3", check=False)  # 256 neurons do not split into 3 balanced clusters
    one_line_error(r, "--n-expert 3 does not divide")
    assert not (tmp_path / "s1.pt").exists() and load(teacher)["stage"] == "teacher"


def test_resume_mismatch_names_the_first_differing_flag():
    saved = dict(out="a.pt", log="a.jsonl", resume=True, seed=0, steps=40, lr=3e-3, device="cpu")
    now = argparse.Namespace(**dict(saved, out="b.pt", log=None, resume=True, device="auto", stop_after=4))
    assert common.resume_mismatch(saved, now) is None
    now.seed, now.steps = 1, 80
    assert common.resume_mismatch(saved, now) == "--seed 0 there, 1 here"
    # the same input spelled another way is the same input (ablate.py given ./out or out)
    saved.update(inp="out/s2.pt", teacher="out/teacher.pt")
    now = argparse.Namespace(**dict(saved, inp="./out/s2.pt", teacher=os.path.abspath("out/teacher.pt")))
    assert common.resume_mismatch(saved, now) is None
    now.inp = "out/s1.pt"
    assert common.resume_mismatch(saved, now) == "--inp out/s2.pt there, out/s1.pt here"


# ----------------------------------------------------------------------------- checkpoints

def test_broken_checkpoints_are_one_line_errors(teacher, tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(common.UserError, match="cannot read checkpoint .*empty.pt"):
        common.load_checkpoint(str(empty))
    ck = load(teacher)
    torch.save(dict(ck, config=dict(ck["config"], bogus=1)), tmp_path / "key.pt")
    with pytest.raises(common.UserError, match="bogus"):
        common.load_checkpoint(str(tmp_path / "key.pt"))
    wrong = common.load_checkpoint(str(teacher))
    wrong["config"] = dict(wrong["config"], n_embd=2 * wrong["config"]["n_embd"])
    with pytest.raises(common.UserError, match="does not build"):
        common.build_model(wrong, "cpu")


def test_a_student_must_match_its_teacher_and_cover_every_layer():
    cfg = dict(vocab_size=10, n_layer=2, n_embd=4, block_size=8, n_expert=4)
    student = dict(stage="stage1", config=cfg, clusters=[torch.arange(16) % 4] * 2)
    common.check_student(student, dict(config=cfg), "s.pt", "t.pt")
    with pytest.raises(common.UserError, match="n_embd 8"):
        common.check_student(student, dict(config=dict(cfg, n_embd=8)), "s.pt", "t.pt")
    with pytest.raises(common.UserError, match="clusters"):  # fewer cluster lists than layers
        common.check_student(dict(student, clusters=student["clusters"][:1]), dict(config=cfg), "s.pt", "t.pt")


def test_the_final_record_is_written_after_the_checkpoint(tmp_path, monkeypatch):
    """A save that fails (a full disk) leaves no metrics record that claims a finished run."""
    import train_teacher
    log = tmp_path / "t.jsonl"
    monkeypatch.setattr(sys, "argv", ["train_teacher.py", "--preset", "tiny", "--steps", "2", "--eval-every", "2",
                                      "--n-test", "1", "--device", "cpu", "--out", str(tmp_path / "t.pt"), "--log", str(log)])

    def full_disk(path, ckpt):
        raise common.UserError(f"cannot write {path}: No space left on device")
    monkeypatch.setattr(common, "save_checkpoint", full_disk)
    with pytest.raises(common.UserError, match="No space"):
        train_teacher.main()
    assert [r for r in common.read_jsonl(str(log)) if "acc" in r] == []


# ----------------------------------------------------------------------------- logs

def test_torn_last_line_is_skipped_and_dropped_before_the_next_record(tmp_path, capsys):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b')  # a full disk cut the last write short
    assert common.read_jsonl(str(p)) == [{"a": 1}, {"a": 2}]
    assert "torn" in capsys.readouterr().err
    common.append_jsonl(str(p), {"a": 4})
    assert [r["a"] for r in common.read_jsonl(str(p))] == [1, 2, 4]
    p.write_text('{"a": 1}\n{"a": 2}')  # a whole record short of its newline is kept
    common.append_jsonl(str(p), {"a": 3})
    assert [r["a"] for r in common.read_jsonl(str(p))] == [1, 2, 3]
    p.write_text('{"a": 1}\nnot json\n{"a": 2}\n')  # not a torn write: the user has to look
    with pytest.raises(common.UserError, match="x.jsonl, line 2"):
        common.read_jsonl(str(p))


def test_logs_are_strict_json(tmp_path):
    p = tmp_path / "x.jsonl"
    common.append_jsonl(str(p), dict(loss=float("nan"), curve=[(1, float("inf")), (2, 0.5)]))
    line = p.read_text()
    assert "NaN" not in line and "Infinity" not in line
    r = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert r["loss"] is None and r["curve"] == [[1, None], [2, 0.5]]


def test_argparse_errors_are_one_line(capsys):
    """A bad choice or an unknown flag ends like every other user error: one line, exit 2."""
    p = common.ArgumentParser()
    p.add_argument("--preset", choices=["tiny", "default"])
    for argv in (["--preset", "huge"], ["--nope"]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:")
