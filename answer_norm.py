"""Canonical string form of a final answer (``normalize_answer``), for grader.py.

It removes what does not change an answer's value and unifies spellings, so that the
grader compares like with like:
  * wrappers: ``$..$``, ``\\(..\\)``, ``\\[..\\]``, a whole ``\\boxed{..}`` (the last box),
    \\left / \\right, spacing commands, ``\\text{..}`` and friends, ``x \\in`` before a set;
  * units: words or ``\\text{km}`` / ``\\mathrm{~erg/s}`` after ANY expression (not only a
    number), degrees, %, dollars;
  * spellings: \\dfrac / \\tfrac / \\frac12 / ``{a \\over b}``, \\dbinom / ``{n \\choose k}``,
    \\sqrt2, thousands commas, ``4.5 x 10^{33}`` and ``4.5×10³³`` (scientific notation is
    then just arithmetic), ``sin x`` / ``np.arcsin`` (function names become commands),
    ``pmatrix`` / ``bmatrix`` as ``\\mat{a&b\\\\c&d}``, "(B)" / "\\text{(B)}" as "B";
  * a simple left-hand side: ``x =``, ``f(x) =``, ``(k,n) =``; ``2n-1 = k`` the same way.
Hard size limits keep it linear on adversarial text; it never raises. No torch import.
"""

from __future__ import annotations

import re

MAX_ANSWER_CHARS = 2000  # longer answers are only compared as whitespace-free strings

# ----------------------------------------------------------------------------
# Braces and boxes (shared with extraction)
# ----------------------------------------------------------------------------

BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])")


def match_brace(text: str, open_pos: int) -> int:
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


def box_content_at(text: str, m: re.Match) -> str | None:
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
        j = match_brace(text, i)
        if j < 0:
            return None  # truncated generation: no answer rather than a partial one
        return text[i + 1:j].strip()
    if m.end() < len(text) and text[m.end()] in " \t":
        # "\boxed 5$" (TeX's brace-less form): up to '$' or end of line.
        rest = re.split(r"[\$\n]", text[i:], maxsplit=1)[0]
        return rest.strip().rstrip(".").strip() or None
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\boxed x`` / ``\\fbox{...}`` in ``text``."""
    if not isinstance(text, str):
        return None
    try:
        matches = list(BOX_RE.finditer(text))
        if not matches:
            return None
        return box_content_at(text, matches[-1])
    except Exception:
        return None


# ----------------------------------------------------------------------------
# Normalization
# ----------------------------------------------------------------------------

_TEXT_CMD_RE = re.compile(
    r"\\(?:text|textbf|textit|textrm|texttt|mathrm|mathbf|mathit|mathsf|mathtt|mbox|rm|"
    r"operatorname|mathnormal|boldsymbol|bm)\s*\{([^{}]*)\}"
)
_UNIT_CMD_RE = re.compile(r"\\(?:text|mathrm|mbox|textrm|rm|operatorname|mathit)\s*\{")
# One text-wrapped unit at the very end: "\text{ km}", "\mathrm{~m}^2", "\text{s}^{-1}".
_UNIT_TAIL_RE = re.compile(
    r"\\(?:text|mathrm|mbox|textrm|rm|operatorname|mathit)\s*\{\s*~?\s*([A-Za-z][A-Za-z .\-/~]{0,30}?)"
    r"\s*\}\s*(?:\^\s*(?:\{\s*-?\d\s*\}|-?\d))?\s*\.?\s*"
)
_LHS_RE = re.compile(
    r"^\s*(?:[A-Za-z](?:_\{[^{}=]{0,20}\}|_[A-Za-z0-9])?|[A-Za-z]\([A-Za-z]\)"
    r"|\(\s*[A-Za-z](?:\s*,\s*[A-Za-z]){1,5}\s*\))\s*=(?!=)"
)
_RHS_VAR_RE = re.compile(r"=\s*[A-Za-z](?:_\{[^{}=]{0,20}\}|_[A-Za-z0-9])?\s*$")
_IN_PREFIX_RE = re.compile(r"^\s*[A-Za-z](?:_\{?[A-Za-z0-9]{1,5}\}?)?\s*\\in(?![A-Za-z])\s*")
_UNIT_WORD_RE = re.compile(r"([A-Za-z]+)\.?(?:\^\{?-?\d+\}?)?")
# Words that follow a value but are mathematics, not units ("2 pi" is not "2").
NOT_UNITS = {"pi", "sqrt", "ln", "log", "sin", "cos", "tan", "exp", "i", "e", "and", "or",
             "if", "for", "where", "when", "otherwise", "is", "even", "odd",
             # multipliers and operators: "6 million" and "6 squared" are not 6
             "thousand", "million", "billion", "trillion", "hundred", "dozen", "squared", "cubed",
             "times", "half", "minus", "plus", "negative", "less", "more"}
# Units that may follow a non-number expression without a \text wrapper ("\frac{41}{12} km").
KNOWN_UNITS = {
    "km", "cm", "mm", "nm", "m", "kg", "g", "mg", "s", "ms", "min", "h", "hr", "hrs",
    "hours", "hour", "minutes", "minute", "seconds", "second", "days", "day", "years",
    "year", "erg", "ergs", "J", "eV", "keV", "MeV", "GeV", "K", "Hz", "W", "N", "Pa", "atm",
    "mol", "L", "mL", "units", "unit", "degrees", "degree", "meters", "metres", "meter",
    "feet", "ft", "inches", "in", "miles", "mph", "dollars", "cents", "pc", "kpc", "Mpc",
    "AU", "ly", "sq", "square", "cubic", "kmh", "rad", "radians", "sr", "arcsec", "Angstrom",
    "A", "V", "C", "T", "G", "Gauss", "yr",
}
_NUMBER_PREFIX_RE = re.compile(
    r"([-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.?\d*|\.\d+)(?:/\d+)?)"
)
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_MC_RE = re.compile(r"\(?([A-Ea-e])\)?")
_MATRIX_RE = re.compile(r"\\begin\{([pbB]?matrix|smallmatrix)\}(.{0,1500}?)\\end\{\1\}")
_ARRAY_RE = re.compile(r"\\left\s*[(\[]\s*\\begin\{array\}\{[lcr|]*\}(.{0,1500}?)\\end\{array\}"
                       r"\s*\\right\s*[)\]]")
_BARE_FUNC_RE = re.compile(
    r"(?<![\\A-Za-z])(arcsinh|arccosh|arctanh|arcsin|arccos|arctan|sinh|cosh|tanh|coth|sech|"
    r"csch|sin|cos|tan|cot|sec|csc|log|ln|exp|sqrt)(?![A-Za-z])"
)
_SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺", "0123456789-+")
_SUP_RUN_RE = re.compile(r"[⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺]+")
_OVER_RE = re.compile(r"\{([^{}]*)\\(over|choose)(?![A-Za-z])([^{}]*)\}")


def _strip_units(s: str) -> str:
    """'5 cm' -> '5', '12 square units' -> '12', '3 m/s^2' -> '3'; other text untouched.

    Only strips when a plain number is followed by whitespace-separated words (so '5x'
    keeps its variable). Word-by-word checks, no nested regex quantifiers.
    """
    m = _NUMBER_PREFIX_RE.match(s)
    if not m or m.end() == len(s) or not s[m.end()].isspace():
        return _strip_known_unit_words(s)
    tail = s[m.end():].strip()
    words = [w for w in re.split(r"[\s/]+", tail) if w]
    for w in words:
        u = _UNIT_WORD_RE.fullmatch(w)
        # Single letters after a space are variables ("2 n"), not units.
        if not u or len(u.group(1)) < 2 or u.group(1).lower() in NOT_UNITS:
            return s
    return m.group(1) if words else s


def _strip_known_unit_words(s: str) -> str:
    r"""'\frac{41}{12} km' -> '\frac{41}{12}': known unit words after any expression."""
    words = s.split()
    if len(words) < 2:
        return s
    k = len(words)
    while k > 1:
        w = words[k - 1]
        parts = [p for p in re.split(r"[/*.]", re.sub(r"\^\{?-?\d+\}?", "", w)) if p]
        if parts and all(p in KNOWN_UNITS and len(p) >= 2 for p in parts):
            k -= 1
        else:
            break
    return " ".join(words[:k]) if k < len(words) else s


def _strip_unit_tail(s: str) -> str:
    r"""Remove text-wrapped units after any expression: '4.5\times10^{33} \text{ erg/s}'."""
    for _ in range(4):
        starts = [m.start() for m in _UNIT_CMD_RE.finditer(s)]
        if not starts:
            return s
        j = starts[-1]
        m = _UNIT_TAIL_RE.fullmatch(s, j)
        if not m:
            return s
        words = [w for w in re.split(r"[\s/.\-~]+", m.group(1)) if w]
        if not words or any(w.lower() in NOT_UNITS for w in words):
            return s
        head = s[:j].rstrip()
        head = re.sub(r"(?:\\[,;:! ]|~|\\cdot|/|\s)+$", "", head)
        if not head or head.endswith(("=", "(", ",")):
            return s
        s = head
    return s


def _matrix_to_mat(m: re.Match) -> str:
    body = m.group(m.lastindex)
    return "\\mat{" + body.strip() + "}"


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
                j = match_brace(part, 0)
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


def strip_lhs(s: str) -> str:
    """'x=5' -> '5', '(k,n)=(2,4)' -> '(2,4)', '2n-1=k' -> '2n-1' (one equation only)."""
    if s.count("=") == 1 and "<" not in s and ">" not in s:
        m = _LHS_RE.match(s)
        if m:
            return s[m.end():].strip()
        m = _RHS_VAR_RE.search(s)
        if m and m.start() > 0:
            return s[:m.start()].strip()
    return s


def _unwrap_math_delims(s: str) -> str:
    r"""'\(x\)', '\[x\]', '$x$' -> 'x' (repeatedly, outermost first)."""
    for _ in range(5):
        t = s.strip()
        if t.startswith("\\(") and t.endswith("\\)") or t.startswith("\\[") and t.endswith("\\]"):
            s = t[2:-2]
        else:
            return t
    return s.strip()


def normalize_answer(s, keep_lhs: bool = False) -> str:
    """Canonical string form of an answer, for string comparison. Never raises.

    ``keep_lhs``: keep a left-hand side ("y=1-x" stays an equation, to compare with one)."""
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
        return _normalize_str(s, keep_lhs)
    except Exception:
        try:
            return "".join(str(s).split())[:MAX_ANSWER_CHARS]
        except Exception:
            return ""


def _normalize_str(s: str, keep_lhs: bool = False) -> str:
    s = s.replace("\x00", "").strip()
    # A boxed answer handed in whole (of two boxes, the last one counts).
    if BOX_RE.search(s):
        inner = last_boxed(s)
        if inner is not None:
            s = inner
    s = s.replace("\n", " ").replace("\t", " ").replace("\u2212", "-")  # unicode minus
    s = s.replace("×", "\\times ").replace("·", "\\cdot ").replace("∞", "\\infty ")
    s = _SUP_RUN_RE.sub(lambda m: "^{" + m.group().translate(_SUPERSCRIPTS) + "}", s)
    s = s.replace("\\$", "").replace("$", "")
    s = _unwrap_math_delims(s)
    s = _MATRIX_RE.sub(_matrix_to_mat, s)
    # Spacing commands: \! \, \; \: \  ~ \quad (not the second backslash of a row's \\)
    s = re.sub(r"(?<!\\)\\[!,;: ]", " ", s)
    s = re.sub(r"\\q?quad(?![A-Za-z])", " ", s)
    s = s.replace("~", " ")
    s = _ARRAY_RE.sub(_matrix_to_mat, s)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?:l|r)?(?![A-Za-z])", "", s)
    s = re.sub(r"\\(?:displaystyle|mathstrut)(?![A-Za-z])", "", s)
    s = s.replace("\\lbrace", "\\{").replace("\\rbrace", "\\}")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\dbinom", "\\binom").replace("\\tbinom", "\\binom")
    s = s.replace("{,}", ",")  # LaTeX thousands separator 1{,}000
    # {a \over b} -> \frac{a}{b}; {n \choose k} -> \binom{n}{k} (innermost first)
    for _ in range(10):
        new = _OVER_RE.sub(lambda m: ("\\frac" if m.group(2) == "over" else "\\binom")
                           + "{" + m.group(1).strip() + "}{" + m.group(3).strip() + "}", s)
        if new == s:
            break
        s = new
    m = re.fullmatch(r"([^{}\\]*)\\over(?![A-Za-z])([^{}\\]*)", s)
    if m:
        s = "\\frac{" + m.group(1).strip() + "}{" + m.group(2).strip() + "}"
    # Degrees: ^\circ, ^{\circ}, °, \degree
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ", "", s)
    s = s.replace("\\circ", "").replace("°", "").replace("\\degree", "")
    # Percent: "50\%" == "50%" == "50".
    s = s.replace("\\%", "").replace("%", "")
    s = _strip_unit_tail(s)
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
    s = re.sub(r"(?<![A-Za-z])np\.", "", s)  # numpy spellings: np.arcsin(10/13)
    s = _BARE_FUNC_RE.sub(r"\\\1", s)
    # Scientific notation written with a letter x: "4.5 x 10^{33}".
    s = re.sub(r"(\d)\s*[xX]\s*(?=10\s*\^)", r"\1\\times ", s)
    s = _IN_PREFIX_RE.sub("", s)  # "x \in [1,2]" is the interval
    # Leading "x =", "k=", "a_1 =", "f(x) =", "(k,n) =" (one equation only).
    if not keep_lhs:
        s = strip_lhs(s)
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
        s = canonical_number(s)
    # Words (after \text unwrapping) compare case-insensitively: "Yes" == "yes".
    if re.fullmatch(r"[A-Za-z]{2,}", s):
        s = s.lower()
    return s


def canonical_number(s: str) -> str:
    neg = s.startswith("-")
    s = s.lstrip("+-")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    s = s.lstrip("0") or "0"
    if s.startswith("."):
        s = "0" + s
    return ("-" + s) if neg and s != "0" else s


def normalize_unit(unit) -> str:
    """A benchmark's unit field as the whitespace-free text normalization leaves after a value
    ('$cm^2$' -> 'cm^2', '^{\\circ}' -> '' since degrees are dropped anyway)."""
    if not isinstance(unit, str) or len(unit) > 100:
        return ""
    u = unit.replace("$", "").replace("~", " ")
    u = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°", "", u)
    u = _TEXT_CMD_RE.sub(lambda m: m.group(1), u)
    return "".join(u.split())
