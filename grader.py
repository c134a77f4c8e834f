"""Answer extraction and equivalence: the evaluation grader and the RL reward of Stages III-IV.

The grader is the reward, so a false accept is a reward a policy can learn to collect: every
rule errs towards "not equivalent" where the two readings differ.

``extract_answer(text)`` takes the final answer from a model output or a reference
solution: of ``#### x`` (GSM8K), the last ``\\boxed{x}`` (also ``\\boxed x``, ``\\fbox``,
``\\framebox``; of two boxes the last one counts) and ``the answer is x`` / ``final answer:
x`` (a sentence such as "that there are 6 ways" gives its math, "6"), the marker that
occurs LAST wins; an unterminated box gives None.

``is_equiv(pred, gold, unit=None)`` normalizes both sides (answer_norm.normalize_answer:
wrappers, units after any expression, spellings), drops the benchmark's ``unit`` from both
ends where given, and decides, in this order:
  * a missing or empty side is never equivalent (an empty prediction earns nothing);
  * equal normalized strings are equivalent;
  * unions of intervals / sets (``\\cup``) match component-wise in any order;
  * matrices (pmatrix, bmatrix) match entry-wise, with the same shape;
  * tuples / intervals match element-wise, with the same bracket types ([1,2) is not (1,2),
    and a set \\{2,4\\} is not the pair (2,4)); sets, bare comma lists and a set against the
    same bare list match in any order; "x=1, x=2" is the list "1, 2";
  * equations match with their sides in either order (``MR=SRMC`` is ``SRMC=MR``), or when
    their differences lhs - rhs agree up to sign;
  * numbers: after evaluating LaTeX arithmetic (latex_eval.evaluate_exact, exact Fractions
    while rational), see ``values_equal``: integers and fractions EXACTLY (1450001 is not
    1450000); a gold written as a decimal ("0.27", "4.5e33", "3.14159265358979") is a
    rounded value and matches within relative 1e-6; an irrational value (\\pi, \\sqrt2)
    within relative 1e-9 (float rounding only); no absolute tolerance for a non-zero gold,
    so 7.4e-11 is not 7.4e-12 and 0 is not 3.89e-10;
  * expressions in the same variables (letters next to each other are a product: "2RC")
    match if they agree at fixed generic points; a lone ``e`` on one side is Euler's number
    (``\\exp(x)`` is ``e^{x}``); a bare word is never a product, so "listen" != "silent".

Every public function is total: it never raises, whatever it is given (None, ints,
garbage, 100k characters, 5,000 nested braces, ``10^{10^{10}}``, ``1000000!``, null
bytes), and hard size, depth and exponent limits, not signals or threads, keep a call
well under a millisecond on average and under a second on any string, so it is safe in a
DataLoader worker or a torchrun rank. No torch import.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from answer_norm import (MAX_ANSWER_CHARS, BOX_RE, box_content_at, last_boxed, match_brace,
                         normalize_answer, normalize_unit, strip_lhs)
from latex_eval import _prepare_for_eval, _tokenize, _variables, evaluate_exact

__all__ = ["extract_answer", "is_equiv", "last_boxed", "normalize_answer", "values_equal"]

MAX_ELEMENTS = 64  # tuple / list / set size limit for element-wise comparison
REL_TOL = 1e-6  # a gold written as a decimal is rounded: this much relative slack
FLOAT_REL_TOL = 1e-9  # irrational values are floats: rounding error only
ZERO_TOL = 1e-12  # an irrational expression that is 0 (\sin\pi) evaluates to ~1e-16

# ----------------------------------------------------------------------------
# Answer extraction
# ----------------------------------------------------------------------------

_HASH_RE = re.compile(r"####")
# "the answer is x", "The final answer is: x", "final answer: x". Non-nested quantifiers
# only, so the regex stays linear on adversarial input.
_ANSWER_IS_RE = re.compile(r"\b(?:final\s+)?answer\s*(?:is\b|:)\s*:?", re.IGNORECASE)
# In a sentence after "the answer is": its first math span or number.
_MATH_SPAN_RE = re.compile(r"\$([^$]{1,500})\$|\\\((.{1,500}?)\\\)")
_NUMBER_IN_TEXT_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_WORD_START_RE = re.compile(r"[A-Za-z]{2,}\b")
_ANSWER_WORDS = {"yes", "no", "true", "false", "none", "infinity", "even", "odd", "never",
                 "always", "impossible"}
# Words that make a sentence's number something else than the answer.
_QUALIFIER_RE = re.compile(
    r"\b(?:not|no|never|minus|negative|less|more|fewer|greater|than|between|twice|half|times|"
    r"of|over|under|above|below|about|approximately|around|least|most|except|sqrt|root|log|ln|"
    r"sin|cos|tan|pi|exp|frac|squared|cubed|thousand|million|billion|hundred|dozen)\b",
    re.IGNORECASE)


def _clean_inline_answer(s: str) -> str | None:
    """Trim a free-text answer ("$5$.", "**12**", "42 apples.") to the answer itself."""
    s = s.strip()
    # Markdown emphasis around the answer.
    s = s.strip("*").strip()
    # "$-2$. I hope it is correct." (Minerva's prompt format): keep the math span only.
    if s.startswith("$"):
        m = re.match(r"\$+((?:[^$\\]|\\.)*)\$", s)
        if m:
            return m.group(1).strip() or None
    # "that there are 6 ways": a sentence, not an answer; its math span or number is. Only
    # an unambiguous one: a sentence with a word that changes the number ("not 5", "minus 5",
    # "less than 7", "sqrt(2)") or with two numbers ("between 3 and 4") has no answer, since
    # taking its first number would hand the RL policy a reward for a wrong one.
    w = _WORD_START_RE.match(s)
    if w and w.group().lower() not in _ANSWER_WORDS and not s[:w.end()].isupper():
        m = _MATH_SPAN_RE.search(s)
        if m:
            return (m.group(1) or m.group(2)).strip() or None
        sentence = re.split(r"\.\s", s, maxsplit=1)[0]
        if _QUALIFIER_RE.search(sentence) or re.search(r"[\\^/()]", sentence):
            return None
        nums = _NUMBER_IN_TEXT_RE.findall(sentence)
        if len(nums) == 1:
            return nums[0]
        if nums:
            return None
    # "42. Let me double-check": the answer ends with its sentence (not at "3.5").
    s = re.split(r"\.\s+(?=[A-Z])", s, maxsplit=1)[0]
    # Trailing sentence punctuation and math delimiters, in any order: "$5$." / "5.$".
    prev = None
    while prev != s:
        prev = s
        s = s.strip()
        if s.endswith("\\]") or s.endswith("\\)"):
            s = s[:-2]
        if s.startswith("\\[") or s.startswith("\\("):
            s = s[2:]
        s = s.rstrip(".").rstrip("$").lstrip("$").strip("*")
    return s or None


def extract_answer(text: str) -> str | None:
    """Extract the final answer from a model output or a reference solution.

    Recognised markers (whichever occurs LAST in the text wins, because that is the
    answer the writer settled on):
      * ``#### x``       -- GSM8K style; what follows the last ``####``, first line;
      * ``\\boxed{x}``    -- last box, nested braces allowed; also ``\\boxed x``,
                             ``\\fbox{x}`` and ``\\framebox{x}``;
      * ``the answer is x`` / ``The final answer is x`` / ``final answer: x`` --
                             rest of that line, trailing period / ``$`` stripped; a
                             sentence ("that there are 6 ways") gives its math or number.
    Returns None when there is no such marker (or the last box is unterminated).
    Never raises.
    """
    try:
        if text is None:
            return None
        if not isinstance(text, str):
            if isinstance(text, (int, float)) and not isinstance(text, bool):
                return str(text)
            return None
        candidates: list[tuple[int, str | None]] = []

        hashes = [m for m in _HASH_RE.finditer(text)]
        if hashes:
            m = hashes[-1]
            rest = text[m.end():].lstrip("#").strip()
            line = rest.split("\n", 1)[0].strip()
            candidates.append((m.start(), line or None))

        boxes = list(BOX_RE.finditer(text))
        if boxes:
            m = boxes[-1]
            candidates.append((m.start(), box_content_at(text, m)))

        said = list(_ANSWER_IS_RE.finditer(text))
        if said:
            m = said[-1]
            line = text[m.end():].split("\n", 1)[0]
            candidates.append((m.start(), _clean_inline_answer(line)))

        if not candidates:
            return None
        # A box inside the "answer is" sentence starts later, so it wins -- as it should.
        candidates.sort(key=lambda t: t[0])
        return candidates[-1][1]
    except Exception:
        return None


# ----------------------------------------------------------------------------
# Equivalence
# ----------------------------------------------------------------------------

_OPEN = "([{"
_CLOSE = ")]}"
# Fixed, irrational-ish sample points for identity testing of expressions in variables.
_SAMPLE_POINTS = (1.3183, 2.7397, 0.6021, 3.5741)
# A gold written as a (rounded) decimal: "0.27", "4.5e33", "1.70e4", "4.5\times10^{33}".
_ROUNDED_RE = re.compile(
    r"[-+]?(?:\d+\.\d*|\.\d+|\d+(?:\.\d*)?[eE][-+]?\d+|\d+(?:\.\d*)?(?:\\times|\\cdot|\*)"
    r"10\^(?:\{[-+]?\d+\}|[-+]?\d+))(?:[eE][-+]?\d+)?"
)


def _split_top_level(s: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` where it is not inside any bracket. '[1,2)' brackets count too."""
    parts, depth, cur = [], 0, []
    i, n, k = 0, len(s), len(sep)
    while i < n:
        c = s[i]
        if c == "\\" and i + 1 < n and s[i + 1] in "{}":
            cur.append(s[i:i + 2])  # \{ \} are set delimiters: treat as brackets
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if depth == 0 and s.startswith(sep, i) and not (k > 1 and s[i + k:i + k + 1].isalpha()):
            parts.append("".join(cur))
            cur = []
            i += k
            continue
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _outer_group(s: str) -> tuple[str, str, str] | None:
    """('(', inner, ']') if ONE bracket pair spans all of ``s`` (mixed types allowed)."""
    if s.startswith("\\{") and s.endswith("\\}"):
        o, c, inner = "{", "}", s[2:-2]
    elif len(s) >= 2 and s[0] in _OPEN and s[-1] in _CLOSE:
        o, c, inner = s[0], s[-1], s[1:-1]
    else:
        return None
    depth = 0
    for ch in inner:  # the outer pair must really be a pair: "(1)+(2)" isn't grouped
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
            if depth < 0:
                return None
    return (o, inner, c) if depth == 0 else None


def values_equal(vp, vg, rounded: bool) -> bool:
    """Is the predicted value ``vp`` the gold value ``vg``? (Fractions or floats)

    ``rounded``: the gold is written as a decimal, a rounded value, so relative 1e-6.
    Otherwise two rational values must be equal exactly, and an irrational one (a float)
    may differ by relative 1e-9 (float rounding); a zero gold allows 1e-12 of float noise
    from an irrational expression only. No absolute tolerance for a non-zero gold.
    """
    try:
        if isinstance(vp, float) and math.isinf(vp) or isinstance(vg, float) and math.isinf(vg):
            return vp == vg
        exact = isinstance(vp, Fraction) and isinstance(vg, Fraction)
        if rounded:
            if exact:
                return abs(vp - vg) <= Fraction(REL_TOL) * abs(vg)
            return abs(float(vp) - float(vg)) <= REL_TOL * abs(float(vg))
        if exact:
            return vp == vg
        if vg == 0:
            return abs(float(vp)) <= ZERO_TOL
        return abs(float(vp) - float(vg)) <= FLOAT_REL_TOL * abs(float(vg))
    except (OverflowError, ValueError, ZeroDivisionError, TypeError):
        return False


def _close(x: float, y: float) -> bool:
    return math.isclose(x, y, rel_tol=FLOAT_REL_TOL, abs_tol=ZERO_TOL)


def _expr_equiv(a: str, b: str) -> bool:
    """Numeric equality (``b`` is the gold), or identity of expressions in the same variables."""
    va, vb = evaluate_exact(a), evaluate_exact(b)
    if va is not None and vb is not None:
        return values_equal(va, vb, bool(_ROUNDED_RE.fullmatch(b)))
    pa, pb = _prepare_for_eval(a), _prepare_for_eval(b)
    if pa is None or pb is None:
        return False
    try:
        ta, tb = _tokenize(pa), _tokenize(pb)
    except Exception:
        return False
    na, nb = _variables(ta), _variables(tb)
    fixed = {}
    if na != nb:
        if na ^ nb != {"e"}:
            return False
        fixed = {"e": math.e}  # \exp(x) vs e^{x}: the lone e is Euler's number
    names = sorted((na | nb) - set(fixed))
    if len(names) > 6:
        return False
    if not names:
        x, y = evaluate_exact(pa, fixed), evaluate_exact(pb, fixed)
        return x is not None and y is not None and _close(float(x), float(y))
    # Polynomial-identity style test: distinct (rational) functions agree at a few
    # generic points with probability ~0. Every point must evaluate on both sides.
    # Two sides that are 0 at every point are degenerate readings ("I(0) e^t" read as
    # I*0*e^t, a function call taken for a product): not evidence of equality.
    nonzero = False
    for k in range(3):
        env = {n: _SAMPLE_POINTS[(k + j) % len(_SAMPLE_POINTS)] + 0.37 * j
               for j, n in enumerate(names)}
        env.update(fixed)
        x, y = evaluate_exact(pa, env), evaluate_exact(pb, env)
        if x is None or y is None or not _close(float(x), float(y)):
            return False
        nonzero = nonzero or abs(float(y)) > ZERO_TOL
    return nonzero


def _matrix_cells(s: str) -> list[list[str]] | None:
    """'\\mat{1&2\\\\3&4}' -> [['1','2'],['3','4']]; None if ``s`` is not one matrix."""
    if not s.startswith("\\mat{") or match_brace(s, 4) != len(s) - 1:
        return None
    rows = [r for r in s[5:-1].split("\\\\")]
    while rows and not rows[-1].strip():
        rows.pop()
    cells = [r.split("&") for r in rows]
    if not cells or sum(len(r) for r in cells) > MAX_ELEMENTS:
        return None
    return cells


def _equation_sides(s: str) -> tuple[str, str] | None:
    parts = _split_top_level(s, "=")
    if len(parts) == 2 and all(parts) and not any(c in s for c in "<>"):
        return parts[0], parts[1]
    return None


def _equiv_norm(a: str, b: str, depth: int) -> bool:
    """Equivalence of prediction ``a`` and gold ``b``, both already normalized."""
    if a == b:
        return bool(a)
    if not a or not b or depth > 4:
        return False
    ua, ub = _split_top_level(a, "\\cup"), _split_top_level(b, "\\cup")
    if len(ua) > 1 or len(ub) > 1:  # unions: the same pieces in any order
        return len(ua) == len(ub) <= MAX_ELEMENTS and _unordered_equiv(ua, ub, depth)
    ma, mb = _matrix_cells(a), _matrix_cells(b)
    if ma is not None or mb is not None:
        if ma is None or mb is None or [len(r) for r in ma] != [len(r) for r in mb]:
            return False
        return all(_equiv_norm(x, y, depth + 1) for ra, rb in zip(ma, mb) for x, y in zip(ra, rb))
    ga, gb = _outer_group(a), _outer_group(b)
    pa = _split_top_level(ga[1] if ga else a)
    pb = _split_top_level(gb[1] if gb else b)
    set_a, set_b = ga is not None and ga[0] == "{", gb is not None and gb[0] == "{"
    if len(pa) > 1 or len(pb) > 1 or set_a != set_b:
        if len(pa) != len(pb) or len(pa) > MAX_ELEMENTS:
            return False
        # "x=2,y=3" names each value: pair them by name, so "x=3,y=2" is another answer
        na, nb = [_lhs_name(x) for x in pa], [_lhs_name(y) for y in pb]
        if len(set(na)) > 1 or len(set(nb)) > 1:
            if set(na) == {None} or set(nb) == {None}:  # "x=2,y=3" against "2,3": in order
                return all(_equiv_norm(strip_lhs(x), strip_lhs(y), depth + 1) for x, y in zip(pa, pb))
            if None in na or None in nb or sorted(na) != sorted(nb) or len(set(na)) != len(na):
                return False
            vb = dict(zip(nb, pb))
            return all(_equiv_norm(strip_lhs(x), strip_lhs(vb[n]), depth + 1) for n, x in zip(na, pa))
        # "x=1,x=2" lists the same solutions as "1,2".
        pa, pb = [strip_lhs(x) for x in pa], [strip_lhs(y) for y in pb]
        if ga and gb:
            if set_a and set_b:  # sets: order does not matter
                return _unordered_equiv(pa, pb, depth)
            if (ga[0], ga[2]) != (gb[0], gb[2]):  # [1,2) vs (1,2): different intervals
                return False
            return all(_equiv_norm(x, y, depth + 1) for x, y in zip(pa, pb))
        if (ga and not set_a) or (gb and not set_b):
            return False  # "(1,2)" vs "1,2"
        return _unordered_equiv(pa, pb, depth)  # a set or a bare list of solutions: any order
    ea, eb = _equation_sides(a), _equation_sides(b)
    if ea or eb:
        if not (ea and eb):
            return False
        if (_equiv_norm(ea[0], eb[0], depth + 1) and _equiv_norm(ea[1], eb[1], depth + 1)) or \
                (_equiv_norm(ea[0], eb[1], depth + 1) and _equiv_norm(ea[1], eb[0], depth + 1)):
            return True
        da = f"({ea[0]})-({ea[1]})"
        return _expr_equiv(da, f"({eb[0]})-({eb[1]})") or _expr_equiv(da, f"({eb[1]})-({eb[0]})")
    return _expr_equiv(a, b)


_LHS_NAME_RE = re.compile(r"^\s*([A-Za-z](?:_\{?[A-Za-z0-9]{1,5}\}?)?)\s*=(?!=)")


def _lhs_name(s: str) -> str | None:
    """The variable a list element names ("y" of "y = 3"), or None."""
    m = _LHS_NAME_RE.match(s)
    return m.group(1).replace("{", "").replace("}", "") if m else None


def _unordered_equiv(pa: list[str], pb: list[str], depth: int) -> bool:
    remaining = list(pb)
    for x in pa:
        for j, y in enumerate(remaining):
            if _equiv_norm(x, y, depth + 1):
                del remaining[j]
                break
        else:
            return False
    return not remaining


def _drop_unit(s: str, unit: str) -> str:
    if unit and len(s) > len(unit) and s.endswith(unit):
        return s[:-len(unit)]
    return s


def is_equiv(pred, gold, unit=None) -> bool:
    """True if answer ``pred`` is mathematically the same as ``gold``. Never raises.

    ``unit``: the benchmark's unit field for this problem ("km/h", "$cm^2$"), dropped
    from the end of both sides. The rules, in order, are in the module docstring.
    A missing / empty prediction or gold is never equivalent. Since arithmetic is evaluated,
    "8 - 8 + 7" equals "7": an answer that copies a question's arithmetic passes (a reward a
    long RL run could learn to collect; no checkpoint here answers that way, docs/journal.md).
    """
    try:
        if pred is None or gold is None:
            return False
        u = normalize_unit(unit) if unit else ""
        a, b = _drop_unit(normalize_answer(pred), u), _drop_unit(normalize_answer(gold), u)
        if not a or not b:
            return False
        if a == b:
            return True
        if len(a) > MAX_ANSWER_CHARS or len(b) > MAX_ANSWER_CHARS:
            return False
        if _equiv_norm(a, b, 0):
            return True
        # "x+y=1" against "y=1-x": normalizing dropped the y= of one side; compare equations.
        ea, eb = _equation_sides(a) is not None, _equation_sides(b) is not None
        if ea != eb:
            if ea:
                b = _drop_unit(normalize_answer(gold, keep_lhs=True), u)
            else:
                a = _drop_unit(normalize_answer(pred, keep_lhs=True), u)
            return _equation_sides(a) is not None and _equation_sides(b) is not None \
                and _equiv_norm(a, b, 0)
        return False
    except Exception:
        return False
