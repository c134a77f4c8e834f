"""Tests for specialisation.py: MI hand cases, the random router's floor, the teacher's routed
counts on a tiny random GPT, and the whole measure (and its command) on a folder of tiny
checkpoints."""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import data  # noqa: E402
import eval_math  # noqa: E402
import specialisation as sp  # noqa: E402
from benchmarks import SUBDOMAINS  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

CONTEXT, N_EXPERT, TOP_K = 128, 4, 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: a second thread costs more than it saves, and on a loaded machine far more."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------
# mutual information
# ----------------------------------------------------------------------------

def test_diagonal_table_with_equal_rows_is_one_bit():
    assert sp.mutual_information([[5, 0], [0, 5]]) == pytest.approx(1.0, abs=1e-12)
    assert sp.normalised_mi([[5, 0], [0, 5]]) == pytest.approx(1.0, abs=1e-12)


def test_independent_table_is_zero():
    table = np.outer([1.0, 2.0, 3.0], [4.0, 5.0, 0.0, 7.0])
    assert abs(sp.mutual_information(table)) < 1e-12
    assert abs(sp.mutual_information(torch.tensor(table))) < 1e-12


def test_two_by_three_hand_case():
    # p(s) = 1/2, 1/2; p(e) = 1/4, 1/2, 1/4; four cells of 1/4 with ratios 2, 1, 1, 2:
    # I = 1/4 (1 + 0 + 0 + 1) = 1/2 bit, and H(S) = 1 bit
    assert sp.mutual_information([[1, 1, 0], [0, 1, 1]]) == pytest.approx(0.5, abs=1e-12)
    assert sp.normalised_mi([[1, 1, 0], [0, 1, 1]]) == pytest.approx(0.5, abs=1e-12)
    # counts, not shares: scaling the table changes nothing
    assert sp.mutual_information([[30, 30, 0], [0, 30, 30]]) == pytest.approx(0.5, abs=1e-12)


def test_specialised_seven_subdomain_table_reaches_h_s():
    table = np.eye(len(SUBDOMAINS), 8) * 100
    assert sp.mutual_information(table) == pytest.approx(math.log2(len(SUBDOMAINS)), abs=1e-12)


def test_bad_tables_are_refused():
    with pytest.raises(ValueError):
        sp.mutual_information([1, 2, 3])
    with pytest.raises(ValueError):
        sp.mutual_information([[1, -1], [0, 1]])
    assert sp.mutual_information([[0, 0], [0, 0]]) == 0.0


# ----------------------------------------------------------------------------
# the random router's floor
# ----------------------------------------------------------------------------

def test_random_router_floor_is_seeded_positive_and_far_below_specialised():
    rows = np.array([1000, 800, 1200, 900, 1000, 1100, 1000])
    load = np.array([0.2, 0.1, 0.1, 0.15, 0.05, 0.1, 0.2, 0.1])
    table = np.outer(rows, load)
    a, b = sp.random_router_mi(table, seed=3), sp.random_router_mi(table, seed=3)
    assert a == b
    assert a != sp.random_router_mi(table, seed=4)
    assert a > 0
    # the plug-in estimator's bias, (S - 1)(E - 1) / (2 N ln 2) bits for N independent draws
    bias = (len(rows) - 1) * (len(load) - 1) / (2 * rows.sum() * math.log(2))
    assert 0.6 * bias < sp.random_router_mi(table, n_draw=200) < 1.4 * bias
    # the draws follow the table's load: experts it never picks stay empty, and the bias counts
    # only the two it does (a uniform draw over eight would read seven times higher)
    two = np.outer(rows, [0.5, 0.5, 0, 0, 0, 0, 0, 0])
    bias2 = (len(rows) - 1) * 1 / (2 * rows.sum() * math.log(2))
    assert 0.6 * bias2 < sp.random_router_mi(two, n_draw=200) < 1.4 * bias2
    specialised = np.zeros((7, 8))
    specialised[np.arange(7), np.arange(7)] = rows
    assert a < 0.01 * sp.mutual_information(specialised)


# ----------------------------------------------------------------------------
# the teacher's routed counts, on a tiny random GPT
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def enc():
    return data.get_tokenizer()


def tiny(enc, n_expert=1, top_k=1, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=CONTEXT, vocab_size=data.vocab_size_padded(enc), n_layer=2, n_head=2,
                         n_embd=32, n_expert=n_expert, top_k=top_k)).eval()


def random_clusters(seed=0, n_layer=2, H=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, N_EXPERT, (H,), generator=g) for _ in range(n_layer)]


RECORDS = [
    dict(question="What is 2+3?", answer="5", subdomain="prealgebra"),
    dict(question="Solve 2x + 1 = 7 for x.", answer="3", subdomain="algebra"),
    dict(question="What is the remainder when 17 is divided by 5?", answer="2", subdomain="number_theory"),
    # no label: classified from the question (counting_probability)
    dict(question="In how many ways can 2 of 5 people be chosen?", answer="10"),
    dict(question="Many apples. " * 60, answer="1", subdomain="geometry"),  # no room: skipped
]


def test_teacher_route_counts_shape_and_totals(enc):
    teacher, clusters = tiny(enc), random_clusters()
    counts = sp.teacher_route_counts(teacher, clusters, enc, RECORDS, torch.device("cpu"), TOP_K)
    assert np.asarray(counts).shape == (2, len(SUBDOMAINS), N_EXPERT)
    # every token of the replay (prompt + greedy generation, less the last) picks top_k clusters;
    # generated as one batch in evaluate's order, since a random model's near-ties can break
    # differently in another batch
    fit = sorted((r for r in RECORDS if len(eval_math.encode_prompt(enc, r["question"])) < CONTEXT),
                 key=lambda r: len(r["question"]))
    prompts = [eval_math.encode_prompt(enc, r["question"]) for r in fit]
    outs = teacher.generate(prompts, CONTEXT, temperature=0, eos_id=data.eos_id(enc))
    per_sub = np.zeros(len(SUBDOMAINS))
    for r, prompt, out in zip(fit, prompts, outs):
        per_sub[SUBDOMAINS.index(sp.subdomain_of(r))] += (len(prompt) + len(out) - 1) * TOP_K
    for layer in counts:
        assert np.asarray(layer).sum(1) == pytest.approx(per_sub)
    assert per_sub[SUBDOMAINS.index("geometry")] == 0 and per_sub[SUBDOMAINS.index("counting_probability")] > 0


def test_teacher_route_counts_follow_the_clusters(enc):
    # one cluster holding every neuron but one: its mass is nearly all, so top-1 is always it
    teacher = tiny(enc)
    clusters = [torch.zeros(128, dtype=torch.long) for _ in range(2)]
    for c in clusters:
        c[0] = 1
    counts = np.asarray(sp.teacher_route_counts(teacher, clusters, enc, RECORDS[:2], torch.device("cpu"), 1))
    assert counts[:, :, 1].sum() == 0 and counts[:, :, 0].sum() > 0


# ----------------------------------------------------------------------------
# the whole measure, on a folder of tiny checkpoints
# ----------------------------------------------------------------------------

N_TEST = 3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, enc):
    d = tmp_path_factory.mktemp("run")
    tok = data.tokenizer_to_dict(enc)
    common.save_checkpoint(str(d / "teacher.pt"), common.make_checkpoint(
        tiny(enc), tok, "teacher", argparse.Namespace(data_seed=0), {}))
    student = tiny(enc, N_EXPERT, TOP_K, seed=1)
    # stage1: no stored counts (recomputed); stage2: stored counts on N_TEST problems (used as they are)
    common.save_checkpoint(str(d / "stage1.pt"), common.make_checkpoint(
        student, tok, "stage1", argparse.Namespace(), {}, clusters=random_clusters()))
    stored = [np.eye(len(SUBDOMAINS), N_EXPERT).tolist(), [[1.0] * N_EXPERT] * len(SUBDOMAINS)]
    common.save_checkpoint(str(d / "stage2.pt"), common.make_checkpoint(
        student, tok, "stage2", argparse.Namespace(), dict(route_counts=stored, correct="0" * N_TEST),
        clusters=random_clusters()))
    return d


def test_specialisation_of_a_run(run_dir):
    res = sp.specialisation(str(run_dir), n_test=N_TEST)
    assert set(res) == {"n_test", "teacher_clusters", "stage1", "final", "final_ckpt", "random_router"}
    assert res["final_ckpt"] == "stage2.pt" and res["final"]["source"] == "stored"
    assert res["stage1"]["source"] == "recomputed"
    # the stored tables: 4 of 7 subdomains on their own expert (MI = H(S) = 2 bits), then uniform (0)
    assert res["final"]["per_layer"] == pytest.approx([2.0, 0.0], abs=1e-12)
    assert res["final"]["mean"] == pytest.approx(1.0, abs=1e-12)
    for k in ("teacher_clusters", "stage1", "random_router"):
        assert len(res[k]["per_layer"]) == 2 and all(x >= 0 for x in res[k]["per_layer"])
        assert res[k]["mean"] == pytest.approx(np.mean(res[k]["per_layer"]))


def test_stored_counts_of_another_n_are_recomputed(run_dir):
    assert sp.specialisation(str(run_dir), n_test=N_TEST - 1)["final"]["source"] == "recomputed"


def _main(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["specialisation.py", *map(str, argv)])
    code = 0
    try:
        common.run(sp.main)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_command_prints_the_table_and_writes_json(run_dir, tmp_path, monkeypatch, capsys):
    js = tmp_path / "spec.json"
    code, out, err = _main(monkeypatch, capsys, "--run", run_dir, "--n", N_TEST, "--json", js, "--device", "cpu")
    assert code == 0, err
    res = json.loads(js.read_text())
    assert res["final"]["per_layer"] == pytest.approx([2.0, 0.0])
    lines = out.splitlines()
    assert lines[1].split() == ["MI", "(bits)", "L0", "L1", "mean"]
    assert any(line.startswith("final (stage2.pt)") for line in lines)


@pytest.mark.parametrize("argv, says", [
    (["--run", "/nonexistent/run"], "not a folder"),
    (["--run", ".", "--n", "0"], "positive integer"),
])
def test_command_user_errors_end_with_one_line(argv, says, monkeypatch, capsys):
    code, _, err = _main(monkeypatch, capsys, *argv)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1


def test_folder_without_teacher_is_a_user_error(tmp_path, monkeypatch, capsys):
    code, _, err = _main(monkeypatch, capsys, "--run", tmp_path)
    assert code == 2 and "no teacher.pt" in err
