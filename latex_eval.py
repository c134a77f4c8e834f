"""Value of a simple LaTeX arithmetic expression, without ``eval``.

``evaluate_exact("\\frac{3}{4} + 2^{-2}")`` is ``Fraction(1)``; ``evaluate_latex`` is the same
as a float. It covers what final answers are made of: numbers (``4.5e33`` too), + - * / ^ !,
implicit multiplication (``2RC`` is 2*R*C), \\frac, \\sqrt, \\binom, \\pi, \\infty, floor /
ceil, functions (\\sin, \\ln, \\log_b, \\exp, \\sinh, \\cosh ...) and variables bound in an
``env``. Anything else (words, equations, lists) is None.

Why exact: the grader compares integers and fractions exactly (1450001 is not 1450000), so
arithmetic on integers and decimal literals stays in ``fractions.Fraction`` while it is
rational and small; anything irrational (\\pi, \\sqrt2, \\sin) becomes a float.
The grader (grader.py) uses it for numeric answers ("0.75" vs "\\frac34") and for
expressions in the same variables at sample points. It is a small recursive-descent parser
with hard size, depth, exponent and factorial limits instead of a timer, so ``10^{10^{10}}``
or ``1000000!`` returns None at once, and it never raises. No torch import.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

# Hard limits that keep evaluation O(small) on adversarial model outputs.
MAX_EVAL_CHARS = 400  # longer expressions are not evaluated numerically
MAX_EVAL_DEPTH = 60  # parser nesting limit (stays far below Python's recursion limit)
MAX_EXACT_BITS = 4096  # a Fraction whose numerator or denominator grows past this is a float
MAX_FACTORIAL = 170  # 171! overflows a float


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
    "\\sinh": math.sinh, "\\cosh": math.cosh, "\\tanh": math.tanh,
    "\\coth": lambda x: 1 / math.tanh(x), "\\sech": lambda x: 1 / math.cosh(x),
    "\\csch": lambda x: 1 / math.sinh(x), "\\arcsinh": math.asinh,
    "\\arccosh": math.acosh, "\\arctanh": math.atanh,
}
# Function names written without a backslash ("sin x", "np.arcsin(..)") become commands.
_BARE_FUNC_RE = re.compile(
    r"(?<![\\A-Za-z])(arcsinh|arccosh|arctanh|arcsin|arccos|arctan|sinh|cosh|tanh|coth|sech|"
    r"csch|sin|cos|tan|cot|sec|csc|log|ln|exp|sqrt|pi)(?![A-Za-z])"
)
_CMD_ALIASES = {"\\dfrac": "\\frac", "\\tfrac": "\\frac", "\\dbinom": "\\binom",
                "\\tbinom": "\\binom", "\\operatorname": None}


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
            elif val in _CMD_ALIASES and _CMD_ALIASES[val]:
                val = _CMD_ALIASES[val]
            elif val in ("\\lfloor", "\\rfloor", "\\lceil", "\\rceil"):
                kind = "op"
        tokens.append((kind, val))
    return tokens


def _small(v: Fraction) -> bool:
    return (v.numerator.bit_length() <= MAX_EXACT_BITS
            and v.denominator.bit_length() <= MAX_EXACT_BITS)


def _fix(v):
    """A result as Fraction (exact, small) or finite float; anything else is an error."""
    if isinstance(v, Fraction):
        if _small(v):
            return v
        try:
            v = float(v)
        except OverflowError:
            raise _EvalError("overflow") from None
    if isinstance(v, complex) or not math.isfinite(v):
        raise _EvalError("not a finite real number")
    return v


def _is_int(v) -> bool:
    return (v.denominator == 1) if isinstance(v, Fraction) else float(v).is_integer()


def _exact_root(v: Fraction, n: int):
    """The exact n-th root of a non-negative Fraction, or None if it is irrational."""
    out = []
    for part in (v.numerator, v.denominator):
        r = math.isqrt(part) if n == 2 else round(float(part) ** (1.0 / n))
        hit = next((c for c in (r - 1, r, r + 1) if c >= 0 and c ** n == part), None)
        if hit is None:
            return None
        out.append(hit)
    return Fraction(out[0], out[1])


def _power(base, exp):
    """base ^ exp: exact for a rational base and a small integer exponent, else a float."""
    if isinstance(base, Fraction) and isinstance(exp, Fraction):
        if exp.denominator == 1:
            e = exp.numerator
            bits = max(base.numerator.bit_length(), base.denominator.bit_length())
            if bits * abs(e) <= MAX_EXACT_BITS:
                if base == 0 and e < 0:
                    raise _EvalError("division by zero")
                return base ** e
        elif exp.denominator in (2, 3) and base >= 0 and _small(base):
            try:
                r = _exact_root(base, exp.denominator)
            except OverflowError:
                r = None
            if r is not None:
                return _power(r, Fraction(exp.numerator))
    b, x = float(base), float(exp)
    if b < 0 and not x.is_integer():
        raise _EvalError("fractional power of a negative number")
    try:
        return math.pow(b, x)
    except (OverflowError, ValueError, ZeroDivisionError) as e:
        raise _EvalError(str(e)) from None


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

    Values are Fractions while exact and small, floats otherwise; every operation checks
    for overflow and non-finite results.
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

    # -- grammar --
    def parse(self):
        v = self.expr()
        if self.i != len(self.toks):
            raise _EvalError(f"trailing {self.toks[self.i][1]!r}")
        return v

    def expr(self):
        self.enter()
        v = self.term()
        while True:
            t = self.peek()
            if t and t[1] in ("+", "-"):
                self.take()
                r = self.term()
                if isinstance(v, float) and math.isinf(v) or isinstance(r, float) and math.isinf(r):
                    raise _EvalError("arithmetic with infinity")
                v = _fix(v + r if t[1] == "+" else v - r)
            else:
                break
        self.depth -= 1
        return v

    def _starts_atom(self, t: tuple[str, str] | None) -> bool:
        if t is None:
            return False
        kind, val = t
        if kind in ("num", "var", "cmd"):
            return True
        return val in ("(", "{", "[", "\\lfloor", "\\lceil")

    def term(self):
        v = self.unary()
        while True:
            t = self.peek()
            if t and t[1] in ("*", "/"):
                self.take()
                r = self.unary()
                v = self._mul(v, r) if t[1] == "*" else self._div(v, r)
            elif self._starts_atom(t):
                # implicit multiplication: 2\pi, 3(x+1), 2n, RC
                v = self._mul(v, self.power())
            else:
                break
        return v

    @staticmethod
    def _mul(a, b):
        if isinstance(a, Fraction) and isinstance(b, Fraction):
            return _fix(a * b)
        return _fix(float(a) * float(b))

    @staticmethod
    def _div(a, b):
        if b == 0:
            raise _EvalError("division by zero")
        if isinstance(a, Fraction) and isinstance(b, Fraction):
            return _fix(a / b)
        return _fix(float(a) / float(b))

    def unary(self):
        t = self.peek()
        if t and t[1] in ("-", "+"):
            self.take()
            self.enter()
            v = self.unary()
            self.depth -= 1
            return -v if t[1] == "-" else v
        return self.power()

    def power(self):
        base = self.postfix()
        t = self.peek()
        if t and t[1] == "^":
            self.take()
            self.enter()
            exp = self.unary()
            self.depth -= 1
            return _fix(_power(base, exp))
        return base

    def postfix(self):
        v = self.atom()
        while True:
            t = self.peek()
            if t and t[1] == "!":
                self.take()
                if not _is_int(v) or v < 0 or v > MAX_FACTORIAL:
                    raise _EvalError("bad factorial")
                v = Fraction(math.factorial(int(v)))
            else:
                break
        return v

    def group(self):
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
                return Fraction(int(digits[0]))
            return self._literal(digits)
        return self.atom()

    @staticmethod
    def _literal(val: str):
        m = re.search(r"[eE]([-+]?\d+)$", val)
        if len(val) <= 60 and (not m or abs(int(m.group(1))) <= 400):
            return _fix(Fraction(val))
        v = float(val)
        if not math.isfinite(v):
            raise _EvalError("huge literal")
        return v

    def atom(self):
        self.enter()
        try:
            kind, val = self.take()
            if kind == "num":
                return self._literal(val)
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
            if val in ("\\lfloor", "\\lceil"):
                v = self.expr()
                self.expect("\\rfloor" if val == "\\lfloor" else "\\rceil")
                r = math.floor(v) if val == "\\lfloor" else math.ceil(v)
                return Fraction(r) if isinstance(v, Fraction) else float(r)
            if kind != "cmd":
                raise _EvalError(f"unexpected {val!r}")
            if val == "\\frac":
                num = self.group()
                return self._div(num, self.group())
            if val == "\\sqrt":
                return self._sqrt()
            if val == "\\binom":
                return self._binom(self.group(), self.group())
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
                    return _fix(_power(self._apply(val, arg, base), p))
                arg = self.power()
                return self._apply(val, arg, base)
            raise _EvalError(f"unsupported {val}")
        finally:
            self.depth -= 1

    def _sqrt(self):
        index = Fraction(2)
        t = self.peek()
        if t and t[1] == "[":
            self.take()
            index = self.expr()
            self.expect("]")
        x = self.group()
        if index == 0:
            raise _EvalError("zeroth root")
        odd = _is_int(index) and int(index) % 2 == 1
        if x < 0:
            if not odd:
                raise _EvalError("sqrt of negative")
            return -self._root(-x, index)
        return self._root(x, index)

    @staticmethod
    def _root(x, index):
        if isinstance(x, Fraction) and isinstance(index, Fraction) and index.denominator == 1 \
                and 2 <= index.numerator <= 64:
            try:
                r = _exact_root(x, index.numerator)
            except OverflowError:
                r = None
            if r is not None:
                return r
        try:
            return _fix(math.pow(float(x), 1.0 / float(index)))
        except (OverflowError, ValueError) as e:
            raise _EvalError(str(e)) from None

    @staticmethod
    def _binom(n, k):
        """C(n, k): exact for integers; the falling-factorial form for a real n."""
        if not _is_int(k) or k < 0 or k > 1000:
            raise _EvalError("bad binom")
        k = int(k)
        if _is_int(n) and isinstance(n, Fraction):
            if n < 0 or n > 10000:
                raise _EvalError("bad binom")
            return _fix(Fraction(math.comb(int(n), k)))
        if k > 50:
            raise _EvalError("bad binom")
        v = 1.0
        for j in range(k):
            v = v * (float(n) - j) / (j + 1)
        return _fix(v)

    @staticmethod
    def _apply(fn: str, arg, base) -> float:
        try:
            v = _FUNCS[fn](float(arg))
            if base is not None:
                v = v / math.log(float(base))
        except (OverflowError, ValueError, ZeroDivisionError) as e:
            raise _EvalError(str(e)) from None
        return _fix(v)


def _variables(tokens: list[tuple[str, str]]) -> set[str]:
    """Free variable names (letters, subscripted letters and Greek letters)."""
    names: set[str] = set()
    for j, (kind, val) in enumerate(tokens):
        if kind == "var":
            if j > 0 and tokens[j - 1][1] == "_":
                continue  # the subscript of a_n is part of the name, not a variable
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
    """Reject text the evaluator must not see (words, equations, lists).

    Letters next to each other are a product ("2RC" is 2*R*C) inside an expression, but a
    bare word ("listen") or a run of more than three letters ("5 apples") is text: refused
    rather than risk "listen" == "silent".
    """
    if not s or len(s) > MAX_EVAL_CHARS:
        return None
    if "=" in s or "<" in s or ">" in s or "," in s:
        return None
    s = _BARE_FUNC_RE.sub(r"\\\1", s)
    letters = re.sub(r"\\[A-Za-z]+", " ", s)
    if re.fullmatch(r"\s*[A-Za-z]{2,}\s*", letters) or re.search(r"[A-Za-z]{4}", letters):
        return None
    return s


def evaluate_exact(s: str, env: dict[str, float] | None = None):
    """Value of a simple LaTeX expression: a Fraction while exact, else a float; None if
    unsupported. Never raises; never calls eval()."""
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
        if isinstance(v, float) and v != v:
            return None
        return v
    except Exception:  # _EvalError, RecursionError, anything unexpected: "not a number"
        return None


def evaluate_latex(s: str, env: dict[str, float] | None = None) -> float | None:
    """``evaluate_exact`` as a float (None if unsupported). Never raises."""
    v = evaluate_exact(s, env)
    try:
        return None if v is None else float(v)
    except Exception:
        return None
