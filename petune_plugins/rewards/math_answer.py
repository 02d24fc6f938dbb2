"""``math_answer``: 1 when a completion's final answer equals the row's reference answer.

The reference is a data field (``field``, default ``answer``): a number or a string. A string
holding a worked solution that ends in the marker (GSM8K's ``... #### 72``) is read after its
last marker. A row without one (missing, null, empty) is not scored (None).

Which part of the completion is the answer (``extract``):

* ``auto`` — with math-verify, its own extraction over the whole completion (``\\boxed{}`` first,
  then "the final answer is ...", then the last expression); without it, the last ``\\boxed{}``,
  else what follows the last ``marker``, else the last number;
* ``boxed`` — the content of the last ``\\boxed{...}`` (none: ``wrong``);
* ``after_marker`` — the first line after the last ``marker`` (e.g. ``####`` or ``Answer:``);
* ``last_number`` — the last number in the completion.

How answers are compared (``compare``): with the math-verify package (``pip install
'petune[math]'``) when it is installed — LaTeX and symbolic answers, ``\\frac{3}{4}`` = ``0.75``,
sets, intervals — else as plain numbers: ``1,000``, ``1 000``, ``1000.0``, ``1000.``, ``$1000``,
``\\boxed{1000}`` all equal 1000, ``3/4`` equals ``0.75``, a trailing ``%`` is dropped (``50%``
equals 50); a reference that is not a number is then compared as text. A completion that
cannot be read scores ``wrong``: scoring never fails on what a model wrote.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import signal
import threading
import time
from contextlib import contextmanager
from fractions import Fraction
from typing import Literal

from pydantic import Field, model_validator

from petune.api import Options, Reward

#: whether math-verify can be imported (checked without importing it: it pulls in sympy, which
#: would slow every petune command down); tests turn it off to check the plain path
MATH_VERIFY = importlib.util.find_spec("math_verify") is not None
#: seconds math-verify may spend on one completion (sympy can take for ever on e.g. 2^{2^{2^{100}}})
TIME_LIMIT_S = 5.0


class MathAnswerOptions(Options):
    field: str = Field("answer", min_length=1, description="the data field holding each row's reference answer "
                                                           "(a number or a string); rows without one are not scored")
    extract: Literal["auto", "boxed", "after_marker", "last_number"] = Field(
        "auto", description="where the completion's answer is: auto (math-verify's extraction, or: the last "
                            "\\boxed{}, else after the marker, else the last number), boxed (the last \\boxed{}), "
                            "after_marker (the line after the last marker), last_number")
    marker: str = Field("####", min_length=1, description="the text before a final answer, for extract = "
                                                          "'after_marker' and 'auto' (e.g. '####' or 'Answer:'); "
                                                          "a reference holding it is also read after it")
    compare: Literal["auto", "math_verify", "numbers"] = Field(
        "auto", description="auto: math-verify when installed (LaTeX, symbolic), else numbers; math_verify: "
                            "require it; numbers: plain numbers only (1,000 = 1000.0 = \\boxed{1000}; 3/4 = 0.75)")
    correct: float = Field(1.0, description="the reward of a completion whose answer equals the reference")
    wrong: float = Field(0.0, description="the reward of any other completion (wrong, missing or unreadable answer)")

    @model_validator(mode="after")
    def _math_verify_installed(self):
        if self.compare == "math_verify" and not MATH_VERIFY:
            raise ValueError("compare = 'math_verify' needs the math-verify package, which is not installed: "
                             "pip install 'petune[math]' (or compare = 'numbers')")
        return self


# -- plain numbers (no math-verify) ------------------------------------------------------------
# The fallback when math-verify is not installed: small on purpose, it reads numbers as people
# write them and nothing symbolic (math-verify is the tool for LaTeX and algebra).
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?![\w])|(?<![\w.])[-+]?\.\d+")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:[, \u00a0\u202f]\d{3})+(?:\.\d*)?")
_NOISE = re.compile(r"\\[,;:! ]|\{,\}|\\text\{[^{}]*\}|\\mathrm\{[^{}]*\}|\\left|\\right|\\?\$|\\?%")
_FRAC = re.compile(r"^\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j].strip()
        start = text.rfind("\\boxed", 0, start)
    return None


def after_marker(text: str, marker: str) -> str | None:
    """The first non-empty line after the last ``marker``, or None."""
    at = text.rfind(marker)
    if at == -1:
        return None
    line = next((line.strip() for line in text[at + len(marker):].splitlines() if line.strip()), "")
    return line or None


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text.replace("\u2212", "-"))
    return found[-1] if found else None


def to_number(text: str) -> Fraction | None:
    """``text`` as an exact number when the whole of it is one (see the module doc), else None."""
    s = last_boxed(text) or text
    s = _NOISE.sub("", s.replace("\u2212", "-")).strip().lstrip("=").strip().rstrip(".").strip()
    frac = _FRAC.match(s)
    if frac:
        s = f"{frac.group(1).strip()}/{frac.group(2).strip()}"
    if _THOUSANDS.fullmatch(s):
        s = re.sub(r"[, \u00a0\u202f]", "", s)
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def number_in(text: str) -> Fraction | None:
    """The number ``text`` is, else the first number in it ("1,000 dollars" is 1000)."""
    value = to_number(text)
    if value is None and (first := _NUMBER.search(text.replace("\u2212", "-"))):
        value = to_number(first.group())
    return value


def _as_text(text: str) -> str:
    return " ".join(_NOISE.sub("", text).split()).casefold()


# -- math-verify ---------------------------------------------------------------------------------
class _TimedOut(BaseException):
    """Raised by the time limit; a BaseException so that math-verify's own handlers let it through."""


@contextmanager
def _time_limit(seconds: float):
    """Interrupt the block after ``seconds`` with :class:`_TimedOut` — on the main thread only
    (signals are delivered there; math-verify's own limit raises ValueError elsewhere), and
    without touching a timer someone else set first (a trainer's, pytest-timeout's): if that
    one fires sooner, the block runs without a limit of ours; if later, it is set again after."""
    usable = (threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
              and signal.getsignal(signal.SIGALRM) is not None)
    pending, interval = signal.getitimer(signal.ITIMER_REAL) if usable else (0.0, 0.0)
    if not usable or (pending and pending <= seconds):
        yield
        return

    def expire(signum, frame):
        raise _TimedOut

    previous = signal.signal(signal.SIGALRM, expire)
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if pending:
            signal.setitimer(signal.ITIMER_REAL, max(pending - (time.monotonic() - started), 1e-3), interval)


def _mv_parse(text: str, whole_completion: bool = False) -> list:
    from math_verify import parse

    # math-verify warns once that its timeouts are off: they are, in favour of _time_limit
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    text = text.replace("\\$", "")  # an escaped dollar sign hides the number from math-verify
    if whole_completion:
        return parse(text, parsing_timeout=None)  # timeouts: ours (_time_limit), which works on any thread
    # a bare snippet: LaTeX reads best inside $...$, plain text ("1,000 dollars", "1 000") as it is
    tries = (f"${text}$", text) if "\\" in text else (text, f"${text}$")
    return parse(tries[0], parsing_timeout=None) or parse(tries[1], parsing_timeout=None)


def _mv_equal(reference: str, answer: str, whole_completion: bool) -> bool | None:
    """Whether math-verify finds the answer equal to the reference; None if the reference means
    nothing to it (e.g. a word), to be compared as text instead."""
    from math_verify import verify

    gold = _mv_parse(reference)
    if not gold:
        return None
    found = _mv_parse(answer, whole_completion)
    return bool(found) and verify(gold, found, timeout_seconds=None)


# -- the reward ----------------------------------------------------------------------------------
class MathAnswer(Reward):
    name = "math_answer"
    description = "math: `correct` when the completion's final answer equals the row's reference (math-verify or numbers)"
    Options = MathAnswerOptions

    def fields(self, options: MathAnswerOptions) -> list[str]:
        return [options.field]

    def score(self, prompts, completions, fields, options: MathAnswerOptions) -> list[float | None]:
        references = fields.get(options.field) or [None] * len(completions)
        use_mv = options.compare == "math_verify" or (options.compare == "auto" and MATH_VERIFY)
        scores = []
        for completion, reference in zip(completions, references):
            reference = self.reference_text(reference, options)
            if reference is None:
                scores.append(None)
                continue
            try:
                right = self.matches(reference, completion if isinstance(completion, str) else "", options, use_mv)
            except (Exception, _TimedOut):  # noqa: BLE001 - one unreadable completion must not stop a run
                right = False
            scores.append(options.correct if right else options.wrong)
        return scores

    @staticmethod
    def reference_text(reference, options: MathAnswerOptions) -> str | None:
        if reference is None or isinstance(reference, (list, dict)):
            return None
        if isinstance(reference, float) and reference.is_integer():
            reference = int(reference)  # 72.0 in a JSON file is the answer 72
        text = str(reference)
        if options.marker in text:
            text = after_marker(text, options.marker) or ""
        return text.strip() or None

    @staticmethod
    def extract(completion: str, options: MathAnswerOptions) -> str | None:
        """The completion's answer as a snippet, for every way but math-verify's ``auto``."""
        if options.extract == "boxed":
            return last_boxed(completion)
        if options.extract == "after_marker":
            return after_marker(completion, options.marker)
        if to_number(completion) is not None:  # the whole completion is a number ("1 000", "\\frac{3}{4}")
            return completion
        if options.extract == "last_number":
            return last_number(completion)
        return last_boxed(completion) or after_marker(completion, options.marker) or last_number(completion)

    def matches(self, reference: str, completion: str, options: MathAnswerOptions, use_mv: bool) -> bool:
        whole = use_mv and options.extract == "auto"
        answer = completion if whole else self.extract(completion, options)
        if answer is None:
            return False
        if use_mv:
            with _time_limit(TIME_LIMIT_S):
                equal = _mv_equal(reference, answer, whole)
            if equal is not None:
                return equal
            if whole:
                answer = self.extract(completion, options) or ""
        expected = to_number(reference)
        if expected is None:  # not a number: the answer's text, as written
            return _as_text(last_boxed(answer) or answer) == _as_text(reference)
        return number_in(answer) == expected
