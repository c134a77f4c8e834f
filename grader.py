"""Answer extraction and equivalence: the evaluation grader and the RL reward of Stages III-IV.

``extract_answer(text)`` takes the final answer from a model output or a reference
solution: of ``#### x`` (GSM8K), the last ``\\boxed{x}`` (also ``\\boxed x``, ``\\fbox``,
``\\framebox``) and ``the answer is x`` / ``final answer: x``, the marker that occurs
LAST wins (the answer the writer settled on); an unterminated box gives None.

``is_equiv(pred, gold)`` normalizes both sides (``normalize_answer``: drops $, \\left /
\\right, spacing, \\text{..} wrappers, degrees, %, dollars, units after a number and a
leading ``x =``; unifies \\dfrac / \\frac12 / \\sqrt2 spellings, thousands commas and
whitespace; maps "(B)" / "\\text{(B)}" to "B"; writes plain numbers canonically) and then
decides, in this order:
  * a missing or empty side is never equivalent (an empty prediction earns nothing);
  * equal normalized strings are equivalent;
  * tuples / intervals match element-wise, with the same bracket types ([1,2) is not (1,2));
  * sets and bare comma lists match in any order (a list of solutions has no order);
  * "x=1, x=2" is the list "1, 2" (the left-hand sides name the variable, not the value);
  * numbers match within relative 1e-6 after evaluating simple LaTeX arithmetic
    (latex_eval.evaluate_latex), so "0.75" == "\\frac34" and "8 - 8 + 7" == "7";
  * expressions in the same variables match if they agree at fixed generic points
    (distinct rational functions agree there with probability ~0);
  * two adjacent letters are a word, never a product, so "listen" != "silent".

Every public function is total: ``extract_answer``, ``normalize_answer`` and
``is_equiv`` never raise, whatever they are given (None, ints, garbage, huge or
brace-unbalanced strings), and hard size limits keep grading cheap on adversarial
outputs. No torch import: it stays importable from data workers and tests.
"""

from __future__ import annotations

import math
import re

from latex_eval import _prepare_for_eval, _tokenize, _variables, evaluate_latex

# Hard limits that keep grading O(small) on adversarial model outputs.
MAX_ANSWER_CHARS = 2000  # longer answers are only compared as whitespace-free strings
MAX_ELEMENTS = 64  # tuple / list / set size limit for element-wise comparison
REL_TOL = 1e-6
ABS_TOL = 1e-9


# ----------------------------------------------------------------------------
# Answer extraction
# ----------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])")
_HASH_RE = re.compile(r"####")
# "the answer is x", "The final answer is: x", "final answer: x". Non-nested quantifiers
# only, so the regex stays linear on adversarial input.
_ANSWER_IS_RE = re.compile(r"\b(?:final\s+)?answer\s*(?:is\b|:)\s*:?", re.IGNORECASE)


def _match_brace(text: str, open_pos: int) -> int:
    """Index of the '}' matching the '{' at ``open_pos``, or -1 if unbalanced."""
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":  # an escaped brace (\{ or \}) doesn't count for nesting
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _box_content_at(text: str, m: re.Match) -> str | None:
    """Content of the \\boxed / \\fbox command matched by ``m`` (None if malformed)."""
    i = m.end()
    # \boxed[...]{x} is not a thing, but \framebox[width]{x} is: skip an optional [..].
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "[" and text[m.start():m.end()].endswith("framebox"):
        j = text.find("]", i)
        if j < 0:
            return None
        i = j + 1
    if i < len(text) and text[i] == "{":
        j = _match_brace(text, i)
        if j < 0:
            return None  # truncated generation: no answer rather than a partial one
        return text[i + 1:j].strip()
    if m.end() < len(text) and text[m.end()] in " \t":
        # "\boxed 5$" (TeX's brace-less form): up to '$' or end of line.
        rest = text[i:]
        rest = re.split(r"[\$\n]", rest, maxsplit=1)[0]
        return rest.strip().rstrip(".").strip() or None
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\boxed x`` / ``\\fbox{...}`` in ``text``."""
    if not isinstance(text, str):
        return None
    try:
        matches = list(_BOX_RE.finditer(text))
        if not matches:
            return None
        return _box_content_at(text, matches[-1])
    except Exception:
        return None


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
                             rest of that line, trailing period / ``$`` stripped.
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

        boxes = list(_BOX_RE.finditer(text))
        if boxes:
            m = boxes[-1]
            candidates.append((m.start(), _box_content_at(text, m)))

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
# Normalization
# ----------------------------------------------------------------------------

_TEXT_CMD_RE = re.compile(
    r"\\(?:text|textbf|textit|textrm|texttt|mathrm|mathbf|mathit|mathsf|mathtt|mbox|"
    r"operatorname|mathnormal|boldsymbol|bm)\s*\{([^{}]*)\}"
)
_LHS_RE = re.compile(
    r"^\s*(?:[A-Za-z](?:_\{[^{}=]{0,20}\}|_[A-Za-z0-9])?|[A-Za-z]\([A-Za-z]\))\s*=(?!=)"
)
_UNIT_WORD_RE = re.compile(r"([A-Za-z]+)\.?(?:\^\{?-?\d+\}?)?")
# Words that follow a number but are mathematics, not units ("2 pi" is not "2").
_NOT_UNITS = {"pi", "sqrt", "ln", "log", "sin", "cos", "tan", "exp", "i", "e", "and", "or"}
_NUMBER_PREFIX_RE = re.compile(
    r"([-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.?\d*|\.\d+)(?:/\d+)?)"
)
# "5\text{ cm}", "1.6 \mathrm{~m}^2": a number followed by ONE text-wrapped unit. Single
# letters count here (m, s, g) because the wrapper says they are text, not variables.
_TEXT_UNIT_RE = re.compile(
    r"^\s*([-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.?\d*|\.\d+))\s*"
    r"\\(?:text|mathrm|mbox|textrm|operatorname)\s*\{\s*([A-Za-z][A-Za-z ./]{0,30})\}"
    r"\s*(?:\^\s*\{?-?\d\}?)?\s*\.?\s*$"
)
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_MC_RE = re.compile(r"\(?([A-Ea-e])\)?")


def _strip_units(s: str) -> str:
    """'5 cm' -> '5', '12 square units' -> '12', '3 m/s^2' -> '3'; other text untouched.

    Only strips when a plain number is followed by whitespace-separated words (so '5x'
    keeps its variable). Word-by-word checks, no nested regex quantifiers.
    """
    m = _NUMBER_PREFIX_RE.match(s)
    if not m or m.end() == len(s) or not s[m.end()].isspace():
        return s
    tail = s[m.end():].strip()
    words = [w for w in re.split(r"[\s/]+", tail) if w]
    for w in words:
        u = _UNIT_WORD_RE.fullmatch(w)
        # Single letters after a space are variables ("2 n"), not units.
        if not u or len(u.group(1)) < 2 or u.group(1).lower() in _NOT_UNITS:
            return s
    return m.group(1) if words else s


def _fix_fracs(s: str) -> str:
    r"""\frac12 -> \frac{1}{2}, \frac1b -> \frac{1}{b}, \frac{a}b -> \frac{a}{b}."""
    out = []
    parts = s.split("\\frac")
    out.append(parts[0])
    for part in parts[1:]:
        out.append("\\frac")
        if not part or part[0] == "{":
            # \frac{a}b: brace the second argument if it is a single bare char
            if part.startswith("{"):
                j = _match_brace(part, 0)
                if 0 < j < len(part) - 1 and part[j + 1] not in "{\\":
                    part = part[:j + 1] + "{" + part[j + 1] + "}" + part[j + 2:]
            out.append(part)
            continue
        if len(part) >= 2 and part[0] not in "\\" and part[1] not in "{\\":
            out.append("{" + part[0] + "}{" + part[1] + "}" + part[2:])
        elif len(part) >= 2 and part[0] not in "\\":
            out.append("{" + part[0] + "}" + part[1:])
        else:
            out.append(part)
    return "".join(out)


def _fix_sqrt(s: str) -> str:
    r"""\sqrt2 -> \sqrt{2}, \sqrt x -> \sqrt{x} (a single bare char argument)."""
    return re.sub(r"\\sqrt\s*([A-Za-z0-9])", r"\\sqrt{\1}", s)


def normalize_answer(s) -> str:
    """Canonical string form of an answer, for string comparison. Never raises.

    Removes LaTeX noise ($, \\left/\\right, spacing commands, \\text{..} wrappers,
    degrees, percent, dollars, units after a number, a leading ``x =``), unifies
    \\dfrac/\\tfrac/\\frac12/\\sqrt2 spellings, thousands commas and whitespace, and maps
    multiple-choice forms "(B)" / "\\text{(B)}" / "B" to "B".
    """
    try:
        if s is None:
            return ""
        if isinstance(s, bool):
            return str(s).lower()
        if isinstance(s, float):
            if s.is_integer():
                return str(int(s))
            return repr(s)
        if not isinstance(s, str):
            s = str(s)
        if len(s) > MAX_ANSWER_CHARS:
            return "".join(s.split())
        return _normalize_str(s)
    except Exception:
        try:
            return "".join(str(s).split())[:MAX_ANSWER_CHARS]
        except Exception:
            return ""


def _normalize_str(s: str) -> str:
    s = s.strip()
    # A boxed answer handed in whole.
    if _BOX_RE.search(s):
        inner = last_boxed(s)
        if inner is not None:
            s = inner
    s = s.replace("\n", " ").replace("\t", " ").replace("\u2212", "-")  # unicode minus
    # Spacing commands: \! \, \; \: \  ~ \quad
    s = re.sub(r"\\[!,;: ]", " ", s)
    s = re.sub(r"\\q?quad(?![A-Za-z])", " ", s)
    s = s.replace("~", " ")
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?:l|r)?(?![A-Za-z])", "", s)
    s = re.sub(r"\\displaystyle(?![A-Za-z])", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("{,}", ",")  # LaTeX thousands separator 1{,}000
    # Degrees: ^\circ, ^{\circ}, °, \degree
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ", "", s)
    s = s.replace("\\circ", "").replace("°", "").replace("\\degree", "")
    # Percent and dollars: "50\%" == "50%" == "50"; "\$5" == "5".
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("\\$", "").replace("$", "")
    m = _TEXT_UNIT_RE.match(s)
    if m and m.group(2).strip().lower() not in _NOT_UNITS:
        s = m.group(1)
    # Unwrap \text{..} & co (repeatedly, innermost first); a leading space keeps
    # "5\text{cm}" apart as "5 cm" so the unit can be recognised.
    for _ in range(10):
        new = _TEXT_CMD_RE.sub(lambda m: " " + m.group(1), s)
        if new == s:
            break
        s = new
    s = s.strip()
    # Multiple choice: "(B)", "B", "b)", "\text{(B)}" -> "B".
    m = _MC_RE.fullmatch(s)
    if m and (s[0] == "(" or s[-1] == ")" or s.isupper()):
        return m.group(1).upper()
    # A spelled-out conjunction separates list items: "1 and 3" -> "1,3".
    s = re.sub(r"\s+(?:and|or)\s+", ",", s)
    # Leading "x =", "k=", "a_1 =", "f(x) =" (one equation only: keep systems intact).
    s = _strip_lhs(s)
    s = _strip_units(s)
    s = s.strip()
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    # Remove all whitespace (TeX ignores it in math mode; "2 n" == "2n") -- except one
    # space ending a command before a letter: "\pi r" must not become "\pir".
    s = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])", "\\1\x00", s)
    s = "".join(s.split()).replace("\x00", " ")
    s = _fix_sqrt(s)
    s = _fix_fracs(s)
    # Mixed number "2\frac{1}{4}" means 9/4 (a proper digit fraction right after an
    # integer; "2\frac{\sqrt3}{3}" stays a product).
    m = re.fullmatch(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}", s)
    if m and int(m.group(3)) < int(m.group(4)):
        whole, num, den = int(m.group(2)), int(m.group(3)), int(m.group(4))
        s = f"{m.group(1)}\\frac{{{whole * den + num}}}{{{den}}}"
    # Trailing sentence period ("5."), but not a decimal point of "5.0".
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1]
    # Plain numbers to a canonical string: "+5" -> "5", "0.50" -> "0.5", "5.0" -> "5".
    if re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)", s):
        s = _canonical_number(s)
    # Words (after \text unwrapping) compare case-insensitively: "Yes" == "yes".
    if re.fullmatch(r"[A-Za-z]{2,}", s):
        s = s.lower()
    return s


def _canonical_number(s: str) -> str:
    neg = s.startswith("-")
    s = s.lstrip("+-")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    s = s.lstrip("0") or "0"
    if s.startswith("."):
        s = "0" + s
    return ("-" + s) if neg and s != "0" else s


# ----------------------------------------------------------------------------
# Equivalence
# ----------------------------------------------------------------------------

_OPEN = "([{"
_CLOSE = ")]}"
# Fixed, irrational-ish sample points for identity testing of expressions in variables.
_SAMPLE_POINTS = (1.3183, 2.7397, 0.6021, 3.5741)


def _split_top_level(s: str) -> list[str]:
    """Split on commas that are not inside any bracket. '[1,2)' brackets count too."""
    parts, depth, cur = [], 0, []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] in "{}":
            cur.append(s[i:i + 2])  # \{ \} are set delimiters: treat as brackets
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
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


def _numbers_close(a: float, b: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)


def _expr_equiv(a: str, b: str) -> bool:
    """Numeric equality, or identity of expressions in the same variables."""
    va, vb = evaluate_latex(a), evaluate_latex(b)
    if va is not None and vb is not None:
        return _numbers_close(va, vb)
    if va is not None or vb is not None:
        return False  # a number vs a non-number expression
    pa, pb = _prepare_for_eval(a), _prepare_for_eval(b)
    if pa is None or pb is None:
        return False
    try:
        ta, tb = _tokenize(pa), _tokenize(pb)
    except Exception:
        return False
    names = _variables(ta)
    if not names or names != _variables(tb) or len(names) > 4:
        return False
    # Polynomial-identity style test: distinct (rational) functions agree at a few
    # generic points with probability ~0. Every point must evaluate on both sides.
    for k in range(3):
        env = {n: _SAMPLE_POINTS[(k + j) % len(_SAMPLE_POINTS)] + 0.37 * j
               for j, n in enumerate(sorted(names))}
        x, y = evaluate_latex(pa, env), evaluate_latex(pb, env)
        if x is None or y is None or not _numbers_close(x, y):
            return False
    return True


def _equiv_norm(a: str, b: str, depth: int) -> bool:
    """Equivalence of two already-normalized answers."""
    if a == b:
        return bool(a)
    if not a or not b or depth > 4:
        return False
    ga, gb = _outer_group(a), _outer_group(b)
    pa = _split_top_level(ga[1] if ga else a)
    pb = _split_top_level(gb[1] if gb else b)
    if len(pa) > 1 or len(pb) > 1:
        if len(pa) != len(pb) or len(pa) > MAX_ELEMENTS:
            return False
        # "x=1,x=2" lists the same solutions as "1,2".
        pa, pb = [_strip_lhs(x) for x in pa], [_strip_lhs(y) for y in pb]
        if ga and gb:
            if ga[0] == "{" and gb[0] == "{":  # sets: order does not matter
                return _unordered_equiv(pa, pb, depth)
            if (ga[0], ga[2]) != (gb[0], gb[2]):  # [1,2) vs (1,2): different intervals
                return False
            return all(_equiv_norm(x, y, depth + 1) for x, y in zip(pa, pb))
        if ga or gb:
            return False  # "(1,2)" vs "1,2"
        return _unordered_equiv(pa, pb, depth)  # bare list of solutions: any order
    return _expr_equiv(a, b)


def _strip_lhs(s: str) -> str:
    """'x=5' -> '5' (a single equation with a simple left-hand side)."""
    if s.count("=") == 1:
        m = _LHS_RE.match(s)
        if m:
            return s[m.end():].strip()
    return s


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


def is_equiv(pred, gold) -> bool:
    """True if answer ``pred`` is mathematically the same as ``gold``. Never raises.

    Both sides go through ``normalize_answer``; then: equal strings; tuples / intervals
    element-wise with the same bracket types; sets and bare comma lists in any order;
    numbers with relative tolerance 1e-6 (after evaluating simple LaTeX arithmetic);
    expressions in the same variables by evaluation at fixed generic points.
    A missing / empty prediction or gold is never equivalent. Since arithmetic is evaluated,
    "8 - 8 + 7" equals "7": an answer that copies a question's arithmetic passes (a reward a
    long RL run could learn to collect; no checkpoint here answers that way, docs/journal.md).
    """
    try:
        if pred is None or gold is None:
            return False
        a, b = normalize_answer(pred), normalize_answer(gold)
        if not a or not b:
            return False
        if a == b:
            return True
        if len(a) > MAX_ANSWER_CHARS or len(b) > MAX_ANSWER_CHARS:
            return False
        return _equiv_norm(a, b, 0)
    except Exception:
        return False

