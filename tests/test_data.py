"""Tests for data.py: the synthetic math suite, splits, tokenizer, prompt format."""

import ast
import io
import math
import os
import random
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402

SMALL = dict(n_train=3000, n_val=200, n_test=300)


@pytest.fixture(scope="module")
def splits():
    return data.build_splits(**SMALL, seed=0)


@pytest.fixture(scope="module")
def problems():
    # a fixed sample covering every subdomain x level many times
    rng = random.Random(123)
    return [data.make_problem(rng, s, l) for _ in range(100)
            for s in data.SUBDOMAINS for l in data.LEVELS]


@pytest.fixture(scope="module")
def enc():
    return data.get_tokenizer()


# ----------------------------------------------------------------------------- splits

def test_split_sizes_and_keys(splits):
    assert set(splits) == {"train", "validation", "test"}
    assert len(splits["train"]) == SMALL["n_train"]
    assert len(splits["validation"]) == SMALL["n_val"]
    assert len(splits["test"]) == SMALL["n_test"]
    for ds in splits.values():
        assert {"question", "solution", "answer", "subdomain", "level"} <= set(ds.column_names)


def test_splits_disjoint_and_unique(splits):
    qs = {k: list(v["question"]) for k, v in splits.items()}
    for k, v in qs.items():
        assert len(v) == len(set(v)), f"duplicate question inside {k}"
    assert not set(qs["train"]) & set(qs["validation"])
    assert not set(qs["train"]) & set(qs["test"])
    assert not set(qs["validation"]) & set(qs["test"])
    # membership is a function of the text alone, so it holds across sizes and seeds
    other = data.build_splits(n_train=500, n_val=300, n_test=300, seed=7)
    for k, ds in other.items():
        assert all(data.split_of(q) == k for q in ds["question"])
    for k, v in qs.items():
        assert all(data.split_of(q) == k for q in v)


def test_heldout_rows_leave_out_every_base_split():
    # a larger validation quota re-draws the base validation problems too: they must be taken out
    base = data.split_rows(seed=0)
    held = [r["question"] for r in data.heldout_rows(seed=0)]
    assert len(held) > 2000 and len(held) == len(set(held))
    for name, rows in base.items():
        assert not set(held) & {r["question"] for r in rows}, f"heldout shares problems with {name}"
    assert all(data.split_of(q) == "validation" for q in held)


def test_splits_deterministic(splits):
    again = data.build_splits(**SMALL, seed=0)
    for k in splits:
        assert splits[k].to_list() == again[k].to_list()
    different = data.build_splits(**SMALL, seed=1)
    assert splits["train"]["question"] != different["train"]["question"]


def test_split_cache_gives_the_drawn_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CACHE_DIR", str(tmp_path))
    args = dict(n_train=300, n_val=50, n_test=50, seed=3)
    drawn = data._draw_splits(**args)
    first = data.build_splits(**args)  # draws and writes the cache
    [path] = tmp_path.iterdir()
    second = data.build_splits(**args)  # reads it
    path.write_text("{ truncated")
    third = data.build_splits(**args)  # an unreadable cache is drawn again
    for s in data.SPLITS:
        assert first[s].to_list() == second[s].to_list() == third[s].to_list() == drawn[s]
    assert data.split_rows(**args) == drawn  # the plain rows the stages read, from the cache
    data.build_splits(**dict(args, seed=4))
    assert len(list(tmp_path.iterdir())) == 2  # the key includes the arguments


def test_every_cell_in_train_and_eval_balanced(splits):
    cells = {(s, l) for s in data.SUBDOMAINS for l in data.LEVELS}
    assert set(zip(splits["train"]["subdomain"], splits["train"]["level"])) == cells
    for k in ("validation", "test"):
        ds = splits[k]
        per_sub = {s: ds["subdomain"].count(s) for s in data.SUBDOMAINS}
        even = len(ds) / len(data.SUBDOMAINS)
        assert min(per_sub.values()) >= 0.8 * even, per_sub
        assert set(zip(ds["subdomain"], ds["level"])) == cells


# ----------------------------------------------------------------------------- problems

def test_answer_matches_solution(problems):
    for p in problems:
        assert p["solution"].splitlines()[-1] == f"#### {p['answer']}"
        assert data.extract_answer(p["solution"]) == p["answer"]
        assert re.fullmatch(r"-?\d+", p["answer"]), p
        assert str(int(p["answer"])) == p["answer"]
        assert p["question"].isascii() and p["solution"].isascii()


_ARITH = re.compile(r"[\d\s+\-*/()^%]+")


def _eval(expr):
    expr = expr.replace("mod", "%").replace("^", "**")
    if not _ARITH.fullmatch(expr):
        return None
    return eval(expr, {"__builtins__": {}})  # digits and operators only


def test_stated_steps_are_correct(problems):
    # every "A = B" in a solution where both sides are pure arithmetic must hold,
    # e.g. "3x = 19 - 4 = 15" checks 19 - 4 == 15
    checked = 0
    for p in problems:
        for line in p["solution"].splitlines()[:-1]:
            parts = [_eval(x.strip().replace(" mod ", " % ")) for x in line.split(" = ")]
            for a, b in zip(parts, parts[1:]):
                if a is not None and b is not None:
                    assert abs(a - b) < 1e-9, (line, p)
                    checked += 1
    assert checked > len(problems)


def _recompute(p):
    """Independent answer from the question text alone, for many templates."""
    q = p["question"]
    ints = [int(x) for x in re.findall(r"-?\d+", q)]
    if m := re.fullmatch(r"What is ([\d +\-*()]+)\?", q):
        return eval(m.group(1), {"__builtins__": {}})
    if m := re.fullmatch(r"What is (\d+)% of (\d+)\?", q):
        return int(m.group(1)) * int(m.group(2)) // 100
    if m := re.fullmatch(r"Solve (\d+)x ([+-]) (\d+) = (-?\d+)\.", q):
        a, s, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        return (c - (b if s == "+" else -b)) // a
    if q.startswith("What is the remainder when"):
        return ints[0] % ints[1]
    if q.startswith("What is the greatest common divisor"):
        return math.gcd(ints[0], ints[1])
    if q.startswith("What is the sum of the digits"):
        return sum(map(int, str(ints[0])))
    if q.startswith("How many positive multiples"):
        return ints[1] // ints[0]
    if q.startswith("How many multiples of"):
        k, lo, hi = ints
        return sum(1 for v in range(lo, hi + 1) if v % k == 0)
    if q.startswith("How many ways are there to choose"):
        return math.comb(ints[1], ints[0])
    if m := re.fullmatch(r"What is (\d+) factorial\?", q):
        return math.factorial(int(m.group(1)))
    if q.startswith("In how many ways can"):
        return math.perm(ints[1], ints[0])
    if q.startswith("A shop has"):
        return math.prod(ints)
    if q.startswith("How many integers are there from"):
        return len(range(ints[0], ints[1] + 1))
    if q.startswith("A bag has"):
        return 100 * ints[0] // (ints[0] + ints[1])
    if q.endswith("What is its area?") and q.startswith("A rectangle is"):
        return ints[0] * ints[1]
    if q.endswith("What is its perimeter?"):
        return 2 * (ints[0] + ints[1])
    if q.startswith("A triangle has base"):
        return ints[0] * ints[1] // 2
    if q.startswith("Two angles of a triangle"):
        return 180 - ints[0] - ints[1]
    if q.startswith("A box is"):
        return math.prod(ints)
    if q.startswith("A right triangle has legs"):
        return math.isqrt(ints[0] ** 2 + ints[1] ** 2)
    if q.startswith("A right triangle has hypotenuse"):
        return math.isqrt(ints[0] ** 2 - ints[1] ** 2)
    if q.startswith("What is the determinant of the matrix"):
        (a, b), (c, d) = ast.literal_eval(q.split("matrix ")[1][:-1])
        return a * d - b * c
    if q.startswith("What is the trace of the matrix"):
        mat = ast.literal_eval(q.split("matrix ")[1][:-1])
        return sum(mat[i][i] for i in range(len(mat)))
    if m := re.fullmatch(r"What is the dot product of (\(.*\)) and (\(.*\))\?", q):
        u, v = ast.literal_eval(m.group(1)), ast.literal_eval(m.group(2))
        return sum(x * y for x, y in zip(u, v))
    if q.startswith("An arithmetic sequence starts"):
        a, b, _, n = ints
        return a + (n - 1) * (b - a)
    if m := re.fullmatch(r"Let f\(x\) = (.*)\. What is f\((-?\d+)\)\?", q):
        # evaluate the polynomial text by turning "3x^2 - x" into python
        expr = re.sub(r"(\d)x", r"\1*x", m.group(1)).replace("^", "**")
        return eval(expr, {"__builtins__": {}}, {"x": int(m.group(2))})
    if m := re.fullmatch(r"Let f\(x\) = (.*) and g\(x\) = (.*)\. What is f\(g\((-?\d+)\)\)\?", q):
        py = lambda e: re.sub(r"(\d)x", r"\1*x", e)
        g = eval(py(m.group(2)), {"__builtins__": {}}, {"x": int(m.group(3))})
        return eval(py(m.group(1)), {"__builtins__": {}}, {"x": g})
    if m := re.search(r"roots of (.*) = 0\?", q):
        expr = re.sub(r"(\d)x", r"\1*x", m.group(1)).replace("^", "**")
        roots = [x for x in range(-50, 51) if eval(expr, {"__builtins__": {}}, {"x": x}) == 0]
        r, s = roots if len(roots) == 2 else roots * 2  # double root
        if "sum of the squares" in q:
            return r * r + s * s
        return r + s if "sum of the roots" in q else r * s
    if m := re.fullmatch(r"If x = (-?\d+), what is (.*)\?", q):
        return eval(re.sub(r"(\d)x", r"\1*x", m.group(2)), {"__builtins__": {}},
                    {"x": int(m.group(1))})
    if m := re.fullmatch(r"If y = (.*) and x \+ y = (-?\d+), what is x\?", q):
        ylin, s = m.group(1), int(m.group(2))
        f = lambda x: x + eval(re.sub(r"(\d)x", r"\1*x", ylin), {"__builtins__": {}}, {"x": x})
        return next(x for x in range(-500, 501) if f(x) == s)
    if q.startswith("A rectangle has perimeter"):
        return ints[0] // 2 - ints[1]
    if q.startswith("A rectangle has area"):
        return ints[0] // ints[1]
    return None


def test_answers_recomputed_independently(problems):
    seen_templates = set()
    for p in problems:
        want = _recompute(p)
        assert want is not None, f"no checker for: {p['question']}"
        assert str(want) == p["answer"], (p["question"], p["solution"], want)
        seen_templates.add(p["template"])
    all_templates = {fn.__name__.lstrip("_") for fns in data.TEMPLATES.values() for fn in fns}
    assert seen_templates == all_templates


def test_make_problem_seeded():
    a = [data.make_problem(random.Random(5), s, l) for s in data.SUBDOMAINS for l in data.LEVELS]
    b = [data.make_problem(random.Random(5), s, l) for s in data.SUBDOMAINS for l in data.LEVELS]
    assert a == b
    for p, (s, l) in zip(a, [(s, l) for s in data.SUBDOMAINS for l in data.LEVELS]):
        assert (p["subdomain"], p["level"]) == (s, l)


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_basics(enc):
    assert data.get_tokenizer() is enc  # cached
    n_ranks = len(enc._mergeable_ranks)
    assert n_ranks > 256
    assert enc.n_vocab == n_ranks + 2
    assert data.bos_id(enc) == n_ranks and data.eos_id(enc) == n_ranks + 1
    assert data.vocab_size_padded(enc) % 64 == 0
    assert data.vocab_size_padded(enc) >= enc.n_vocab
    assert data.vocab_size_padded(enc, 8) == -(-enc.n_vocab // 8) * 8


def test_digits_are_single_tokens(enc):
    assert len(enc.encode_ordinary("12345")) == 5
    assert enc.encode_ordinary("12345") == [ord(c) for c in "12345"]
    for text in ["x = 19 - 4 = 15", "What is 347 * 12?", "#### -120", "a1b22c333 (-45)"]:
        for t in enc.encode_ordinary(text):
            piece = enc.decode_single_token_bytes(t)
            assert not any(c in b"0123456789" for c in piece) or len(piece) == 1, piece
    # no learned token contains a digit
    for b in enc._mergeable_ranks:
        if len(b) > 1:
            assert not re.search(rb"\d", b), b


def test_roundtrip_random_text(enc):
    rng = random.Random(0)
    alphabet = ("abcXYZ 0123456789+-*/=()[]#%.,?\n\t'" + "éü中文∑π😀ßØ" + "\u0301")
    for _ in range(300):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert enc.decode(enc.encode_ordinary(s)) == s
    s = "héllo wörld 😀 ∑ 中文 १२३ <|eos|> \x00\x7f"
    assert enc.decode(enc.encode_ordinary(s)) == s


def test_tokenizer_dict_roundtrip(enc, problems, tmp_path):
    d = data.tokenizer_to_dict(enc)
    path = tmp_path / "tok.pt"
    torch.save({"tokenizer": d}, path)
    d2 = torch.load(path, weights_only=True)["tokenizer"]
    assert d2 == d
    enc2 = data.tokenizer_from_dict(d2)
    assert enc2.n_vocab == enc.n_vocab
    assert enc2._special_tokens == enc._special_tokens
    texts = [p["question"] + "\n" + p["solution"] for p in problems[:300]] + ["ünï ☃ 42"]
    for t in texts:
        assert enc2.encode_ordinary(t) == enc.encode_ordinary(t)
    assert enc2.encode("<|eos|>", allowed_special="all") == [data.eos_id(enc)]


# ----------------------------------------------------------------------------- prompt format

def test_encode_example(enc, problems):
    p = problems[0]
    prompt, completion = data.encode_example(enc, p)
    assert prompt[0] == data.bos_id(enc) and completion[-1] == data.eos_id(enc)
    assert enc.decode(prompt[1:]) == data.format_prompt(p["question"])
    assert enc.decode(completion[:-1]) == p["solution"]
    # splitting prompt / completion does not change the tokenization
    for p in problems[:200]:
        prompt, completion = data.encode_example(enc, p)
        whole = enc.encode_ordinary(data.format_prompt(p["question"]) + p["solution"])
        assert prompt[1:] + completion[:-1] == whole


def test_max_length(enc):
    rng = random.Random(2024)
    lens = []
    for _ in range(2000):
        p = data.make_problem(rng, rng.choice(data.SUBDOMAINS), rng.choice(data.LEVELS))
        prompt, completion = data.encode_example(enc, p)
        lens.append(len(prompt) + len(completion))
    assert max(lens) <= 128
    assert sum(lens) / len(lens) < 80


def test_subdomain_sampler_balances_an_unbalanced_split(splits):
    # like the default training split, where precalculus fills the quota of small subdomains
    train = [r for i, r in enumerate(splits["train"]) if r["subdomain"] == "precalculus" or i % 10 == 0]
    assert sum(r["subdomain"] == "precalculus" for r in train) > len(train) / 2
    draw = data.subdomain_sampler(train)
    rng = random.Random(0)
    got = [draw(rng)["subdomain"] for _ in range(7000)]
    for s in data.SUBDOMAINS:
        assert abs(got.count(s) / 7000 - 1 / 7) < 0.02, s
    rng_a, rng_b = random.Random(5), random.Random(5)
    assert [draw(rng_a)["question"] for _ in range(20)] == [draw(rng_b)["question"] for _ in range(20)]


def test_split_rows_do_not_import_datasets(tmp_path):
    """Every stage script reads split_rows; `import datasets` costs ~1 s per script start, so the
    rows must come without it (a fresh interpreter, to see what the call itself imports)."""
    code = ("import sys, data; rows = data.split_rows(n_train=300, n_val=50, n_test=50, seed=3); "
            "assert len(rows['train']) == 300; assert 'datasets' not in sys.modules, 'datasets was imported'")
    env = dict(os.environ, PADD_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
