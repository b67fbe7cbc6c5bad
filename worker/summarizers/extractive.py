"""Offline extractive summarizer: keeps the most telling sentences, with no model and no network.

It is the fallback when no model is configured or reachable, so it has to be deterministic and
cheap, and it must keep what an agent needs later: names, ids, amounts, dates and open tasks.
"""

from __future__ import annotations

import re
import time
import unicodedata
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import accumulate, compress
from typing import TypeVar

import structlog

from worker.domain import SummaryText, Turn
from worker.summarizers.base import input_chars, transcript_chars
from worker.summarizers.cpupool import CpuPool

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

NO_CONTENT = "(no content)"
_ELLIPSIS = "…"
# One sentence may take at most this much, so a pasted blob cannot crowd out every other fact.
_MAX_SENTENCE = 400
# Facts that already made it into a summary were salient once; without a bonus they would be
# pushed out by any fresh sentence and the rolling summary would forget its oldest context.
_PREVIOUS_BONUS = 1.5
_REPEAT_BONUS = 0.5

# Tool output is verbose and mostly restated by the assistant, but its numbers are often the
# only record of an amount or id, so only the "soft" part of the score is weighted by role.
_ROLE_WEIGHT = {"user": 1.0, "human": 1.0, "assistant": 0.9, "ai": 0.9, "model": 0.9}
_ROLE_WEIGHT |= {"system": 0.6, "developer": 0.6, "tool": 0.5, "function": 0.5}


def _wordset(words: str) -> frozenset[str]:
    return frozenset(words.split())


_ABBREVIATIONS = _wordset(
    "e.g. i.e. etc. vs. cf. dr. mr. mrs. ms. prof. st. jr. sr. inc. ltd. co. no. approx. "
    "fig. a.m. p.m. u.s. u.k."
)
_FILLER = _wordset(
    "ok okay k kk thanks thank thx ty you so much very a lot for the that this is it sure "
    "hello hi hey great cool got yes yeah yep no nope alright right bye goodbye welcome np "
    "perfect awesome nice sounds good will do me help oh ah hmm see understood noted fine "
    "content all anything else s re ll m ve d"
)


def _not_after_abbreviation() -> str:
    """Lookbehinds for a sentence boundary: the word that ends there is not "e.g." or "Dr."
    (in any case) nor an initial ("J."), so no sentence ends there. A word starts after a
    space or a CJK full stop (which always ends a sentence), or at the start of the text."""
    widths: dict[int, list[str]] = {2: [r"[A-Z]\."]}  # an initial: a capital only
    for word in sorted(_ABBREVIATIONS):
        letters = (f"[{c}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)
        widths.setdefault(len(word), []).append("".join(letters))
    # A lookbehind must have one width: one for each.
    return "".join(
        rf"(?<!(?<![^\s。！？])(?:{'|'.join(words)}))" for _, words in sorted(widths.items())
    )


# A sentence ends at . ! ? … (with any closing quotes or brackets) before a space, unless an
# abbreviation ends there; or at a CJK full stop, space or not. Group 1 is the sentence's end.
# It opens with one plain character set: the regex engine then skips to those characters in C
# instead of trying every position, which made finding them three times faster than an
# alternation of two groups did. A run of . ! ? … is only tried from its first character:
# every later start in it ends where the first does, so fails alike, and trying them all took
# time growing with the square of the run (a tool's progress bar of 16,000 dots: 5 s).
_BOUNDARY = re.compile(
    r"([.!?…。！？](?:(?<=[.!?…])(?<![.!?…]{2})[.!?…]*[\"'”’)\]]*(?=\s)"
    + _not_after_abbreviation()
    + r"|(?<=[。！？])[。！？]*))\s*"
)
# Lines as str.splitlines() cuts them; then leading space and a bullet ("- ", "* ", "2) ").
_LINE = re.compile(r"[^\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]+")
_LEAD = re.compile(r"\s*(?:(?:[-*•·‣▪–]|\d{1,3}[.)])\s+)?")
_ROLE_PREFIX = re.compile(r"^([^\W\d][\w-]{0,31}):\s+")
_TOOL_ROLES = frozenset({"tool", "function"})
_JSON_PUNCT = re.compile(r'[{}\[\]"]')
_PRONOUN = ("I'", "I’")  # "I'm" is capitalised but names nobody
_WORD = re.compile(r"[^\W\d_][\w'’-]*")
# Feature patterns. Each opens with a plain character or character set, and checks the word
# boundary just after it (`(?<!\w.)`: the character before the match is not part of a word):
# the regex engine then skips to candidate characters in C instead of trying every position,
# which made scoring a long fold several times cheaper than `\b(?:...)` did.
_ID = re.compile(r"[A-Z0-9](?<!\w.)[A-Z0-9_-]{2,}\b")  # and holds a digit and a letter
_ACRONYM = re.compile(r"[A-Z](?<!\w.)[A-Z]+\b")
_NUMBER = re.compile(r"\d\d*(?:[.,:/-]\d+)*")
_AMOUNT = re.compile(
    r"[$€£¥₹\d](?:(?<=[$€£¥₹])\s?\d|(?<=\d)\s?(?:%|(?i:usd|eur|gbp|dollars?|euros?)\b))"
)
_DATE_NUMERIC = re.compile(r"\d(?<!\w.)(?:\d{3}-\d{2}-\d{2}\b|\d?/\d{1,2}(?:/\d{2,4})?\b)")
_MONTH_DAY = r"[a-z]*\.?\s+\d"  # the rest of "Mar 3", "March 3", "Sept. 3"
_DATE_NAMED = re.compile(  # one literal first letter per branch: the engine skips to those
    rf"J(?<!\w.)(?:an|u[nl]){_MONTH_DAY}|F(?<!\w.)(?:eb{_MONTH_DAY}|riday\b)"
    rf"|M(?<!\w.)(?:a[ry]{_MONTH_DAY}|onday\b)|A(?<!\w.)(?:pr|ug){_MONTH_DAY}"
    rf"|S(?<!\w.)(?:ep{_MONTH_DAY}|aturday\b|unday\b)|O(?<!\w.)ct{_MONTH_DAY}"
    rf"|N(?<!\w.)ov{_MONTH_DAY}|D(?<!\w.)ec{_MONTH_DAY}|T(?<!\w.)(?:ues|hurs)day\b"
    r"|W(?<!\w.)ednesday\b"
)
# These two run on the lower-cased text (any case counts).
_DATE_RELATIVE = re.compile(
    r"(?:t(?<!\w.)(?:oday|onight|omorrow)|y(?<!\w.)esterday|n(?<!\w.)ext (?:week|month))\b"
)
_TASK = re.compile(
    r"(?:t(?<!\w.)o-?do|n(?<!\w.)(?:eed(?:s|ed)? to|ext steps?)|w(?<!\w.)ill|m(?<!\w.)ust"
    r"|p(?<!\w.)(?:lease|lan(?:s|ned)? to)|r(?<!\w.)emind(?:er)?|d(?<!\w.)(?:eadline|ue|ecided)"
    r"|a(?<!\w.)(?:greed|ction items?|sap)|l(?<!\w.)et(?:[’']s| us)|f(?<!\w.)ollow[- ]up"
    r"|g(?<!\w.)oing to|s(?<!\w.)hould)\b"
)
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+\.[\w.-]+")
_URL = re.compile(r"https?://\S+|www\.\S+")
_RARE = ((_EMAIL, ("@",)), (_URL, ("://", "www.")))
_ANY_DIGIT = re.compile(r"\d")
_DIGITS = frozenset("0123456789")
_CAPITALS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_OPENING_FILLER = re.compile(r"(?i)^(?:ok(?:ay)?|thanks?|sure|hello|hi|hey)\b")
_NON_WORD = re.compile(r"[\W_]+")


def estimate_tokens(text: str) -> int:
    """Rough token count (about four characters a token), for provenance only."""
    return estimate_tokens_of(len(text))


def estimate_tokens_of(chars: int) -> int:
    return (chars + 3) // 4


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence of `text`: lines and bullets first, then . ! ? but not
    decimals or "e.g.". Offsets rather than strings: the caller cuts each sentence once."""
    spans: list[tuple[int, int]] = []
    for line in _LINE.finditer(text):
        start, end = line.span()
        if lead := _LEAD.match(text, start, end):  # always matches, if only the empty string
            start = lead.end()
        for m in _BOUNDARY.finditer(text, start, end):
            # The boundary's own spaces are not part of the sentence; the next one starts after.
            spans.append((start, m.end(1)))
            start = m.end()
        if rest := text[start:end].rstrip():
            spans.append((start, start + len(rest)))
    return spans


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: lines and bullets first, then . ! ? but not decimals or "e.g."."""
    return [text[start:end] for start, end in sentence_spans(text)]


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[: max(limit - 1, 0)]
    # Cut at a word boundary so an id or amount is dropped whole rather than mangled.
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:-") + _ELLIPSIS


def _credit(found: list[str], known: set[str], weight: float, cap: int = 2) -> float:
    """Full credit for facts not seen before, little for repeats: the first mention carries it."""
    if not found:
        return 0.0
    fresh = len(set(found).difference(known))  # distinct, and not seen before
    known.update(found)
    return weight * min(fresh, cap) + 0.2 * weight * min(len(found) - fresh, cap)


_NFKC = partial(unicodedata.normalize, "NFKC")
_TO_SPACE = partial(_NON_WORD.sub, " ")
# On ASCII, NFKC and case folding change nothing but the case, and every character but a letter
# or a digit is what the substitution replaces: one byte table does it all, in C (measured: a
# third of the time of the three steps).
_ASCII_FOLD = bytes(
    c + 32 if 65 <= c <= 90 else c if 48 <= c <= 57 or 97 <= c <= 122 else 32 for c in range(256)
)


def comparison_key(sentence: str) -> str:
    """`sentence` with case, width and punctuation gone: what makes two sentences the same."""
    if sentence.isascii():
        return b" ".join(sentence.encode().translate(_ASCII_FOLD).split()).decode()
    return _TO_SPACE(_NFKC(sentence).casefold()).strip()


@dataclass(frozen=True, slots=True)
class _Features:
    """What the scoring looks for, in each sentence of the fold (item i: sentence i).

    Found with map() over the patterns' own methods: the loop over sentences runs in C, and
    there is no Python code per match, which is where a fold's time used to go."""

    keys: list[str]  # the sentence folded for comparison: case, width and punctuation gone
    words: list[list[str]]
    ids: list[list[str]]
    numbers: list[list[str]]
    acronyms: list[list[str]]
    amounts: list[bool]
    dates: list[bool]
    tasks: list[bool]

    @classmethod
    def find(cls, doc: str, sentences: list[str]) -> _Features:
        keys = list(map(comparison_key, sentences))
        lower = list(map(str.lower, sentences))
        # Ids, numbers, amounts and numeric dates all hold a digit, and many sentences have
        # none (half of the benchmark's): those four patterns only run where one cheap search
        # found a digit.
        has_digit = list(map(bool, map(_ANY_DIGIT.search, sentences)))
        numeric = list(compress(sentences, has_digit))
        ids = _spread(
            has_digit,
            (
                [t for t in found if not (_DIGITS.isdisjoint(t) or _CAPITALS.isdisjoint(t))]
                for found in map(_ID.findall, numeric)
            ),
            list,
        )
        # Rare, and costly to look for everywhere (the e-mail pattern took a fifth of a fold's
        # time): only in the sentences that hold their telltale sign.
        for pattern, signs in _RARE:
            if any(sign in doc for sign in signs):
                for tokens, sentence in zip(ids, sentences, strict=True):
                    if any(sign in sentence for sign in signs):
                        tokens.extend(pattern.findall(sentence))
        numeric_dates = _spread(has_digit, map(bool, map(_DATE_NUMERIC.search, numeric)), bool)
        dates = [
            bool(numeric_date or named or relative)
            for numeric_date, named, relative in zip(
                numeric_dates,
                map(_DATE_NAMED.search, sentences),
                map(_DATE_RELATIVE.search, lower),
                strict=True,
            )
        ]
        return cls(
            keys=keys,
            words=list(map(_WORD.findall, sentences)),
            ids=ids,
            numbers=_spread(has_digit, map(_NUMBER.findall, numeric), list),
            acronyms=list(map(_ACRONYM.findall, sentences)),
            amounts=_spread(has_digit, map(bool, map(_AMOUNT.search, numeric)), bool),
            dates=dates,
            tasks=list(map(bool, map(_TASK.search, lower))),
        )


def _spread(has_digit: list[bool], found: Iterable[_T], missing: Callable[[], _T]) -> list[_T]:
    """One item per sentence, from what was found in those with a digit; `missing()` (a new
    empty list, or False) for the others."""
    found_in = iter(found)
    return [next(found_in) if has else missing() for has in has_digit]


@dataclass(slots=True)
class _Unit:
    role: str
    text: str
    bonus: float
    previous: bool


@dataclass(slots=True)
class _Candidate:
    text: str  # clipped to the budget
    full: str
    prefix: str  # "role: " or ""
    previous: bool
    group: int  # one turn, or one line of the previous summary: rendered on one line
    order: int
    score: float
    filler: bool


def _units(previous: str | None, turns: Sequence[Turn]) -> Iterator[_Unit]:
    """Previous-summary lines first, then turns: each is rendered on one line."""
    roles = frozenset(_ROLE_WEIGHT) | {t.role.strip().lower() for t in turns}
    for line in (previous or "").splitlines():
        m = _ROLE_PREFIX.match(line.strip())
        if m and m.group(1).lower() in roles:
            yield _Unit(m.group(1), line.strip()[m.end() :], _PREVIOUS_BONUS, True)
        else:
            yield _Unit("", line, _PREVIOUS_BONUS, True)
    for i, turn in enumerate(turns):
        role, text = turn.role.strip(), turn.text
        if role.lower() in _TOOL_ROLES:
            # Tool results are mostly JSON: its quotes and braces cost budget and carry nothing.
            text = _JSON_PUNCT.sub("", text)
        yield _Unit(role, text, 1.0 if i in (0, len(turns) - 1) else 0.0, False)


def _candidates(previous: str | None, turns: Sequence[Turn], budget: int) -> list[_Candidate]:
    units = list(_units(previous, turns))
    # The whole fold as one text (no sentence spans a line) split once; unit g ends before
    # offset ends[g].
    doc = "\n".join(u.text for u in units)
    ends = list(accumulate(len(u.text) + 1 for u in units))
    spans = sentence_spans(doc)
    sentences = [doc[start:end] for start, end in spans]
    features = _Features.find(doc, sentences)
    out: list[_Candidate] = []
    seen: dict[str, _Candidate] = {}
    known: set[str] = set()  # names, ids and numbers credited so far
    group = -1
    unit = units[0] if units else _Unit("", "", 0.0, False)
    prefix, limit, weight, asks = "", budget, 0.0, False
    for i, (start, _) in enumerate(spans):
        first_of_unit = group < 0 or start >= ends[group]
        if first_of_unit:
            group = bisect_right(ends, start)
            unit = units[group]
            prefix = f"{unit.role}: " if unit.role else ""
            # Clipped so that it fits with its prefix, or bare when the budget is tiny.
            room = budget - len(prefix)
            limit = min(room if room >= 20 else budget, _MAX_SENTENCE)
            weight = _ROLE_WEIGHT.get(unit.role.lower(), 0.8)
            asks = unit.role.lower() in ("user", "human")
        sentence, key = sentences[i], features.keys[i]
        filler = not key or _FILLER.issuperset(key.split())
        score = 0.0
        if not filler:
            position = unit.bonus + (0.5 if first_of_unit else 0.0)
            score = weight * position + _score(sentence, i, features, known, weight, asks)
        key = key or sentence
        if (earlier := seen.get(key)) is not None:
            # Restating a fact is a sign it matters; keep it where it first appeared.
            earlier.score = max(earlier.score, score + _REPEAT_BONUS)
            continue
        cand = _Candidate(
            _clip(sentence, limit), sentence, prefix, unit.previous, group, len(out), score, filler
        )
        seen[key] = cand
        out.append(cand)
    return out


def _score(
    sentence: str, i: int, f: _Features, known: set[str], weight: float, asks: bool
) -> float:
    """Salience of sentence `i` of the fold, apart from its place in the conversation."""
    words = f.words[i]
    names = [w for w in words[1:] if w[0].isupper() and not w.isupper() and w[:2] not in _PRONOUN]
    soft = _credit(names, known, 0.6, 3) + 0.4 * min(len(f.acronyms[i]), 2)
    if asks and sentence.endswith(("?", "？")):
        soft += 1.5
    if f.tasks[i]:
        soft += 2.0
    if _OPENING_FILLER.match(sentence):
        soft -= 0.5
    if len(words) < 3:
        soft -= 0.5
    soft -= len(sentence) / 250
    hard = (
        _credit(f.ids[i], known, 1.5)
        + _credit(f.numbers[i], known, 0.6, 3)
        + 1.0 * f.amounts[i]
        + 1.0 * f.dates[i]
    )
    return weight * soft + hard


def summarize_text(previous: str | None, turns: Sequence[Turn], max_chars: int) -> str:
    """The rolling summary: the most salient sentences that fit, in conversation order."""
    if max_chars < 1:
        raise ValueError("max_chars must be positive")
    # Never longer than the input, or the summary would grow the state it is meant to slim.
    budget = min(max_chars, input_chars(previous, turns))
    candidates = _candidates(previous, turns, budget)
    if not candidates:
        return _clip(NO_CONTENT, max_chars)
    pool = [c for c in candidates if not c.filler] or candidates
    ranked = sorted(pool, key=lambda c: (-c.score, c.order))
    chosen: list[_Candidate] = []
    groups: set[int] = set()
    used = 0
    for cand in ranked:
        cost = len(cand.text) + (1 if chosen else 0)
        if cand.group not in groups:
            cost += len(cand.prefix)
        if used + cost <= budget:
            chosen.append(cand)
            groups.add(cand.group)
            used += cost
    if len(chosen) < len(pool):
        # The input is short and role labels are what overflows it: keeping every sentence
        # matters more than labelling the new ones.
        condensed = _render(pool, bare=True)
        if len(condensed) <= budget:
            return condensed
    if not chosen:
        # Candidates are already clipped to the budget, so the best one always fits bare.
        return ranked[0].text
    return _render(chosen)


def _render(chosen: list[_Candidate], bare: bool = False) -> str:
    """One line per turn (or previous-summary line), in conversation order."""
    lines: list[str] = []
    last_group = -1
    for cand in sorted(chosen, key=lambda c: c.order):
        text = cand.full if bare else cand.text
        if cand.group == last_group:
            lines[-1] += " " + text
        else:
            lines.append(text if bare and not cand.previous else cand.prefix + text)
            last_group = cand.group
    return "\n".join(lines)


def summarize_pairs(previous: str | None, turns: list[tuple[str, str]], max_chars: int) -> str:
    """`summarize_text` on (role, text) pairs: what a worker process is sent, without the raw
    bytes and parsed fields of each turn that it would not read."""
    return summarize_text(previous, [Turn(role, text, b"") for role, text in turns], max_chars)


class ExtractiveSummarizer:
    """Summarizer that selects sentences instead of writing new ones; always available.

    With `processes` > 0 the scoring runs in that many worker processes: it is the one piece
    of CPU work per session, and on the event loop it would hold up every other session's I/O.
    """

    name = "extractive"

    def __init__(self, processes: int = 0) -> None:
        self._pool = CpuPool(processes)
        log.info(
            "extractive_summarizer_in_use",
            detail="offline extractive summarizer in use: summaries are selected sentences",
            processes=processes,
        )

    async def summarize(
        self, previous: str | None, turns: Sequence[Turn], max_chars: int
    ) -> SummaryText:
        started = time.perf_counter()
        pairs = [(t.role, t.text) for t in turns]
        text = await self._pool.run(summarize_pairs, previous, pairs, max_chars)
        return SummaryText(
            text=text,
            summarizer=self.name,
            model=None,
            tokens_in=estimate_tokens_of(transcript_chars(previous, turns)),
            tokens_out=estimate_tokens(text),
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()
