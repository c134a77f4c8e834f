"""Value of a simple LaTeX arithmetic expression, without ``eval``.

``evaluate_latex("\\frac{3}{4} + 2^{-2}")`` is 1.0. It covers what final answers are
made of: numbers, + - * / ^ !, implicit multiplication, \\frac, \\sqrt, \\binom, \\pi,
\\infty, floor / ceil, a few functions (\\sin, \\ln, \\log_b ...) and variables bound in
an ``env``. Anything else (words, equations, lists) is None.

The grader (grader.py) uses it to compare numeric answers ("0.75" vs "\\frac34") and
expressions in the same variables at sample points. It is a small recursive-descent
parser with hard size and depth limits, so a model output such as ``10^{10^{10}}`` can't
make a reward hang, and it never raises. No torch import: it stays cheap to import.
"""

from __future__ import annotations

import math
import re

# Hard limits that keep evaluation O(small) on adversarial model outputs.
MAX_EVAL_CHARS = 400  # longer expressions are not evaluated numerically
MAX_EVAL_DEPTH = 60  # parser nesting limit (stays far below Python's recursion limit)


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
