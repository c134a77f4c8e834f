"""eval_math.py as a command on real and malformed data: prompts longer than the context,
every benchmark file, empty files, bad --n, deeply nested JSON, named columns, saved datasets.

A tiny random GPT (context 64 tokens, so most real questions do not fit) is written as a
checkpoint once per module; the real-benchmark test skips where ../shared/data/benchmarks
is absent.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import data  # noqa: E402
import eval_math as em  # noqa: E402
from benchmarks import load_benchmark  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

BENCH = ROOT.parent / "shared" / "data" / "benchmarks"
CONTEXT = 64


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    enc = data.get_tokenizer()
    cfg = GPTConfig(block_size=CONTEXT, vocab_size=data.vocab_size_padded(enc), n_layer=1,
                    n_head=2, n_embd=32)
    model = GPT(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    common.save_checkpoint(str(path), common.make_checkpoint(
        model, data.tokenizer_to_dict(enc), "teacher", argparse.Namespace(), {}))
    return path


def _main(monkeypatch, capsys, *argv):
    """Run eval_math's command in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["eval_math.py", *map(str, argv)])
    code = 0
    try:
        common.run(em.main)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _long_question():
    return "How many apples? " + "Then a friend gives you one more apple. " * 30


def test_long_prompt_is_skipped_and_reported(tiny_ckpt, tmp_path, monkeypatch, capsys):
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"question": "What is 2+2?", "answer": "4"},
        {"question": _long_question(), "answer": "31"},
        {"question": "What is 3+3?", "answer": "6"},
    ]) + "\n", encoding="utf-8")
    js = tmp_path / "r.json"
    code, out, err = _main(monkeypatch, capsys, "--ckpt", tiny_ckpt, "--data", p, "--json", js)
    assert code == 0, err
    res = json.loads(js.read_text())[str(tiny_ckpt)]
    assert res["skipped"] == 1 and res["n"] == 3
    assert res["correct"][1] == "0"  # the skipped problem counts as wrong, in its place
    assert "1 of 3 problems skipped" in out and f"context of {CONTEXT} tokens" in out
    assert "skip" in out.splitlines()[1]  # the table's column


def test_generate_refuses_a_prompt_without_room():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    assert len(model.generate([[1] * 10], 100, temperature=0)[0]) == 6
    with pytest.raises(ValueError, match="no room"):
        model.generate([[1] * 16], 5, temperature=0)


@pytest.mark.skipif(not BENCH.is_dir(), reason=f"no benchmark folder at {BENCH}")
@pytest.mark.parametrize("name", sorted(p.name for p in BENCH.glob("*.jsonl")) if BENCH.is_dir() else [])
def test_every_benchmark_file_evaluates(name, tiny_ckpt, tmp_path, monkeypatch, capsys):
    records = load_benchmark(BENCH / name)
    enc = data.get_tokenizer()
    longest = max(range(len(records)), key=lambda i: len(records[i]["question"]))
    assert len(em.encode_prompt(enc, records[longest]["question"])) >= CONTEXT
    # the first 4 problems and the longest one, as its own file
    sub = tmp_path / name
    with open(BENCH / name, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    sub.write_text("".join(lines[:4] + [lines[longest]]), encoding="utf-8")
    js = tmp_path / "r.json"
    code, out, err = _main(monkeypatch, capsys, "--ckpt", tiny_ckpt, "--data", sub, "--n", 5, "--json", js)
    assert code == 0, err
    res = json.loads(js.read_text())[str(tiny_ckpt)]
    assert res["n"] == 5 and len(res["correct"]) == 5 and res["skipped"] >= 1
    assert "5 problems from" in out


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file_is_one_line_error(text, tiny_ckpt, tmp_path, monkeypatch, capsys):
    p = tmp_path / "empty.jsonl"
    p.write_text(text, encoding="utf-8")
    code, out, err = _main(monkeypatch, capsys, "--ckpt", tiny_ckpt, "--data", p)
    assert code == 2
    assert err.count("\n") == 1 and str(p) in err and "no problems" in err


@pytest.mark.parametrize("n", [0, -1])
def test_bad_n_is_one_line_error(n, tiny_ckpt, monkeypatch, capsys):
    code, out, err = _main(monkeypatch, capsys, "--ckpt", tiny_ckpt, "--n", n)
    assert code == 2
    assert err.count("\n") == 1 and f"--n {n}" in err and "positive integer" in err


def test_deeply_nested_json_is_one_line_error(tmp_path):
    p = tmp_path / "deep.jsonl"
    p.write_text('{"question": "q", "answer": "1"}\n' + "[" * 100_000 + "]" * 100_000 + "\n",
                 encoding="utf-8")
    r = subprocess.run([sys.executable, "-c", f"import eval_math as em; import common; "
                        f"common.run(lambda: em.load_records({str(p)!r}))"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and f"{p}:2:" in r.stderr and "nested too deeply" in r.stderr


def test_named_columns_and_missing_column(tmp_path):
    p = tmp_path / "custom.jsonl"
    p.write_text(json.dumps({"prompt": "What is 1+1?", "target": "So \\boxed{2}.", "unit": "km"})
                 + "\n" + json.dumps({"prompt": "What is 2+1?"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as ei:
        load_benchmark(p, question_field="prompt", answer_field="target")
    msg = str(ei.value)
    assert msg.startswith(f"{p}:2: ") and "'target'" in msg and "\n" not in msg
    p.write_text(p.read_text().splitlines()[0] + "\n", encoding="utf-8")
    assert load_benchmark(p, question_field="prompt", answer_field="target") == [
        {"question": "What is 1+1?", "answer": "2", "subdomain": load_benchmark(
            p, "prompt", "target")[0]["subdomain"], "unit": "km"}]


def test_saved_dataset_folder(tmp_path):
    import datasets
    folder = tmp_path / "saved"
    datasets.Dataset.from_list([{"problem": "What is 5+5?", "answer": "10"},
                                {"problem": "What is 5+6?", "answer": "11"}]).save_to_disk(str(folder))
    recs = em.load_records(str(folder))
    assert [r["answer"] for r in recs] == ["10", "11"]
    with pytest.raises(common.UserError, match="no field 'sol'"):
        em.load_records(str(folder), answer_field="sol", question_field="problem")


# ----------------------------------------------------------------------------- sampled pass@1

def _questions(n):
    return [{"question": f"What is {i} + {2 * i}?", "answer": str(3 * i), "subdomain": "prealgebra"} for i in range(n)]


def _even_is_right(monkeypatch):
    """A random model is never right; grading a completion right when its characters' codes sum
    to an even number gives both accuracies something to count, tied to the exact tokens generated."""
    monkeypatch.setattr(em, "extract_answer", lambda text: text)
    monkeypatch.setattr(em, "is_equiv", lambda pred, gold, unit=None: sum(map(ord, pred)) % 2 == 0)


def test_sampled_pass_at_1_counts_each_problems_samples(tiny_ckpt, monkeypatch):
    _even_is_right(monkeypatch)
    ck = common.load_checkpoint(str(tiny_ckpt))
    model, enc = common.build_model(ck, "cpu"), data.tokenizer_from_dict(ck["tokenizer"])
    with torch.no_grad():  # a random model's greedy text is the same for every prompt; sharper, it is not
        for p in model.parameters():
            p.mul_(8)
    recs = _questions(12)
    # at a temperature near 0 every sample is the greedy continuation: k right or 0 per problem
    cold = em.evaluate(model, enc, recs, torch.device("cpu"), batch_size=5, max_new_tokens=12, samples=3,
                       temperature=1e-6)
    assert cold["correct_sampled"] == "".join("3" if c == "1" else "0" for c in cold["correct"])
    assert 0 < cold["acc"] < 1 and cold["acc_sampled"] == pytest.approx(cold["acc"])
    warm = [em.evaluate(model, enc, recs, torch.device("cpu"), batch_size=5, max_new_tokens=12, samples=3, seed=s)
            for s in (0, 0, 1)]
    assert warm[0]["correct_sampled"] == warm[1]["correct_sampled"]  # same seed, same draws
    assert warm[0]["correct_sampled"] != warm[2]["correct_sampled"]
    assert warm[0]["acc_sampled"] == sum(map(int, warm[0]["correct_sampled"])) / 36
    assert warm[0]["correct"] == cold["correct"]  # sampling leaves greedy alone
    assert "acc_sampled" not in em.evaluate(model, enc, recs, torch.device("cpu"), max_new_tokens=4, samples=0)
    with pytest.raises(ValueError):
        em.evaluate(model, enc, recs, torch.device("cpu"), samples=10)


def test_samples_flag_pairs_both_accuracies(tiny_ckpt, tmp_path, monkeypatch, capsys):
    _even_is_right(monkeypatch)
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _questions(6)), encoding="utf-8")
    js = tmp_path / "r.json"
    code, out, err = _main(monkeypatch, capsys, "--ckpt", tiny_ckpt, tiny_ckpt, "--data", f, "--samples", 2,
                           "--json", js)
    assert code == 0, err
    res = json.loads(js.read_text())[str(tiny_ckpt)]
    assert res["samples"] == 2 and len(res["correct_sampled"]) == 6 and set(res["correct_sampled"]) <= set("012")
    assert "sampled" in out
    for n, why in ((10, "--samples 10"), (-1, "--samples -1")):
        code, out, err = _main(monkeypatch, capsys, "--ckpt", tiny_ckpt, "--data", f, "--samples", n)
        assert code == 2 and err.count("\n") == 1 and why in err
    code, out, err = _main(monkeypatch, capsys, "--ckpt", tiny_ckpt, "--data", f, "--temperature", 0)
    assert code == 2 and "--temperature 0" in err
