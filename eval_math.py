"""Math answer extraction, equivalence grading, benchmark loading and subdomain tagging.

This module is BOTH the evaluation grader and the RL reward, so every public grading
function is total: ``extract_answer``, ``normalize_answer`` and ``is_equiv`` never raise,
whatever they are given (None, ints, garbage, huge or brace-unbalanced strings).
Nothing here calls ``eval``; numbers are computed by a tiny recursive-descent parser for
simple LaTeX arithmetic with explicit size limits, so a reward can't be made to hang on
something like ``10^{10^{10}}``.

Sections:
  * answer extraction        -- ``extract_answer``, ``last_boxed``
  * normalization / equality -- ``normalize_answer``, ``evaluate_latex``, ``is_equiv``
  * subdomains               -- ``SUBDOMAINS``, ``classify_subdomain``,
                                ``classifier_accuracy_olympiadbench``
  * benchmark loading        -- ``load_benchmark``, ``BENCHMARK_DIR``
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

# ============================================================================
# Pure, model-free part (no torch import: the grader must stay cheap and importable
# from data workers and tests).
# ============================================================================

BENCHMARK_DIR = Path(__file__).parent.parent / "shared" / "data" / "benchmarks"

# Hard limits that keep grading O(small) on adversarial model outputs.
MAX_ANSWER_CHARS = 2000  # longer answers are only compared as whitespace-free strings
MAX_EVAL_CHARS = 400  # longer expressions are not evaluated numerically
MAX_EVAL_DEPTH = 60  # parser nesting limit (stays far below Python's recursion limit)
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
# Safe evaluation of simple LaTeX arithmetic
# ----------------------------------------------------------------------------


class _EvalError(Exception):
    """Expression is outside the small supported language (or not finite)."""


_TOKEN_RE = re.compile(
    r"""
    (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)   # 12, 1.5, .5, 4.5e33
  | (?P<cmd>\\[A-Za-z]+)                          # \frac, \sqrt, \pi, \times ...
  | (?P<var>[A-Za-z])                             # single-letter variable
  | (?P<op>[-+*/^!(){}\[\]_,|])
    """,
    re.VERBOSE,
)

# Commands that are pure spacing / sizing and carry no value.
_NOOP_CMDS = {"\\left", "\\right", "\\big", "\\Big", "\\bigl", "\\bigr", "\\Bigl",
              "\\Bigr", "\\displaystyle", "\\quad", "\\qquad"}
_GREEK = {
    "\\alpha", "\\beta", "\\gamma", "\\delta", "\\epsilon", "\\varepsilon", "\\zeta",
    "\\eta", "\\theta", "\\vartheta", "\\kappa", "\\lambda", "\\mu", "\\nu", "\\xi",
    "\\rho", "\\sigma", "\\tau", "\\phi", "\\varphi", "\\chi", "\\psi", "\\omega",
    "\\Gamma", "\\Delta", "\\Theta", "\\Lambda", "\\Sigma", "\\Phi", "\\Psi", "\\Omega",
}
_FUNCS = {
    "\\sin": math.sin, "\\cos": math.cos, "\\tan": math.tan, "\\ln": math.log,
    "\\exp": math.exp, "\\log": math.log,  # bare \log: natural (only relative use matters)
    "\\arcsin": math.asin, "\\arccos": math.acos, "\\arctan": math.atan,
    "\\sec": lambda x: 1 / math.cos(x), "\\csc": lambda x: 1 / math.sin(x),
    "\\cot": lambda x: 1 / math.tan(x),
}


def _tokenize(s: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    n = len(s)
    while pos < n:
        if s[pos].isspace():
            pos += 1
            continue
        m = _TOKEN_RE.match(s, pos)
        if not m:
            raise _EvalError(f"bad char {s[pos]!r}")
        kind = m.lastgroup
        val = m.group()
        pos = m.end()
        if kind == "cmd":
            if val in _NOOP_CMDS:
                continue
            if val in ("\\cdot", "\\times", "\\ast"):
                kind, val = "op", "*"
            elif val == "\\div":
                kind, val = "op", "/"
            elif val in ("\\dfrac", "\\tfrac"):
                val = "\\frac"
            elif val in ("\\lfloor", "\\rfloor", "\\lceil", "\\rceil"):
                kind = "op"
        tokens.append((kind, val))
    return tokens


class _Parser:
    """Recursive-descent evaluator.

    Grammar (LaTeX-flavoured, implicit multiplication allowed)::

        expr    := term (('+'|'-') term)*
        term    := unary (('*'|'/') unary | <implicit> power)*
        unary   := ('-'|'+') unary | power
        power   := postfix ('^' unary)?            (right associative)
        postfix := atom '!'*
        atom    := number | variable | '(' expr ')' | '{' expr '}' | '[' expr ']'
                 | \\frac A B | \\sqrt[n]? A | \\binom A B | \\pi | \\infty
                 | \\lfloor expr \\rfloor | \\lceil expr \\rceil | \\func atom

    Values are floats; every operation checks for overflow / non-finite results.
    """

    def __init__(self, tokens: list[tuple[str, str]], env: dict[str, float]):
        self.toks = tokens
        self.i = 0
        self.env = env
        self.depth = 0

    # -- helpers --
    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        if self.i >= len(self.toks):
            raise _EvalError("unexpected end")
        t = self.toks[self.i]
        self.i += 1
        return t

    def expect(self, val: str) -> None:
        t = self.take()
        if t[1] != val:
            raise _EvalError(f"expected {val!r}, got {t[1]!r}")

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_EVAL_DEPTH:
            raise _EvalError("too deep")

    @staticmethod
    def finite(x: float) -> float:
        """Reject complex / NaN / overflowed results (only \\infty itself is infinite)."""
        if isinstance(x, complex) or not math.isfinite(x):
            raise _EvalError("not a finite real number")
        return x

    # -- grammar --
    def parse(self) -> float:
        v = self.expr()
        if self.i != len(self.toks):
            raise _EvalError(f"trailing {self.toks[self.i][1]!r}")
        return v

    def expr(self) -> float:
        self.enter()
        v = self.term()
        while True:
            t = self.peek()
            if t and t[1] in ("+", "-"):
                self.take()
                r = self.term()
                v = self.finite(v + r if t[1] == "+" else v - r)
            else:
                break
        self.depth -= 1
        return v

    def _starts_atom(self, t: tuple[str, str] | None) -> bool:
        if t is None:
            return False
        kind, val = t
        if kind in ("num", "var"):
            return True
        if kind == "cmd":
            return True
        return val in ("(", "{", "[", "\\lfloor", "\\lceil")

    def term(self) -> float:
        v = self.unary()
        while True:
            t = self.peek()
            if t and t[1] in ("*", "/"):
                self.take()
                r = self.unary()
                if t[1] == "*":
                    v = self.finite(v * r)
                else:
                    if r == 0:
                        raise _EvalError("division by zero")
                    v = self.finite(v / r)
            elif self._starts_atom(t):
                # implicit multiplication: 2\pi, 3(x+1), 2n
                v = self.finite(v * self.power())
            else:
                break
        return v

    def unary(self) -> float:
        t = self.peek()
        if t and t[1] in ("-", "+"):
            self.take()
            self.enter()
            v = self.unary()
            self.depth -= 1
            return -v if t[1] == "-" else v
        return self.power()

    def power(self) -> float:
        base = self.postfix()
        t = self.peek()
        if t and t[1] == "^":
            self.take()
            self.enter()
            exp = self.unary()
            self.depth -= 1
            try:
                if base < 0 and exp != int(exp):
                    raise _EvalError("fractional power of a negative number")
                v = math.pow(base, exp)
            except (OverflowError, ValueError, ZeroDivisionError) as e:
                raise _EvalError(str(e)) from None
            return self.finite(v)
        return base

    def postfix(self) -> float:
        v = self.atom()
        while True:
            t = self.peek()
            if t and t[1] == "!":
                self.take()
                if v != int(v) or v < 0 or v > 170:  # 171! overflows a float
                    raise _EvalError("bad factorial")
                v = float(math.factorial(int(v)))
            else:
                break
        return v

    def group(self) -> float:
        """A LaTeX argument: {expr} or a single token (\\frac12, \\sqrt2, \\sqrt x)."""
        t = self.peek()
        if t is None:
            raise _EvalError("missing argument")
        if t[1] == "{":
            self.take()
            self.enter()
            v = self.expr()
            self.depth -= 1
            self.expect("}")
            return v
        if t[0] == "num":
            self.take()
            digits = t[1]
            # \frac12 means \frac{1}{2}: a bare-digit argument is ONE digit in TeX.
            if re.fullmatch(r"\d+", digits) and len(digits) > 1:
                self.toks.insert(self.i, ("num", digits[1:]))
                return float(digits[0])
            return float(digits)
        return self.atom()

    def atom(self) -> float:
        self.enter()
        try:
            kind, val = self.take()
            if kind == "num":
                v = float(val)
                if not math.isfinite(v):
                    raise _EvalError("huge literal")
                return v
            if kind == "var":
                name = val
                t = self.peek()
                if t and t[1] == "_":  # subscripted variable: a_1, x_{10}
                    self.take()
                    sub = self.take()
                    if sub[1] == "{":
                        parts = []
                        while self.peek() and self.peek()[1] != "}":
                            parts.append(self.take()[1])
                        self.expect("}")
                        name += "_" + "".join(parts)
                    else:
                        name += "_" + sub[1]
                if name not in self.env:
                    raise _EvalError(f"unbound {name}")
                return self.env[name]
            if val in ("(", "[", "{"):
                close = {"(": ")", "[": "]", "{": "}"}[val]
                v = self.expr()
                self.expect(close)
                return v
            if val == "\\lfloor":
                v = self.expr()
                self.expect("\\rfloor")
                return float(math.floor(v))
            if val == "\\lceil":
                v = self.expr()
                self.expect("\\rceil")
                return float(math.ceil(v))
            if kind != "cmd":
                raise _EvalError(f"unexpected {val!r}")
            if val == "\\frac":
                num = self.group()
                den = self.group()
                if den == 0:
                    raise _EvalError("division by zero")
                return self.finite(num / den)
            if val == "\\sqrt":
                index = 2.0
                t = self.peek()
                if t and t[1] == "[":
                    self.take()
                    index = self.expr()
                    self.expect("]")
                x = self.group()
                if index == 0:
                    raise _EvalError("zeroth root")
                if x < 0:
                    if index == int(index) and int(index) % 2 == 1:
                        return -math.pow(-x, 1.0 / index)
                    raise _EvalError("sqrt of negative")
                return math.pow(x, 1.0 / index)
            if val == "\\binom":
                n = self.group()
                k = self.group()
                if n != int(n) or k != int(k) or n < 0 or n > 1000:
                    raise _EvalError("bad binom")
                return self.finite(float(math.comb(int(n), int(k))) if k >= 0 else 0.0)
            if val == "\\pi":
                return math.pi
            if val == "\\infty":
                return math.inf
            if val in _GREEK:
                if val not in self.env:
                    raise _EvalError(f"unbound {val}")
                return self.env[val]
            if val in _FUNCS:
                base = None
                t = self.peek()
                if val == "\\log" and t and t[1] == "_":  # \log_2 8, \log_{b} x
                    self.take()
                    base = self.group()
                t = self.peek()
                if t and t[1] == "^":  # \sin^2 x
                    self.take()
                    p = self.group()
                    arg = self.power()
                    try:
                        return self.finite(math.pow(self._apply(val, arg, base), p))
                    except (OverflowError, ValueError) as e:
                        raise _EvalError(str(e)) from None
                arg = self.power()
                return self._apply(val, arg, base)
            raise _EvalError(f"unsupported {val}")
        finally:
            self.depth -= 1

    def _apply(self, fn: str, arg: float, base: float | None) -> float:
        try:
            v = _FUNCS[fn](arg)
            if base is not None:
                v = v / math.log(base)
        except (OverflowError, ValueError, ZeroDivisionError) as e:
            raise _EvalError(str(e)) from None
        return self.finite(v)


def _variables(tokens: list[tuple[str, str]]) -> set[str]:
    """Free variable names (letters, subscripted letters and Greek letters)."""
    names: set[str] = set()
    for j, (kind, val) in enumerate(tokens):
        if kind == "var":
            name = val
            if j + 1 < len(tokens) and tokens[j + 1][1] == "_" and j + 2 < len(tokens):
                nxt = tokens[j + 2]
                if nxt[1] == "{":
                    parts = []
                    k = j + 3
                    while k < len(tokens) and tokens[k][1] != "}":
                        parts.append(tokens[k][1])
                        k += 1
                    name += "_" + "".join(parts)
                else:
                    name += "_" + nxt[1]
            names.add(name)
        elif kind == "cmd" and val in _GREEK:
            names.add(val)
    return names


def _prepare_for_eval(s: str) -> str | None:
    """Reject text the evaluator must not see (words, equations, lists)."""
    if not s or len(s) > MAX_EVAL_CHARS:
        return None
    if "=" in s or "<" in s or ">" in s or "," in s:
        return None
    # Two adjacent letters are a word ("cm", "and"), not a product: refuse rather than
    # risk "listen" == "silent".
    if re.search(r"(?<!\\)[A-Za-z]{2}", re.sub(r"\\[A-Za-z]+", " ", s)):
        return None
    return s


def evaluate_latex(s: str, env: dict[str, float] | None = None) -> float | None:
    """Value of a simple LaTeX arithmetic expression, or None if unsupported.

    Supports numbers (incl. 4.5e33), + - * / ^ !, \\cdot, \\times, \\div, parentheses /
    braces, \\frac (incl. \\frac12), \\sqrt (incl. \\sqrt[3]{x} and \\sqrt2), \\binom,
    \\pi, \\infty, floor/ceil, a few functions (\\sin, \\ln, \\log_b ...), and variables
    bound in ``env``. Never raises; never calls eval().
    """
    try:
        if not isinstance(s, str):
            return None
        s = _prepare_for_eval(s)
        if s is None:
            return None
        toks = _tokenize(s)
        if not toks or len(toks) > MAX_EVAL_CHARS:
            return None
        v = _Parser(toks, env or {}).parse()
        if isinstance(v, complex) or v != v:
            return None
        return float(v)
    except Exception:  # _EvalError, RecursionError, anything unexpected: "not a number"
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
    "8 - 8 + 7" equals "7": an answer that copies a question's arithmetic passes (README,
    "Grader and classifier").
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
    for lineno, rec in _iter_jsonl(path):
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


def _iter_jsonl(path: Path):
    """Yield (lineno, dict) for each non-blank line; ValueError 'path:lineno: ...'."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got "
                                 f"{type(rec).__name__}")
            yield lineno, rec


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


def _convert_record(rec: dict, where: str) -> dict:
    """One raw benchmark record -> {'question', 'answer', 'subdomain'}."""
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
    return {"question": question, "answer": answer, "subdomain": subdomain}


def resolve_benchmark_path(path_or_name) -> Path:
    """A known benchmark name ('gsm8k', 'aime24', ...) or a path to a .jsonl file."""
    key = str(path_or_name)
    if key in BENCHMARK_NAMES:
        return BENCHMARK_DIR / BENCHMARK_NAMES[key]
    return Path(path_or_name)


def load_benchmark(path_or_name) -> list[dict]:
    """Load a benchmark as records ``{"question", "answer", "subdomain"}``.

    ``path_or_name`` is a name from ``BENCHMARK_NAMES`` (read from ``BENCHMARK_DIR``) or a
    path to a JSON-lines file. The format is detected per record:
      * GSM8K (question, answer with ``#### x``): answer after ``####``, commas removed;
      * AIME24 / AMC23 (problem/question, answer): ``answer`` as a string (27.0 -> '27');
      * Minerva (problem, solution, type): last ``\\boxed{}`` of ``solution``; ``type``
        is used as the label only if it is one of MATH's subjects (Minerva's are MIT
        course names, so those get the classifier);
      * OlympiadBench (question, final_answer, subfield): ``final_answer[0]`` without
        its ``$``; subdomain from the classifier;
      * project suite (question, solution, answer, subdomain, level): as given.
    A record's own ``subdomain`` label is used when valid, else ``classify_subdomain``.
    Raises FileNotFoundError for a missing file and ``ValueError("path:lineno: ...")``
    for a malformed line.
    """
    path = resolve_benchmark_path(path_or_name)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    return [_convert_record(rec, f"{path}:{lineno}") for lineno, rec in _iter_jsonl(path)]


# ---- model evaluation (CLI) ----
# Greedy pass@1 of a checkpoint, routing statistics, and the results table of `make run`.
# torch and the model come in only here, so the grader above stays importable on its own.

import argparse
import os
import sys

import torch
from tqdm import tqdm

import common
import data
from model import count_params

def encode_prompt(enc, question):
    return data.encode_example(enc, dict(question=question, solution=""))[0]


def load_records(spec, split="test", seed=0):
    """'suite' (the built-in suite's split) or a JSON-lines file in any benchmark format."""
    if spec == "suite":
        return data.split_rows(seed=seed)[split]
    try:
        return load_benchmark(spec)
    except FileNotFoundError:
        raise common.UserError(f"data file not found: {spec}")
    except ValueError as e:
        raise common.UserError(str(e))


def max_vio(load):
    """MaxVio = max_e load_e / mean_e load_e - 1 over the last dim (0 = perfectly balanced)."""
    load = torch.as_tensor(load, dtype=torch.float64)
    return load.max(dim=-1).values / load.mean(dim=-1).clamp(min=1e-12) - 1


@torch.no_grad()
def evaluate(model, enc, records, device, batch_size=100, max_new_tokens=None, desc="eval"):
    """Greedy pass@1 over records {question, answer, subdomain}, overall and per subdomain.

    For an MoE model it also replays prompt + generated tokens once, teacher-forced, to measure
    routing at inference: per-layer expert load and MaxVio, mean router entropy, and the
    subdomain x expert activation table (share of a subdomain's assignments that go to each
    expert, summed over layers).
    """
    was_training = model.training
    model.eval()
    eos = data.eos_id(enc)
    max_new = max_new_tokens or model.config.block_size
    cfg = model.config
    moe = cfg.n_expert > 1
    load = torch.zeros(cfg.n_layer, cfg.n_expert, dtype=torch.float64)
    heat = {s: torch.zeros(cfg.n_expert, dtype=torch.float64) for s in SUBDOMAINS}
    ent_sum, ent_n = 0.0, 0
    # under torchrun each rank grades every world-th problem (of the length-sorted order, so the
    # ranks' batches cost about the same) and the results are gathered below
    order = sorted(range(len(records)), key=lambda i: len(records[i]["question"]))[common.rank()::common.world()]
    correct = [False] * len(records)
    preds = [None] * len(records)
    for b in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=not common.is_main()):
        ids = order[b:b + batch_size]
        prompts = [encode_prompt(enc, records[i]["question"]) for i in ids]
        outs = model.generate(prompts, max_new, temperature=0, eos_id=eos)
        for i, out in zip(ids, outs):
            text = data.decode_completion(enc, out)
            preds[i] = extract_answer(text)
            correct[i] = is_equiv(preds[i], records[i]["answer"])
        if moe:
            seqs = [p + o for p, o in zip(prompts, outs)]
            idx, _, valid = common.pad_batch(seqs, [[] for _ in seqs], device)
            model(idx)
            valid = valid.flatten()
            sub = [records[i].get("subdomain") or classify_subdomain(records[i]["question"]) for i in ids]
            row_of = torch.arange(len(ids), device=device).repeat_interleave(idx.size(1))[valid]
            for layer, ffn in enumerate(model.ffns):
                chosen = ffn.topk_idx[valid]
                counts = torch.zeros(len(ids), cfg.n_expert, device=device, dtype=torch.float64)
                counts.index_put_((row_of[:, None].expand_as(chosen), chosen),
                                  torch.ones_like(chosen, dtype=torch.float64), accumulate=True)
                counts = counts.cpu()
                load[layer] += counts.sum(0)
                for r, s in enumerate(sub):
                    heat[s] += counts[r]
                p = ffn.router_probs[valid]
                ent_sum += float(-(p * p.clamp(min=1e-12).log()).sum(-1).sum())
                ent_n += p.size(0)
    model.train(was_training)
    if common.world() > 1:
        for i, c, p in common.gather_lists([(i, correct[i], preds[i]) for i in order]):
            correct[i], preds[i] = c, p
        if moe:
            load = common.all_reduce(load.to(device)).cpu()
            heat = {s: common.all_reduce(h.to(device)).cpu() for s, h in heat.items()}
            ent = common.all_reduce(torch.tensor([ent_sum, ent_n], dtype=torch.float64, device=device))
            ent_sum, ent_n = float(ent[0]), int(ent[1])
    subs = sorted({r.get("subdomain") or classify_subdomain(r["question"]) for r in records},
                  key=lambda s: SUBDOMAINS.index(s) if s in SUBDOMAINS else 99)
    per = {}
    for s in subs:
        hits = [c for c, r in zip(correct, records) if (r.get("subdomain") or classify_subdomain(r["question"])) == s]
        per[s] = sum(hits) / len(hits)
    # correct as a string, one "0"/"1" per record in the records' order: it is small enough to
    # keep in every checkpoint's metrics, where ablate.py pairs two variants problem by problem
    res = dict(acc=sum(correct) / max(1, len(records)), per_subdomain=per, n=len(records),
               correct="".join("1" if c else "0" for c in correct), predictions=preds)
    if moe:
        vio = max_vio(load)
        res.update(load=load.tolist(), max_vio_per_layer=vio.tolist(), max_vio=float(vio.mean()),
                   routing_entropy=ent_sum / max(1, ent_n),
                   heatmap={s: (h / h.sum().clamp(min=1)).tolist() for s, h in heat.items() if h.sum() > 0})
    return res


@torch.no_grad()
def kl_to_teacher(student, teacher, enc, records, device, batch_size=64):
    """Held-out KL(T || S) per solution token, teacher-forced on gold solutions."""
    total, count = 0.0, 0
    for b in range(0, len(records), batch_size):
        pairs = [data.encode_example(enc, r) for r in records[b:b + batch_size]]
        idx, targets, _ = common.pad_batch(*zip(*pairs), device)
        mask = targets >= 0
        lt = teacher(idx)[0].float().log_softmax(-1)[mask]
        ls = student(idx)[0].float().log_softmax(-1)[mask]
        total += float((lt.exp() * (lt - ls)).sum())
        count += int(mask.sum())
    return total / max(1, count)


def print_report(rows):
    """One table, a row per checkpoint: accuracy overall and per subdomain, parameters, KL to
    the teacher, routing entropy, MaxVio and router shift (blank where it does not apply)."""
    subs = [s for s in SUBDOMAINS if any(s in m.get("per_subdomain", {}) for m in rows.values())]
    short = {"prealgebra": "prealg", "algebra": "alg", "number_theory": "numth",
             "counting_probability": "count", "geometry": "geom",
             "intermediate_algebra": "intalg", "precalculus": "precalc"}
    head = ["ckpt", "acc"] + [short.get(s, s[:7]) for s in subs] + ["active", "total", "KL(T|S)", "H(route)", "MaxVio", "RS"]
    lines = [head]

    def f(x, fmt):
        return "" if x is None else format(x, fmt)
    for name, m in rows.items():
        per = m.get("per_subdomain", {})
        lines.append([name, f(100 * m["acc"], ".1f")] + [f(100 * per[s], ".1f") if s in per else "" for s in subs] +
                     [f(m.get("active_params"), ","), f(m.get("total_params"), ","), f(m.get("kl_to_teacher"), ".4f"),
                      f(m.get("routing_entropy"), ".3f"), f(m.get("max_vio"), ".3f"), f(m.get("router_shift"), ".4f")])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    for j, r in enumerate(lines):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def paired_interval(a, b, n_boot=4000, seed=0):
    """a, b: per-seed strings of per-problem grades ("0"/"1", the same problems in the same
    order, as evaluate() returns them) of two models or two variants. The 95% percentile
    interval, in points, of mean(a) - mean(b) when the problems are resampled with replacement
    (one resample for all seeds, so each problem stays paired with itself).

    It is the noise of grading on these problems and not others, the models held fixed; a
    t-interval over training seeds is the other half. Two students that fail on the same
    problems differ by little and get a narrow interval; the same two accuracies reached on
    different problems get a wide one, which an unpaired comparison cannot tell apart."""
    import numpy as np
    if len({len(x) for x in (*a, *b)}) != 1:
        raise common.UserError("per-problem grades of different lengths: were they graded on different problems?")
    # integer sums, one division: float means of thirds put an end that is exactly 0 at -5e-17,
    # which reads as "below" (a gap that is no finding)
    diff = len(b) * np.sum([[int(c) for c in x] for x in a], 0) - len(a) * np.sum([[int(c) for c in x] for x in b], 0)
    sums = diff[np.random.default_rng(seed).integers(0, len(diff), (n_boot, len(diff)))].sum(1)
    lo, hi = np.percentile(sums / (len(a) * len(b) * len(diff)), [2.5, 97.5])
    return 100 * float(lo), 100 * float(hi)


@torch.no_grad()
def lm_loss(model, enc, records, device, batch_size=64):
    """Mean next-token cross-entropy on solution tokens (teacher-forced, gold solutions)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in range(0, len(records), batch_size):
        pairs = [data.encode_example(enc, r) for r in records[b:b + batch_size]]
        idx, targets, _ = common.pad_batch(*zip(*pairs), device)
        _, loss = model(idx, targets)
        n = int((targets >= 0).sum())
        total, count = total + loss.item() * n, count + n
    model.train(was_training)
    return total / max(1, count)


def table(run_dir):
    """The stored metrics of every checkpoint of a run, in pipeline order."""
    rows = {}
    for name in ("teacher", "stage1", "stage2", "stage3", "stage4"):
        path = os.path.join(run_dir, f"{name}.pt")
        if os.path.exists(path):
            rows[name] = common.load_checkpoint(path)["metrics"]
    if not rows:
        raise common.UserError(f"no checkpoints (teacher.pt, stage1.pt, ...) in {run_dir}")
    return rows


def main():
    parser = argparse.ArgumentParser(description="Greedy pass@1 of a PADD checkpoint, overall and per subdomain; "
                                     "given several, each later one minus the first with a paired 95% interval.")
    parser.add_argument("--ckpt", nargs="+", help="checkpoint(s) to evaluate")
    parser.add_argument("--table", metavar="DIR", help="print the stored metrics of DIR/{teacher,stage1..4}.pt as one table")
    parser.add_argument("--data", default="suite", help="'suite' (built-in test split) or a benchmark .jsonl (name or path)")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"], help="suite split")
    parser.add_argument("--data-seed", type=int, default=0,
                        help="seed of the suite's splits: the teacher's train_teacher.py --data-seed")
    parser.add_argument("--n", type=int, help="evaluate the first N problems only")
    parser.add_argument("--batch-size", type=int, default=100, help="prompts generated together")
    parser.add_argument("--json", help="write the results (with the per-problem grades, without the predictions) here")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args()
    if args.table:
        rows = table(args.table)
        print_report(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    if not args.ckpt:
        parser.error("give --ckpt PATH or --table DIR")
    device = common.pick_device(args.device)
    records = load_records(args.data, args.split, args.data_seed)
    records = records[:args.n] if args.n else records
    results = {}
    for path in args.ckpt:
        ckpt = common.load_checkpoint(path)
        enc = data.tokenizer_from_dict(ckpt["tokenizer"])
        model = common.build_model(ckpt, device)
        res = evaluate(model, enc, records, device, batch_size=args.batch_size, desc=os.path.basename(path))
        res["active_params"], res["total_params"] = count_params(model)
        results[path] = {k: v for k, v in res.items() if k != "predictions"}
    print(f"{len(records)} problems from {args.data}")
    print_report(results)
    # every later checkpoint against the first, problem by problem: is the gap more than the
    # luck of these problems? (a quick ablation's question; the answer says nothing of seeds)
    first, *rest = args.ckpt
    for path in rest:
        a, b = results[path]["correct"], results[first]["correct"]
        lo, hi = paired_interval([a], [b])
        points = 100 * (results[path]["acc"] - results[first]["acc"])
        results[path]["minus_first"] = dict(points=points, ci95=[lo, hi])
        print(f"{path} minus {first}: {points:+.1f} points, "
              f"95% over these problems [{lo:+.1f}, {hi:+.1f}]; only it right: {sum(x > y for x, y in zip(a, b))}, "
              f"only the first right: {sum(x < y for x, y in zip(a, b))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    common.run(main)
