"""R's formula language: parser, ``deparse`` and ``terms.formula``, as R 4.2 does them.

One parser for every model: fit-lm's formulas, mgcv's smooth calls ``s()``, ``te()``, ``ti()``
(kept out of the parametric part, each with its arguments) and lme4's random-effect terms
``(lhs | g)`` / ``(lhs || g)`` (kept out of the fixed part, expanded as lme4's ``findbars``).

- ``parse(text)``: an R expression as R's grammar (gram.y) reads it: names, `back-quoted`
  names, numbers, strings, TRUE/FALSE/NA, calls with positional and named arguments
  (``pkg::f(...)`` too), and the operators with R's precedence and associativity. The tree is
  R's: an operator is a call (``a + b`` is ``+``(a, b)) and parentheses are a ``(`` call.
- ``deparse(node)``: R's ``deparse``: it gives term labels and so design column names
  (``exp(edu/10)``, ``poly(age, 2, raw = TRUE)``, ``a * b``; numbers as R prints them).
- ``terms(formula)``: R's ``terms.formula`` (src/library/stats/src/model.c): the variables in
  order of appearance (response first), terms as sets of variables expanded by ``+ - * / : ^
  %in%``, duplicates removed, ordered by degree then appearance, ``0``/``1``/``-1`` for the
  intercept, ``offset()`` variables set aside, and the factor coding of every variable in every
  term (1: contrasts, 2: indicator columns, R's rule for terms whose margins are absent).
- ``model_formula(text)``: the whole formula read once: response, fixed (parametric) terms,
  smooth calls, random-effect terms.

Every problem is a ``UsageError`` naming the formula, in GreyArray's words.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from greyarray.errors import UsageError

# --- the tree --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Name:
    """A symbol (``age``, ``my var`` when back-quoted, ``splines::ns`` as a call's head)."""

    id: str


@dataclass(frozen=True)
class Num:
    """A numeric constant; ``integer`` for R's ``2L``."""

    value: float
    integer: bool = False

    def __eq__(self, other) -> bool:  # R's MatchVar compares numbers as reals
        return isinstance(other, Num) and self.value == other.value

    def __hash__(self) -> int:
        return hash(self.value)


@dataclass(frozen=True)
class Str:
    value: str


@dataclass(frozen=True)
class Const:
    """TRUE, FALSE, NA or NULL (``value`` True, False, "NA", None)."""

    value: object


@dataclass(frozen=True)
class Call:
    """A call, operators included: ``fn`` is ``+``, ``(``, ``log``, ``splines::ns``..."""

    fn: str
    args: tuple = ()
    names: tuple = ()  # one per argument: its name, or None

    def arg(self, i: int):
        return self.args[i]

    @property
    def positional(self) -> list:
        return [a for a, n in zip(self.args, self.names, strict=True) if n is None]

    @property
    def named(self) -> dict:
        return {n: a for a, n in zip(self.args, self.names, strict=True) if n is not None}


Node = Name | Num | Str | Const | Call


def call(fn: str, *args) -> Call:
    return Call(fn, tuple(args), (None,) * len(args))


# --- tokens ----------------------------------------------------------------------------------

_RESERVED = {
    "if", "else", "repeat", "while", "function", "for", "next", "break", "in",
    "TRUE", "FALSE", "NULL", "NA", "Inf", "NaN", "NA_integer_", "NA_real_", "NA_character_",
}  # fmt: skip
_OPERATORS = sorted(
    [
        "::", ":::", "<<-", "->>", "<-", "->", "<=", ">=", "==", "!=", "&&", "||", "**",
        "+", "-", "*", "/", "^", "~", "?", "!", "=", "<", ">", "&", "|", ":", "$", "@",
        "(", ")", "[[", "[", "]", ",", "{", "}", ";", "\\",
    ],
    key=len,
    reverse=True,
)  # fmt: skip
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+L?|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[Li]?")
_HEX_ESCAPE = re.compile(r"x([0-9a-fA-F]{1,2})|u\{?([0-9a-fA-F]{1,4})\}?|U\{?([0-9a-fA-F]{1,8})\}?")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "a": "\a", "b": "\b", "f": "\f",
            "v": "\v", "\\": "\\", '"': '"', "'": "'", "`": "`", " ": " "}  # fmt: skip


@dataclass(frozen=True)
class Token:
    kind: str  # "num", "str", "name", "op", "end"
    text: str
    value: object = None
    at: int = 0


def _is_name_start(char: str) -> bool:
    return char.isalpha() or char == "."


def _is_name_char(char: str) -> bool:
    return char.isalnum() or char in "._"


def _quoted(text: str, start: int, quote: str, what: str) -> tuple[str, int]:
    """The string between quotes at ``start`` with R's escapes; and the index after it."""
    out, i = [], start + 1
    while i < len(text):
        char = text[i]
        if char == quote:
            return "".join(out), i + 1
        if char == "\\":
            i += 1
            if i >= len(text):
                break
            esc = text[i]
            if esc in _ESCAPES:
                out.append(_ESCAPES[esc])
                i += 1
                continue
            hexa = _HEX_ESCAPE.match(text, i)
            if hexa:
                out.append(chr(int(next(g for g in hexa.groups() if g), 16)))
                i = hexa.end()
                continue
            raise SyntaxError(f"unknown escape '\\{esc}' in a {what}")
        out.append(char)
        i += 1
    raise SyntaxError(f"a {what} is not closed ({quote} missing)")


def tokens(text: str) -> list[Token]:
    out, i = [], 0
    while i < len(text):
        char = text[i]
        if char.isspace():
            i += 1
            continue
        if char == "#":
            raise SyntaxError("'#' starts a comment in R: the rest of the formula would be ignored")
        number = _NUMBER.match(text, i)
        if number and (char.isdigit() or (char == "." and i + 1 < len(text) and
                                           text[i + 1].isdigit())):  # fmt: skip
            word = number.group()
            if word.endswith("i"):
                raise SyntaxError(f"complex number {word!r}")
            integer = word.endswith("L")
            digits = word[:-1] if integer else word
            value = float(int(digits, 16)) if digits.lower().startswith("0x") else float(digits)
            out.append(Token("num", word, (value, integer), i))
            i = number.end()
            continue
        if _is_name_start(char):
            j = i + 1
            while j < len(text) and _is_name_char(text[j]):
                j += 1
            out.append(Token("name", text[i:j], text[i:j], i))
            i = j
            continue
        if char in "\"'":
            value, j = _quoted(text, i, char, "string")
            out.append(Token("str", text[i:j], value, i))
            i = j
            continue
        if char == "`":
            value, j = _quoted(text, i, "`", "back-quoted name")
            if not value:
                raise SyntaxError("an empty back-quoted name ``")
            out.append(Token("qname", text[i:j], value, i))
            i = j
            continue
        if char == "%":
            j = text.find("%", i + 1)
            if j < 0:
                raise SyntaxError("'%' without its closing '%' (as in %in%)")
            out.append(Token("op", text[i : j + 1], None, i))
            i = j + 1
            continue
        for op in _OPERATORS:
            if text.startswith(op, i):
                out.append(Token("op", "^" if op == "**" else op, None, i))
                i += len(op)
                break
        else:
            raise SyntaxError(f"unexpected character {char!r}")
    out.append(Token("end", "", None, len(text)))
    return out


# --- the parser (R's precedence, from gram.y; higher binds tighter) --------------------------

_BINARY = {  # operator: (binding power, right associative)
    "?": (1, False),
    "=": (2, True),
    "<-": (3, True),
    "<<-": (3, True),
    "->": (4, False),
    "->>": (4, False),
    "~": (10, False),
    "|": (20, False),
    "||": (20, False),
    "&": (30, False),
    "&&": (30, False),
    # unary ! is 40
    "<": (50, False),
    ">": (50, False),
    "<=": (50, False),
    ">=": (50, False),
    "==": (50, False),
    "!=": (50, False),
    "+": (60, False),
    "-": (60, False),
    "*": (70, False),
    "/": (70, False),
    # %any%: 80
    ":": (90, False),
    # unary + -: 100
    "^": (110, True),
    "$": (120, False),
    "@": (120, False),
}
_COMPARISONS = {"<", ">", "<=", ">=", "==", "!="}
_UNARY = {"-": 100, "+": 100, "!": 40, "~": 10, "?": 1}
_NOT_IN_FORMULAS = {
    "=": "'=' outside a function's arguments",
    "<-": "assignment '<-'",
    "<<-": "assignment '<<-'",
    "->": "assignment '->'",
    "->>": "assignment '->>'",
    "?": "'?'",
    "$": "'$' (extraction)",
    "@": "'@' (slot extraction)",
}


class _Parser:
    def __init__(self, text: str):
        self.tokens = tokens(text)
        self.i = 0

    @property
    def next(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def expect(self, text: str) -> None:
        if self.next.kind != "op" or self.next.text != text:
            found = repr(self.next.text) if self.next.kind != "end" else "the end"
            raise SyntaxError(f"expected {text!r} but found {found}")
        self.take()

    def binding(self, token: Token) -> int:
        if token.kind != "op":
            return -1
        if token.text.startswith("%"):
            return 80
        if token.text in ("(", "[", "[["):
            return 140
        if token.text == "::" or token.text == ":::":
            return 130
        return _BINARY.get(token.text, (-1, False))[0]

    def expression(self, rbp: int = 0) -> Node:
        left = self.prefix()
        while self.binding(self.next) > rbp:
            left = self.infix(left)
        return left

    def prefix(self) -> Node:
        token = self.take()
        if token.kind == "num":
            value, integer = token.value
            return Num(value, integer)
        if token.kind == "str":
            return Str(token.value)
        if token.kind == "qname":
            return Name(token.value)
        if token.kind == "name":
            constants = {"TRUE": True, "FALSE": False, "NA": "NA", "NULL": None}
            if token.text in constants:
                return Const(constants[token.text])
            if token.text in ("Inf", "NaN"):
                return Num(math.inf if token.text == "Inf" else math.nan)
            if token.text in ("NA_integer_", "NA_real_", "NA_character_"):
                return Const("NA")
            if token.text in _RESERVED:
                raise SyntaxError(f"R's keyword {token.text!r} has no place in a formula")
            return Name(token.text)
        if token.kind == "op":
            if token.text == "(":
                inner = self.expression()
                self.expect(")")
                return call("(", inner)
            if token.text in _UNARY:
                if token.text == "?":
                    raise SyntaxError("'?' has no place in a formula")
                operand = self.expression(_UNARY[token.text])
                return call(token.text, operand)
            if token.text == "{":
                raise SyntaxError("braces '{' have no place in a formula")
        found = repr(token.text) if token.kind != "end" else "the end"
        raise SyntaxError(f"unexpected {found}")

    def infix(self, left: Node) -> Node:
        token = self.take()
        op = token.text
        if op == "(":
            if not isinstance(left, Name):
                raise SyntaxError(f"only a function can be called ('{deparse(left)}(' found)")
            return self.arguments(left.id)
        if op in ("[", "[["):
            raise SyntaxError(f"indexing '{op}' is not supported in formulas")
        if op in ("::", ":::"):
            name = self.take()
            if not isinstance(left, Name) or name.kind not in ("name", "qname"):
                raise SyntaxError(f"'{op}' needs a package and a name (e.g. splines::ns)")
            return Name(f"{left.id}{op}{name.value}")
        if op in _NOT_IN_FORMULAS:
            raise SyntaxError(f"{_NOT_IN_FORMULAS[op]} has no place in a formula")
        if op.startswith("%"):
            return call(op, left, self.expression(80))
        power, right_assoc = _BINARY[op]
        right = self.expression(power - 1 if right_assoc else power)
        if op in _COMPARISONS and self.next.kind == "op" and self.next.text in _COMPARISONS:
            raise SyntaxError(f"comparisons cannot be chained ('{self.next.text}' after '{op}')")
        return call(op, left, right)

    def arguments(self, fn: str) -> Call:
        args, names = [], []
        if self.next.kind == "op" and self.next.text == ")":
            self.take()
            return Call(fn, (), ())
        while True:
            name = None
            ahead = self.tokens[self.i + 1] if self.i + 1 < len(self.tokens) else None
            if (
                self.next.kind in ("name", "qname", "str")
                and ahead is not None
                and ahead.kind == "op"
                and ahead.text == "="
            ):
                name = self.take().value
                self.take()
            if self.next.kind == "op" and self.next.text in (",", ")"):
                raise SyntaxError(f"an empty argument in {fn}()")
            args.append(self.expression(2))  # no '=' assignment inside arguments
            names.append(name)
            if self.next.kind == "op" and self.next.text == ",":
                self.take()
                continue
            self.expect(")")
            return Call(fn, tuple(args), tuple(names))


def parse(text: str) -> Node:
    """An R expression as R's parser reads it (raises SyntaxError with R's reason)."""
    parser = _Parser(text)
    node = parser.expression()
    if parser.next.kind != "end":
        if parser.next.kind == "op" and parser.next.text == ";":
            raise SyntaxError("';' ends an R statement: a formula is one expression")
        raise SyntaxError(f"unexpected {parser.next.text!r} after a complete expression")
    return node


# --- deparse ---------------------------------------------------------------------------------

_SPACED = {"+", "-", "*", "~", "|", "||", "&", "&&", "<", ">", "<=", ">=", "==", "!=", "<-"}
_TIGHT = {"/", "^", ":", "%%", "%/%", "$", "@"}
_SYNTACTIC = re.compile(r"^((([^\W\d_]|[.](?![\d]))[\w.]*)|[.])$")


def is_syntactic(name: str) -> bool:
    """R's ``make.names(name) == name`` (ignoring the locale's letters): no back-quotes needed."""
    return bool(_SYNTACTIC.match(name)) and name not in _RESERVED


def _name(name: str) -> str:
    if "::" in name:
        package, _, rest = name.rpartition("::")
        package = package.rstrip(":")
        sep = name[len(package) : len(name) - len(rest)]
        return _name(package) + sep + _name(rest)
    if is_syntactic(name):
        return name
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def _string(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif ord(char) < 32:
            out.append(f"\\{ord(char):03o}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def r_number(value: float, digits: int = 15) -> str:
    """A double as R prints it (``formatReal`` with 15 significant digits, ``scipen = 0``):
    ``2.5``, ``1e+05``, ``123456``, ``1e-04``, ``0.001``, ``0.333333333333333``."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    neg = value < 0
    x = abs(value)
    # fewest significant digits (<= digits) that represent x to ``digits`` significant digits
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    kpower = int(exponent)
    sig = mantissa.replace(".", "").rstrip("0") or "0"
    nsig = len(sig)
    if float(mantissa) >= 10:  # rounding carried into a new digit
        kpower += 1
    rgt = max(0, nsig - kpower - 1)
    left = kpower + 1 if kpower >= 0 else 1
    fixed_width = neg + left + (rgt + 1 if rgt else 0)
    sci_width = neg + (nsig + 1 if nsig > 1 else nsig) + (5 if abs(kpower) >= 100 else 4)
    if fixed_width <= sci_width:
        return f"{value:.{rgt}f}"
    digits_text = sig[0] + ("." + sig[1:] if nsig > 1 else "")
    return f"{'-' if neg else ''}{digits_text}e{'-' if kpower < 0 else '+'}{abs(kpower):02d}"


def deparse(node: Node) -> str:
    """R's ``deparse`` of an expression on one line (what term labels and column names use)."""
    if isinstance(node, Name):
        return _name(node.id)
    if isinstance(node, Num):
        if node.integer:
            return f"{int(node.value)}L"
        return r_number(node.value)
    if isinstance(node, Str):
        return _string(node.value)
    if isinstance(node, Const):
        return {True: "TRUE", False: "FALSE", "NA": "NA", None: "NULL"}[node.value]
    fn, args = node.fn, node.args
    if fn == "(" and len(args) == 1:
        return f"({deparse(args[0])})"
    if (
        len(args) == 2
        and not any(node.names)
        and (fn in _SPACED or fn in _TIGHT or fn.startswith("%"))
    ):
        sep = "" if fn in _TIGHT else " "
        return f"{deparse(args[0])}{sep}{fn}{sep}{deparse(args[1])}"
    if len(args) == 1 and fn in ("-", "+", "!", "~") and not node.names[0]:
        return f"{fn}{deparse(args[0])}"
    parts = [
        deparse(a) if n is None else f"{_name(n)} = {deparse(a)}"
        for a, n in zip(args, node.names, strict=True)
    ]
    return f"{_name(fn)}({', '.join(parts)})"


def function_name(node: Node) -> str | None:
    """A call's function without its package (``splines::ns`` -> ``ns``); None for others."""
    if not isinstance(node, Call):
        return None
    return node.fn.rpartition("::")[2].lstrip(":") if "::" in node.fn else node.fn


def all_names(node: Node) -> list[Name]:
    """The symbols an expression reads (R's ``all.vars``), in order, without repeats."""
    found: list[Name] = []

    def walk(n: Node) -> None:
        if isinstance(n, Name):
            if n not in found:
                found.append(n)
        elif isinstance(n, Call):
            for a in n.args:
                walk(a)

    walk(node)
    return found


# --- terms.formula ---------------------------------------------------------------------------

_FORMULA_OPS = {"+", "-", "*", "/", ":", "^", "%in%", "(", "~"}


@dataclass
class Terms:
    """R's ``terms`` object of a formula.

    ``variables``: the expressions in order of appearance (the response first when there is
    one); ``terms``: each term a bit set over ``variables`` (bit i = variables[i]), ordered by
    degree then appearance, offsets left out; ``labels``: R's term labels; ``codes[t][i]``: how
    variable i enters term t (1 contrasts, 2 indicator columns), R's ``factors`` attribute."""

    variables: list
    names: list[str]  # deparsed variables (the model frame's column names)
    terms: list[int]
    labels: list[str]
    intercept: bool
    response: bool
    offsets: list[int]  # indices of offset() variables
    codes: list[dict[int, int]] = field(default_factory=list)

    def members(self, term: int) -> list[int]:
        """Indices of the variables of a term, in variable order."""
        return [i for i in range(len(self.variables)) if term >> i & 1]


class _Encoder:
    """EncodeVars and its helpers, bit for bit (terms are Python ints)."""

    def __init__(self, variables: list):
        self.variables = variables
        self.intercept = True
        self.parity = True

    def index(self, node: Node) -> int:
        for i, v in enumerate(self.variables):
            if v == node:
                return i
        self.variables.append(node)
        return len(self.variables) - 1

    @staticmethod
    def trim(terms: list[int]) -> list[int]:
        out: list[int] = []
        for t in terms:
            if t and t not in out:
                out.append(t)
        return out

    def encode(self, node: Node) -> list[int]:
        if isinstance(node, Num) and node.value in (0.0, 1.0):
            one = node.value == 1.0
            self.intercept = self.parity if one else not self.parity
            return []
        if isinstance(node, Name):
            if node.id == ".":
                raise SyntaxError("'.' (every other column) is not supported: name the columns")
            return [1 << self.index(node)]
        if isinstance(node, Call):
            fn, args = node.fn, node.args
            if fn == "~":
                return self.encode(args[-1])
            if fn == "(" and len(args) == 1:
                return self.encode(args[0])
            if fn == "+" and len(args) in (1, 2):
                if len(args) == 1:
                    return self.encode(args[0])
                left = self.encode(args[0])
                return self.trim(left + self.encode(args[1]))
            if fn == "-" and len(args) in (1, 2):
                left = self.encode(args[0]) if len(args) == 2 else []
                self.parity = not self.parity
                right = self.encode(args[-1])
                self.parity = not self.parity
                for r in right:
                    left = [t for t in left if t != r]
                return left
            if fn in (":", "*", "/", "%in%", "^") and len(args) == 2:
                left = self.encode(args[0])
                if fn == "^":
                    power = args[1]
                    if (
                        not isinstance(power, Num)
                        or power.value != int(power.value)
                        or (power.value <= 1)
                    ):
                        raise SyntaxError(f"invalid power in '{deparse(node)}' (an integer > 1)")
                    right = left
                    for _ in range(int(power.value) - 1):
                        right = self.trim([lt | rt for lt in left for rt in right])
                    return right
                right = self.encode(args[1])
                if fn == ":":
                    return self.trim([lt | rt for lt in left for rt in right])
                if fn == "*":
                    return self.trim(left + right + [lt | rt for lt in left for rt in right])
                if fn == "%in%":
                    union = 0
                    for rt in right:
                        union |= rt
                    return self.trim([lt | union for lt in left])
                union = 0  # "/": left + every right term nested in all of left
                for lt in left:
                    union |= lt
                return self.trim(left + [rt | union for rt in right])
            return [1 << self.index(node)]
        if isinstance(node, Num):
            raise SyntaxError(f"a number ({deparse(node)}) is not a term (only 0 and 1 are)")
        raise SyntaxError(f"'{deparse(node)}' is not a term")


def _extract(node: Node, encoder: _Encoder) -> None:
    """ExtractVars: install the variables in order of appearance."""
    if isinstance(node, Num) and node.value in (0.0, 1.0):
        return
    if isinstance(node, Name):
        if node.id != ".":
            encoder.index(node)
        return
    if isinstance(node, Call):
        if node.fn in ("+", "-", ":", "*", "/", "%in%", "(") and len(node.args) <= 2:
            for a in node.args:
                _extract(a, encoder)
            return
        if node.fn == "^" and len(node.args) == 2:
            _extract(node.args[0], encoder)
            return
        encoder.index(node)


def terms(response: Node | None, rhs: Node, keep_order: bool = False) -> Terms:
    """R's ``terms.formula(response ~ rhs)``."""
    variables: list = []
    encoder = _Encoder(variables)
    if response is not None:
        encoder.index(response)
    _extract(rhs, encoder)
    encoded = encoder.encode(rhs)
    names = [deparse(v) for v in variables]
    offsets = [
        i for i in range(1 if response is not None else 0, len(variables))
        if names[i].startswith("offset(")
    ]  # fmt: skip
    offset_bits = sum(1 << i for i in offsets)
    encoded = [t for t in encoded if not t & offset_bits]
    degree = [0 if keep_order else bin(t).count("1") for t in encoded]
    order = sorted(range(len(encoded)), key=lambda k: (degree[k], k))
    ordered = [encoded[k] for k in order]
    codes = []
    for k, term in enumerate(ordered):
        code = {}
        for i in range(len(variables)):
            if term >> i & 1:
                rest = term & ~(1 << i)
                margin = rest == 0 or any(rest & ~ordered[j] == 0 for j in range(k))
                code[i] = 1 if margin else 2
        codes.append(code)
    labels = [":".join(names[i] for i in range(len(variables)) if t >> i & 1) for t in ordered]
    return Terms(
        variables, names, ordered, labels, encoder.intercept, response is not None, offsets, codes
    )


# --- lme4's bars and mgcv's smooths ----------------------------------------------------------

SMOOTHS = ("s", "te", "ti", "t2")


# The operators that make a formula's terms. A random-effect term is a '|' reached through
# them and parentheses only: inside any other call (``I(a < 12 | a > 18)``) '|' is R's "or"
# for lm and gam. lme4's own ``findbars`` walks every call (``ModelFormula.hidden_bars``).
FORMULA_OPERATORS = ("+", "-", "*", "/", ":", "^", "%in%", "(")


def is_bar(node: Node) -> bool:
    return isinstance(node, Call) and node.fn in ("|", "||") and len(node.args) == 2


def nobars(node: Node) -> Node | None:
    """The expression without its random-effect terms (None if nothing is left): lme4's
    ``nobars_`` on the terms, which never looks inside other calls (``I()`` protects its
    argument)."""
    if is_bar(node):
        return None
    if not (isinstance(node, Call) and node.fn in FORMULA_OPERATORS):
        return node
    args = [nobars(a) for a in node.args]
    if all(a is not None for a in args):
        return Call(node.fn, tuple(args), node.names)
    kept = [a for a in args if a is not None]
    if node.fn == "(" or len(args) != 2 or not kept:
        return None
    return kept[0]  # lme4: what is left of a binary operator is the other side


def _expand_double_verts(node: Node, lme4: bool = False) -> Node:
    """lme4's ``expandDoubleVerts``: ``(x || g)`` -> ``(1 | g) + (0 + x | g)`` (among the
    formula's terms, or with ``lme4`` inside any call, as lme4 does)."""
    if not isinstance(node, Call) or not (lme4 or node.fn in (*FORMULA_OPERATORS, "||")):
        return node
    if node.fn == "||" and len(node.args) == 2:
        lhs, group = node.args
        inner = terms(None, lhs)
        parts = [f"0+{label}" for label in inner.labels]
        if inner.intercept:
            parts.insert(0, "1")
        text = ")+(".join(f"{p}|{deparse(group)}" for p in parts)
        return parse(f"({text})")
    return Call(node.fn, tuple(_expand_double_verts(a, lme4) for a in node.args), node.names)


def _slash_terms(node: Node):
    if not (isinstance(node, Call) and "/" in _all_fns(node)):
        return node
    if node.fn != "/":
        raise SyntaxError(f"cannot read the grouping factor '{deparse(node)}'")
    return [_slash_terms(node.args[0]), _slash_terms(node.args[1])]


def _all_fns(node: Node) -> set[str]:
    if not isinstance(node, Call):
        return set()
    out = {node.fn}
    for a in node.args:
        out |= _all_fns(a)
    return out


def _make_interaction(x):
    if not isinstance(x, list) or len(x) < 2:
        return x
    first = _make_interaction(x[0])
    head = first[0] if isinstance(first, list) else first
    return [call(":", x[1], head), first]


def _flatten(x) -> list:
    if isinstance(x, list):
        return [leaf for item in x for leaf in _flatten(item)]
    return [x]


def findbars(rhs: Node, lme4: bool = False) -> list[Call]:
    """The random-effect terms after ``||`` and ``/`` are expanded, in lme4's order
    (``(1 | a/b)`` -> ``(1 | b:a)``, ``(1 | a)``): those of the formula's terms, or with
    ``lme4`` every '|' that lme4 1.1-31's ``findbars`` finds, inside any call too."""

    def find(node: Node) -> list[Call]:
        if not isinstance(node, Call):
            return []
        if node.fn == "(":
            return find(node.args[0])
        if is_bar(node) and node.fn == "|":
            return [node]
        if not lme4 and node.fn not in FORMULA_OPERATORS:
            return []
        if len(node.args) == 1:
            return find(node.args[0])
        return [b for a in node.args[:2] for b in find(a)]

    bars = []
    for bar in find(_expand_double_verts(rhs, lme4)):
        trms = _slash_terms(bar.args[1])
        if isinstance(trms, list):
            bars += [call("|", bar.args[0], g) for g in _flatten(_make_interaction(trms))]
        else:
            bars.append(bar)
    return bars


def subbars(node: Node) -> Node:
    """lme4's ``subbars``: every '|' and '||' made a '+' (the model frame's variables)."""
    if not isinstance(node, Call):
        return node
    fn = "+" if is_bar(node) else node.fn
    return Call(fn, tuple(subbars(a) for a in node.args), node.names)


@dataclass(frozen=True)
class SmoothCall:
    """One mgcv smooth term as written: ``s(age, k = 4, by = osex)``."""

    node: Call
    kind: str  # s, te, ti, t2
    label: str  # its term label (deparsed)

    @property
    def variables(self) -> list[Node]:
        """The smoothed covariates: the positional arguments."""
        return self.node.positional

    @property
    def arguments(self) -> dict[str, Node]:
        """Named arguments (k, fx, bs, by, ...) as expressions."""
        return self.node.named


@dataclass
class ModelFormula:
    """A formula read once for every model: lm, gam and lmm take what they need."""

    text: str
    response: Node | None
    rhs: Node
    fixed: Terms  # the parametric / fixed-effects terms (no smooths, no bars)
    smooths: list[SmoothCall]
    bars: list[Call]  # lme4's random-effect terms, expanded
    hidden_bars: list[Call] = field(default_factory=list)  # '|' in a call: lme4's bars too

    @property
    def response_name(self) -> str:
        """The response as a scalar name (a back-quoted response without its quotes). A
        transformed response (``log(y) ~ age``) is refused: the models read a scalar as
        stored, and fitting it untransformed would be another model."""
        assert self.response is not None
        if isinstance(self.response, Name):
            return self.response.id
        written = deparse(self.response)
        raise UsageError(
            f"formula {self.text!r}: the response {written!r} is an expression; GreyArray "
            "fits a stored scalar as it is: store the transformed values as a scalar of their "
            f"own (or fit {written} in R), and name that scalar on the left of '~'"
        )

    @property
    def rhs_terms(self) -> list[str]:
        """Every right-hand-side term in R's order (parametric and smooth): mgcv's term index."""
        return self.all_terms.labels

    all_terms: Terms = None  # type: ignore[assignment]


def _problem(formula: str, reason: str) -> UsageError:
    return UsageError(f"formula {formula!r}: {reason}")


def model_formula(text: str) -> ModelFormula:
    """Read ``response ~ rhs`` (R's syntax) once: fixed terms, smooth calls, random terms."""
    if "__" in text:  # nothing of R needs it; kept out of names reaching Python's namespace
        raise _problem(text, "names with a double underscore ('__') are not allowed")
    if "~" not in text:
        raise UsageError(f"formula {text!r} needs exactly one '~' (e.g. 'thickness ~ age + sex')")
    try:
        node = parse(text)
    except SyntaxError as err:
        raise _problem(text, f"R cannot parse it: {err}") from None
    if not (isinstance(node, Call) and node.fn == "~" and len(node.args) == 2):
        raise UsageError(
            f"formula {text!r} needs exactly one '~' with a response (e.g. 'thickness ~ age + sex')"
        )
    response, rhs = node.args
    if _has_fn(rhs, "~") or _has_fn(response, "~"):
        raise UsageError(f"formula {text!r} needs exactly one '~' (e.g. 'thickness ~ age + sex')")
    try:
        bars = findbars(rhs)
        written = {deparse(b) for b in bars}
        hidden = [b for b in findbars(rhs, lme4=True) if deparse(b) not in written]
        fixed_rhs = nobars(rhs)
        if fixed_rhs is None:
            fixed_rhs = Num(1.0)
        whole = terms(response, fixed_rhs)
        # mgcv's specials: calls of the bare names s, te, ti, t2 (mgcv::s is not one)
        smooth_vars = {
            i for i, v in enumerate(whole.variables) if isinstance(v, Call) and v.fn in SMOOTHS
        }
        smooths, parametric = [], []
        for term, label in zip(whole.terms, whole.labels, strict=True):
            inside = [i for i in smooth_vars if term >> i & 1]
            if not inside:
                parametric.append(label)
            elif bin(term).count("1") > 1:
                raise SyntaxError(
                    f"'{label}': a smooth in an interaction (mgcv: use by= or te()/ti())"
                )
            else:
                v = whole.variables[inside[0]]
                smooths.append(SmoothCall(v, function_name(v), label))
        fixed = whole if not smooths else _mgcv_parametric(whole, parametric, response)
    except SyntaxError as err:
        raise _problem(text, str(err)) from None
    out = ModelFormula(text, response, rhs, fixed, smooths, bars, hidden)
    out.all_terms = whole
    return out


def _has_fn(node: Node, fn: str) -> bool:
    return isinstance(node, Call) and (node.fn == fn or any(_has_fn(a, fn) for a in node.args))


def _mgcv_parametric(whole: Terms, labels: list[str], response: Node | None) -> Terms:
    """mgcv's ``interpret.gam``: the parametric formula is written again from the parametric
    term labels (and offsets), then read by ``terms`` (variable order can change)."""
    parts = labels + [whole.names[i] for i in whole.offsets]
    text = " + ".join(parts)
    if not whole.intercept:
        text += "-1"
    elif not parts:
        text = "1"
    return terms(response, parse(text))
