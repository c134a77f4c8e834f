"""Benchmark files and the subdomain classifier.

``load_benchmark(name_or_path)`` reads GSM8K, AIME24, AMC23, Minerva, OlympiadBench or the
project suite (JSON lines, from ``BENCHMARK_DIR`` = ../shared/data/benchmarks), any JSON-lines
file or saved dataset folder (through ``datasets``; columns named by the caller where the
layout is not one of these) as records ``{"question", "answer", "subdomain"}``.
``classify_subdomain(question)`` assigns one of MATH's seven ``SUBDOMAINS`` by weighted
keyword matching plus problem structure, for records without a usable label;
``classifier_accuracy_olympiadbench()`` scores it against OlympiadBench's subfields.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from grader import last_boxed

BENCHMARK_DIR = Path(__file__).parent.parent / "shared" / "data" / "benchmarks"


# ----------------------------------------------------------------------------
# Subdomains
# ----------------------------------------------------------------------------

SUBDOMAINS = [
    "prealgebra",
    "algebra",
    "number_theory",
    "counting_probability",
    "geometry",
    "intermediate_algebra",
    "precalculus",
]

# MATH's subject names (as in its "type" field) -> our subdomain ids.
MATH_TYPE_TO_SUBDOMAIN = {
    "prealgebra": "prealgebra",
    "algebra": "algebra",
    "number theory": "number_theory",
    "counting & probability": "counting_probability",
    "counting and probability": "counting_probability",
    "geometry": "geometry",
    "intermediate algebra": "intermediate_algebra",
    "precalculus": "precalculus",
}

# OlympiadBench has 4 coarse subfields. MATH's four algebraic subjects (prealgebra,
# algebra, intermediate algebra, precalculus) all fall under its "Algebra", so any of
# them counts as correct for an Algebra problem; the other three map one-to-one.
OLYMPIAD_SUBFIELD_TO_SUBDOMAINS = {
    "Algebra": {"prealgebra", "algebra", "intermediate_algebra", "precalculus"},
    "Combinatorics": {"counting_probability"},
    "Geometry": {"geometry"},
    "Number Theory": {"number_theory"},
}

# Keyword weights per subdomain (paper appendix K: keyword matching + problem
# structure). Patterns are regexes matched on the lower-cased question, each counted
# once. Tuned on OlympiadBench, kept to generic mathematical vocabulary.
_KEYWORDS: dict[str, list[tuple[str, float]]] = {
    "geometry": [
        (r"triangle", 3), (r"circle", 2.5), (r"\\angle|\bangles?\b", 2.5),
        (r"perpendicular", 2.5), (r"parallel", 1), (r"polygon|-gon\b", 2),
        (r"quadrilateral", 3), (r"rectangle|rectangular", 1.5),
        (r"square \$|\bsquare\b(?! root)", 0.5), (r"hexagon|pentagon|octagon", 2),
        (r"radius|radii|diameter", 2), (r"tangent", 1.5),
        (r"circumcircle|incircle|circumcent|incent|orthocent|circumradius|inradius", 4),
        (r"midpoint", 2), (r"\bsegments?\b", 1.5), (r"\barea\b", 1.5), (r"perimeter", 2),
        (r"\bvolume\b", 1.5), (r"sphere|cylinder|\bcones?\b|pyramid|prism|tetrahedr", 2),
        (r"isosceles|equilateral|right-angled|hypotenuse", 2), (r"\bchords?\b", 2),
        (r"\barcs?\b", 1.5), (r"altitude|median of (the )?triangle|bisector", 2),
        (r"\\overline", 1.5), (r"\bvertices\b|\bvertex\b", 1), (r"diagonal", 1.5),
        (r"trapezoid|rhombus|parallelogram", 3), (r"\bsides?\b", 0.5), (r"intersect", 0.5),
        (r"congruent(?! to)|similar triangles", 1), (r"inscribed", 2), (r"\bregion\b", 1),
        (r"\bfaces?\b|\bedges? of length", 1),
    ],
    "number_theory": [
        (r"\bprimes?\b|prime factor", 3), (r"divisib|divides|divisors?\b|\\mid\b", 3),
        (r"\bgcd|greatest common|\\operatorname\{gcd\}", 3),
        (r"\blcm|least common multiple", 3), (r"remainder", 3),
        (r"\bmod\b|\\bmod|\\pmod|modulo|congruent to|\\equiv", 3),
        (r"\bdigits?\b", 2.5), (r"base[- ]?\d|base-\$|binary representation", 2),
        (r"positive integers?", 0.5), (r"\bintegers?\b", 0.5),
        (r"perfect (square|cube|power)", 2), (r"\bodd\b|\beven\b", 0.8),
        (r"factorization|\bfactors?\b", 1), (r"multiples? of", 1.5),
        (r"relatively prime|coprime", 2), (r"\brational\b|\birrational\b", 0.5),
        (r"solutions? in (positive )?integers|integer solutions|diophant", 3),
        (r"\\mathbb\{[nz]\}", 1), (r"\bsum of (the )?digits", 2),
    ],
    "counting_probability": [
        (r"how many (ways|different|distinct|possible)", 3), (r"\bways\b", 2.5),
        (r"probability", 4), (r"expected (value|number)", 3), (r"\brandom", 2.5),
        (r"\bchoose|chosen|select", 1), (r"arrange|arrangement|permutation", 2.5),
        (r"combination", 1.5), (r"\bcoins?\b|\bdice\b|\bdie\b|\bcards?\b", 2.5),
        (r"\bgames?\b|\bplayers?\b|\bmoves?\b|\bturns?\b|\bwins?\b", 1.5),
        (r"\bgrid|chessboard|\b\w+ board\b|\bcells?\b|\bdomino|unit squares", 2),
        (r"\brows?\b|\bcolumns?\b", 1), (r"colou?r", 2), (r"\bsubsets?\b", 2),
        (r"\bstrings?\b|\bwords?\b", 1.5),
        (r"\bteams?\b|\bstudents\b|\bpeople\b|\bpersons?\b|\bcommittee|\bmatches\b", 1),
        (r"\bgraph\b(?! of)|\bedges?\b|\bcities\b|\bairline|\bconnected\b", 1.5),
        (r"\bminimum number|\bmaximum number|\bsmallest number|\blargest number", 1),
        (r"(compute|find|determine) the (total )?number of", 1.5), (r"how many", 0.8),
        (r"\bboxes\b|\bballs\b|\btokens?\b|\bstones?\b|\bmarbles?\b|\blamps?\b", 1.5),
        (r"\bpaths?\b|\blattice", 1), (r"\bflips?\b|\btoss", 2), (r"\\binom", 1),
        (r"\bdistinct\b", 0.5), (r"\bconfigurations?\b", 1.5), (r"\\ldots\s*,?\s*n\s*\\\}", 0.5),
        (r"(is|be|denote|denotes) the (total )?number of", 1.5),
        (r"\bchoices?\b|\blineups?\b|\borderings?\b|\bin some order\b", 1.5),
        (r"\brooks?\b|\bknights?\b|\bqueens?\b|\bpieces?\b|\bnumbered\b", 1.5),
    ],
    "precalculus": [
        (r"\\sin|\\cos|\\tan|\\cot|\\sec|\\csc|\bsin\b|\bcos\b", 3), (r"trigonometr", 3),
        (r"matri(x|ces)|\\begin\{pmatrix\}|determinant", 3), (r"\bvectors?\b", 2.5),
        (r"complex numbers?|\bimaginary|i ?= ?\\sqrt\{-1\}", 2.5),
        (r"\\theta|radians?", 1.5), (r"polar|parametric", 2.5), (r"\\arg\b", 1),
    ],
    "intermediate_algebra": [
        (r"polynomial", 3), (r"\bf\s*\(|functions? \$?f", 2), (r"\bfunctions?\b", 1.5),
        (r"real numbers?|real constant|\breals\b", 2), (r"inequalit", 2),
        (r"\\geq|\\leq|\\geqslant|\\leqslant", 0.3), (r"\bsequences?\b|\bprogression", 1.5),
        (r"\bseries\b|\\sum", 1.5), (r"\broots?\b|\bzero(e)?s\b", 1.5),
        (r"largest possible|smallest possible|maximum value|minimum value", 0.8),
        (r"\\log|logarithm", 1.5), (r"ellipse|hyperbola|parabola|asymptote", 2.5),
        (r"\bsystem of equations|\bsolve\b", 0.8), (r"a_\{?n\}?\b|a_\{n\+1\}|x_\{?n\}?\b", 1.2),
        (r"\\prod|\\cdots", 0.5), (r"\bquadratic|\bcubic", 1.5), (r"\bcoefficients?", 1.5),
        (r"\\mathbb\{r\}|\\mathbb\{q\}", 2), (r"\babsolute value", 1), (r"\bgraphs? of\b", 1),
    ],
    "algebra": [
        (r"\bequations?\b", 1), (r"\bsolve\b|\bsolutions?\b", 0.7),
        (r"\bslopes?\b|\blines?\b|y-intercept|intercept", 1.2), (r"\bvalue of\b", 0.5),
        (r"\bexpression\b|\bsimplify", 1), (r"\bquadratic", 1),
        (r"\binterest\b|\brate\b|\bspeed\b|\bhours?\b|\bminutes?\b", 1),
        (r"\bexponent|\\sqrt", 0.5), (r"\bages?\b|years? (ago|from now)", 1.5),
    ],
    "prealgebra": [
        (r"percent|%", 2), (r"\bratio\b", 1), (r"\baverage\b|\bmean\b|\bmedian\b", 1.5),
        (r"\bdollars?\b|\bcents?\b|\\\$\d", 1.5), (r"\bfractions?\b", 1),
        (r"\brounded\b|\bround\b|nearest (whole|tenth|hundredth)", 2), (r"\bdecimal", 1),
        (r"\bhow much\b", 1), (r"\beach\b", 0.3), (r"\btotal\b", 0.5),
        # everyday arithmetic word problems (GSM8K-like): shopping, rates, multiples
        (r"\b(buys?|bought|sells?|sold|costs?|pays?|paid|earns?|spends?|spent|saves?"
         r"|price)\b", 1.5),
        (r"\bper (day|hour|week|month|minute|year)\b|\bevery (day|week|month)\b", 1),
        (r"\btimes as (many|much)\b|\btwice\b|\bhalf\b", 0.8),
    ],
}
_KEYWORDS_RE = {
    dom: [(re.compile(p), w) for p, w in pats] for dom, pats in _KEYWORDS.items()
}
# Generic parameter declarations ("Let $n$ be a positive integer", "Given a positive
# integer $n$") occur in every olympiad topic, so they are removed before scoring:
# otherwise each would vote for number theory.
_PARAM_DECL_RE = re.compile(
    r"(?:let|given|for|fix|suppose)\s+(?:an?\s+|any\s+|each\s+|every\s+|all\s+|some\s+)?"
    r"(?:fixed\s+|given\s+)?(?:positive\s+|nonnegative\s+|non-negative\s+)?integers?"
    r"(?:\s+\$[^$]{1,40}\$(?:\s*(?:and|,)\s*\$[^$]{1,40}\$)?)?"
    r"|\$[^$]{1,40}\$\s+(?:and\s+\$[^$]{1,40}\$\s+)?be\s+(?:an?\s+)?(?:fixed\s+|given\s+)?"
    r"(?:positive\s+)?integers?"
)
# When nothing matches, a competition problem is most likely algebraic.
_DEFAULT_SUBDOMAIN = "algebra"


def subdomain_scores(question: str) -> dict[str, float]:
    """Keyword scores per subdomain (for inspection / tuning)."""
    q = question.lower() if isinstance(question, str) else ""
    q = _PARAM_DECL_RE.sub(" ", q[:20000])
    scores = {d: 0.0 for d in SUBDOMAINS}
    for dom, pats in _KEYWORDS_RE.items():
        for rx, w in pats:
            if rx.search(q):
                scores[dom] += w
    # Problem structure: "find all functions f" is a functional equation (algebra) even
    # when it mentions integers; "find all (pairs of) integers" is a Diophantine question.
    if re.search(r"find all functions|functions? \$?f ?:", q):
        scores["intermediate_algebra"] += 3
    if re.search(r"(find|determine) all (pairs|triples|tuples)?[^.]{0,40}integers", q):
        scores["number_theory"] += 2
    # No LaTeX at all (no commands, no "$x$" math, only "$5" money): an everyday
    # arithmetic word problem, which MATH files under prealgebra.
    # An equation in a variable ("12x - 13 = 263", "y = 2x + 64") is algebra.
    has_variable_expr = re.search(r"\d ?[a-z]\b|\b[a-z] ?[-+=*/^] ?[\d(a-z]|\b[a-z]\(", q)
    if has_variable_expr and "=" in q:
        scores["algebra"] += 1.5
    if "\\" not in q and not re.search(r"\$[^$\d\s]", q) and not has_variable_expr:
        scores["prealgebra"] += 1.2
    return scores


def classify_subdomain(question: str) -> str:
    """One of ``SUBDOMAINS`` for a problem statement, by weighted keyword matching."""
    try:
        scores = subdomain_scores(question)
        best = max(SUBDOMAINS, key=lambda d: scores[d])  # ties -> earlier in SUBDOMAINS
        return best if scores[best] > 0 else _DEFAULT_SUBDOMAIN
    except Exception:
        return _DEFAULT_SUBDOMAIN


def subdomain_from_label(label) -> str | None:
    """Map a dataset label ('Counting & Probability', 'number_theory', ...) to a subdomain."""
    if not isinstance(label, str):
        return None
    key = label.strip().lower()
    if key in SUBDOMAINS:
        return key
    return MATH_TYPE_TO_SUBDOMAIN.get(key)


def classifier_accuracy_olympiadbench(path=None) -> dict:
    """Accuracy of ``classify_subdomain`` against OlympiadBench's ``subfield`` labels.

    A prediction is correct if it lies in ``OLYMPIAD_SUBFIELD_TO_SUBDOMAINS[subfield]``:
    Algebra -> any of prealgebra / algebra / intermediate_algebra / precalculus,
    Combinatorics -> counting_probability, Geometry -> geometry,
    Number Theory -> number_theory.
    Returns {"accuracy", "n", "correct", "per_subfield": {subfield: accuracy},
    "confusion": {subfield: {predicted: count}}}.
    """
    path = Path(path) if path is not None else BENCHMARK_DIR / "olympiadbench.jsonl"
    n = correct = 0
    per: dict[str, list[int]] = {}
    confusion: dict[str, dict[str, int]] = {}
    for _, rec in _iter_jsonl(path):
        sub = rec.get("subfield")
        if sub not in OLYMPIAD_SUBFIELD_TO_SUBDOMAINS:
            continue
        pred = classify_subdomain(rec.get("question") or "")
        ok = pred in OLYMPIAD_SUBFIELD_TO_SUBDOMAINS[sub]
        n += 1
        correct += ok
        per.setdefault(sub, [0, 0])
        per[sub][0] += ok
        per[sub][1] += 1
        confusion.setdefault(sub, {}).setdefault(pred, 0)
        confusion[sub][pred] += 1
    return {
        "accuracy": correct / n if n else 0.0,
        "n": n,
        "correct": correct,
        "per_subfield": {k: c / t for k, (c, t) in per.items()},
        "confusion": confusion,
    }


# ----------------------------------------------------------------------------
# Benchmark loading
# ----------------------------------------------------------------------------

BENCHMARK_NAMES = {
    "gsm8k": "gsm8k.jsonl",
    "gsm8k_train": "gsm8k_train.jsonl",
    "aime24": "aime24.jsonl",
    "amc23": "amc23.jsonl",
    "minerva_math": "minerva_math.jsonl",
    "minerva": "minerva_math.jsonl",
    "olympiadbench": "olympiadbench.jsonl",
}


def _datasets():
    """The ``datasets`` package, quiet (no progress bars or info logging per file)."""
    import datasets
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    return datasets


def _parse_line(line: str, where: str) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return rec


def _iter_jsonl(path: Path):
    """Yield (where, dict) per non-blank line, where = 'path:lineno'; ValueError 'where: ...'.

    The lines are read through ``datasets``' text loader (row i is line i + 1, blank lines
    included) and parsed here one by one: its json loader would coerce a mixed-type column
    ("025" beside 27.0 became 25) and could not say which line is malformed.
    """
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file, no problems in it")
    try:
        lines = _datasets().load_dataset("text", data_files=str(path), split="train",
                                         keep_in_memory=True)["text"]
    except Exception as e:  # unreadable bytes and the like
        raise ValueError(f"{path}: cannot read as text ({type(e).__name__})") from None
    n = 0
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            n += 1
            yield f"{path}:{lineno}", _parse_line(line, f"{path}:{lineno}")
    if n == 0:
        raise ValueError(f"{path}: only blank lines, no problems in it")


def _iter_saved(path: Path):
    """Yield (where, dict) per row of a dataset folder written by ``save_to_disk``."""
    try:
        ds = _datasets().load_from_disk(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a saved dataset folder ({type(e).__name__})") from None
    if hasattr(ds, "keys"):  # a DatasetDict: its test split, or its only split
        split = "test" if "test" in ds else (list(ds)[0] if len(ds) == 1 else None)
        if split is None:
            raise ValueError(f"{path}: a dataset with splits {sorted(ds)} and no 'test' split")
        ds = ds[split]
    if len(ds) == 0:
        raise ValueError(f"{path}: the dataset has no rows")
    for i, row in enumerate(ds):
        yield f"{path}: row {i}", row


def _answer_to_str(ans) -> str:
    """Gold answer field to a string: 27.0 -> '27' (AMC stores floats), str kept."""
    if isinstance(ans, bool):
        return str(ans)
    if isinstance(ans, float) and ans.is_integer():
        return str(int(ans))
    if isinstance(ans, (int, float)):
        return str(ans)
    if isinstance(ans, str):
        return ans.strip()
    raise TypeError(f"answer has type {type(ans).__name__}")


def _strip_math_dollars(s: str) -> str:
    """'$\\frac{1}{2}$' -> '\\frac{1}{2}'; '$69$,$84$' -> '69,84' (escaped \\$ kept)."""
    s = s.strip()
    if s.endswith("$."):  # '$(-\infty, 0) \cup\{1\}$.'
        s = s[:-1]
    if s.startswith("$"):
        s = re.sub(r"(?<!\\)\$", "", s)
    return s.strip()


def _named_columns(rec: dict, where: str, question_field: str, answer_field: str) -> dict:
    """A record whose problem and answer columns were named by the user (--question-field)."""
    for field in (question_field, answer_field):
        if field not in rec:
            raise ValueError(f"{where}: no field '{field}' (fields: {', '.join(map(str, rec))})")
    question, raw = rec[question_field], rec[answer_field]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: field '{question_field}' is not a non-empty string")
    if isinstance(raw, list) and raw and isinstance(raw[0], str):
        raw = raw[0]  # OlympiadBench-style list of answers: the first
    if isinstance(raw, str) and "####" in raw:
        answer = raw.split("####")[-1].strip().split("\n", 1)[0].strip().replace(",", "")
    elif isinstance(raw, str) and "\\boxed" in raw:
        answer = last_boxed(raw)
    else:
        try:
            answer = _answer_to_str(raw)
        except TypeError as e:
            raise ValueError(f"{where}: field '{answer_field}': {e}") from None
    answer = _strip_math_dollars(answer) if answer else answer
    if not answer:
        raise ValueError(f"{where}: field '{answer_field}' is empty")
    return {"question": question, "answer": answer}


def _convert_record(rec: dict, where: str, question_field=None, answer_field=None) -> dict:
    """One raw benchmark record -> {'question', 'answer', 'subdomain'} (+ 'unit' if it has one)."""
    if question_field or answer_field:
        out = _named_columns(rec, where, question_field or "question", answer_field or "answer")
        label = rec.get("subdomain") or rec.get("type")
        out["subdomain"] = subdomain_from_label(label) or classify_subdomain(out["question"])
        return _with_unit(out, rec)
    question = rec.get("question")
    if not isinstance(question, str) or not question.strip():
        question = rec.get("problem")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: record has no 'question' / 'problem' text")
    label = None

    if "final_answer" in rec:  # OlympiadBench: list of LaTeX answers
        fa = rec["final_answer"]
        if not isinstance(fa, list) or not fa or not isinstance(fa[0], str):
            raise ValueError(f"{where}: 'final_answer' must be a non-empty list of str")
        answer = _strip_math_dollars(fa[0])
        if isinstance(rec.get("context"), str) and rec["context"].strip():
            question = rec["context"].strip() + "\n\n" + question
        # subfield deliberately not used as the label: the classifier assigns one.
    elif "answer" in rec and rec["answer"] is not None:
        raw = rec["answer"]
        if isinstance(raw, str) and "####" in raw:  # GSM8K: reasoning + '#### 42'
            answer = raw.split("####")[-1].strip().split("\n", 1)[0].strip()
            answer = answer.replace(",", "")
        else:  # AIME / AMC / project suite
            try:
                answer = _answer_to_str(raw)
            except TypeError as e:
                raise ValueError(f"{where}: {e}") from None
        label = rec.get("subdomain")
    elif isinstance(rec.get("solution"), str):  # Minerva / MATH: last box of solution
        answer = last_boxed(rec["solution"])
        if answer is None:
            raise ValueError(f"{where}: no \\boxed{{...}} answer in 'solution'")
        label = rec.get("type")
    else:
        raise ValueError(f"{where}: record has no 'answer', 'final_answer' or 'solution'")

    if not answer:
        raise ValueError(f"{where}: empty answer")
    subdomain = subdomain_from_label(label) or subdomain_from_label(rec.get("type"))
    if subdomain is None:
        subdomain = classify_subdomain(question)
    return _with_unit({"question": question, "answer": answer, "subdomain": subdomain}, rec)


def _with_unit(out: dict, rec: dict) -> dict:
    """Keep a record's unit field (OlympiadBench: 'km/h', '$cm^2$'): the grader drops it."""
    unit = rec.get("unit")
    if isinstance(unit, str) and unit.strip():
        out["unit"] = unit.strip()
    return out


def resolve_benchmark_path(path_or_name) -> Path:
    """A known benchmark name ('gsm8k', 'aime24', ...) or a path to a .jsonl file."""
    key = str(path_or_name)
    if key in BENCHMARK_NAMES:
        return BENCHMARK_DIR / BENCHMARK_NAMES[key]
    return Path(path_or_name)


def load_benchmark(path_or_name, question_field=None, answer_field=None) -> list[dict]:
    """Load a benchmark as records ``{"question", "answer", "subdomain"}`` (+ ``"unit"``).

    ``path_or_name`` is a name from ``BENCHMARK_NAMES`` (read from ``BENCHMARK_DIR``), a
    JSON-lines file, or a dataset folder written by ``datasets``' ``save_to_disk``; both
    are read through ``datasets``. ``question_field`` / ``answer_field`` name the columns
    of any other layout (an answer with ``####`` or a ``\\boxed{}`` gives what it marks).
    Otherwise the format is detected per record:
      * GSM8K (question, answer with ``####`` x): answer after ``####``, commas removed;
      * AIME24 / AMC23 (problem/question, answer): ``answer`` as a string (27.0 -> '27');
      * Minerva (problem, solution, type): last ``\\boxed{}`` of ``solution``; ``type``
        is used as the label only if it is one of MATH's subjects (Minerva's are MIT
        course names, so those get the classifier);
      * OlympiadBench (question, final_answer, subfield, unit): ``final_answer[0]``
        without its ``$``; subdomain from the classifier; ``unit`` kept for the grader;
      * project suite (question, solution, answer, subdomain, level): as given.
    A record's own ``subdomain`` label is used when valid, else ``classify_subdomain``.
    Raises FileNotFoundError for a missing path and a one-line ``ValueError`` naming the
    file, the line (or row) and the field for a malformed record, and for a file with
    no records at all.
    """
    path = resolve_benchmark_path(path_or_name)
    if path.is_dir():
        rows = _iter_saved(path)
    elif path.is_file():
        rows = _iter_jsonl(path)
    else:
        raise FileNotFoundError(f"benchmark file not found: {path}")
    return [_convert_record(rec, where, question_field, answer_field) for where, rec in rows]
