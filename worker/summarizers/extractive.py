"""Offline extractive summarizer: keeps the most telling sentences, with no model and no network.

It is the fallback when no model is configured or reachable, so it has to be deterministic and
cheap, and it must keep what an agent needs later: names, ids, amounts, dates and open tasks.
"""

from __future__ import annotations

import asyncio
import re
import time
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import structlog

from worker.domain import SummaryText, Turn
from worker.summarizers.base import input_chars, transcript

log = structlog.get_logger(__name__)

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

_BOUNDARY = re.compile(r"[.!?…]+[\"'”’)\]]*\s+|[。！？]+\s*")
_BULLET = re.compile(r"^(?:[-*•·‣▪–]|\d{1,3}[.)])\s+")
_ROLE_PREFIX = re.compile(r"^([^\W\d][\w-]{0,31}):\s+")
_TOOL_ROLES = frozenset({"tool", "function"})
_JSON_PUNCT = re.compile(r'[{}\[\]"]')
_PRONOUN = ("I'", "I’")  # "I'm" is capitalised but names nobody
_INITIAL = re.compile(r"^[A-Z]\.$")
_WORD = re.compile(r"[^\W\d_][\w'’-]*")
_ID = re.compile(r"\b(?=[A-Z0-9_-]*\d)(?=[A-Z0-9_-]*[A-Z])[A-Z0-9][A-Z0-9_-]{2,}\b")
_ACRONYM = re.compile(r"\b[A-Z]{2,}\b")
_NUMBER = re.compile(r"\d+(?:[.,:/-]\d+)*")
_AMOUNT = re.compile(r"[$€£¥₹]\s?\d|\d\s?(?:%|(?i:usd|eur|gbp|dollars?|euros?)\b)")
_DATE = re.compile(
    r"\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}/\d{1,2}(?:/\d{2,4})?\b"
    r"|\b(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*\.?\s+\d"
    r"|\b(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day\b"
    r"|(?i:\b(?:today|tonight|tomorrow|yesterday|next (?:week|month))\b)"
)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
_URL = re.compile(r"https?://\S+|www\.\S+")
_TASK = re.compile(
    r"(?i)\b(?:to-?do|need(?:s|ed)? to|will|must|please|next steps?|remind(?:er)?|deadline|"
    r"due|decided|agreed|let[’']s|let us|follow[- ]up|action items?|going to|"
    r"plan(?:s|ned)? to|asap|should)\b"
)
_OPENING_FILLER = re.compile(r"(?i)^(?:ok(?:ay)?|thanks?|sure|hello|hi|hey)\b")


def estimate_tokens(text: str) -> int:
    """Rough token count (about four characters a token), for provenance only."""
    return (len(text) + 3) // 4


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: lines and bullets first, then . ! ? but not decimals or "e.g."."""
    out: list[str] = []
    for raw_line in text.splitlines():
        line = _BULLET.sub("", raw_line.strip())
        start = 0
        for m in _BOUNDARY.finditer(line):
            piece = line[start : m.end()].strip()
            last = piece.split()[-1]
            if last.lower() in _ABBREVIATIONS or _INITIAL.match(last):
                continue
            out.append(piece)
            start = m.end()
        if rest := line[start:].strip():
            out.append(rest)
    return out


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[: max(limit - 1, 0)]
    # Cut at a word boundary so an id or amount is dropped whole rather than mangled.
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:-") + _ELLIPSIS


def _key(sentence: str) -> str:
    folded = unicodedata.normalize("NFKC", sentence).casefold()
    return re.sub(r"[\W_]+", " ", folded).strip()


def _credit(found: list[str], known: set[str], weight: float, cap: int = 2) -> float:
    """Full credit for facts not seen before, little for repeats: the first mention carries it."""
    fresh = [f for f in dict.fromkeys(found) if f not in known]
    known.update(found)
    return weight * min(len(fresh), cap) + 0.2 * weight * min(len(found) - len(fresh), cap)


def _salience(sentence: str, role: str, position: float, known: set[str]) -> tuple[float, bool]:
    """Score of one sentence, and whether it is mere filler."""
    key = _key(sentence)
    if not key or all(w in _FILLER for w in key.split()):
        return 0.0, True
    words = _WORD.findall(sentence)
    names = [w for w in words[1:] if w[0].isupper() and not w.isupper() and w[:2] not in _PRONOUN]
    soft = position + _credit(names, known, 0.6, 3) + 0.4 * min(len(_ACRONYM.findall(sentence)), 2)
    if role.lower() in ("user", "human") and sentence.rstrip().endswith(("?", "？")):
        soft += 1.5
    if _TASK.search(sentence):
        soft += 2.0
    if _OPENING_FILLER.match(sentence):
        soft -= 0.5
    if len(words) < 3:
        soft -= 0.5
    soft -= len(sentence) / 250
    ids = _ID.findall(sentence) + _EMAIL.findall(sentence) + _URL.findall(sentence)
    hard = (
        _credit(ids, known, 1.5)
        + _credit(_NUMBER.findall(sentence), known, 0.6, 3)
        + 1.0 * bool(_AMOUNT.search(sentence))
        + 1.0 * bool(_DATE.search(sentence))
    )
    return _ROLE_WEIGHT.get(role.lower(), 0.8) * soft + hard, False


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


def _units(previous: str | None, turns: Sequence[Turn]) -> Iterator[tuple[str, str, float, bool]]:
    """(role, text, bonus, from previous) per group: previous-summary lines first, then turns."""
    roles = frozenset(_ROLE_WEIGHT) | {t.role.strip().lower() for t in turns}
    for line in (previous or "").splitlines():
        m = _ROLE_PREFIX.match(line.strip())
        if m and m.group(1).lower() in roles:
            yield m.group(1), line.strip()[m.end() :], _PREVIOUS_BONUS, True
        else:
            yield "", line, _PREVIOUS_BONUS, True
    for i, turn in enumerate(turns):
        role, text = turn.role.strip(), turn.text
        if role.lower() in _TOOL_ROLES:
            # Tool results are mostly JSON: its quotes and braces cost budget and carry nothing.
            text = _JSON_PUNCT.sub("", text)
        yield role, text, 1.0 if i in (0, len(turns) - 1) else 0.0, False


def _candidates(previous: str | None, turns: Sequence[Turn], budget: int) -> list[_Candidate]:
    out: list[_Candidate] = []
    seen: dict[str, _Candidate] = {}
    known: set[str] = set()
    for group, (role, text, bonus, prev) in enumerate(_units(previous, turns)):
        for i, sentence in enumerate(split_sentences(text)):
            score, filler = _salience(sentence, role, bonus + (0.5 if i == 0 else 0.0), known)
            key = _key(sentence) or sentence
            if (first := seen.get(key)) is not None:
                # Restating a fact is a sign it matters; keep it where it first appeared.
                first.score = max(first.score, score + _REPEAT_BONUS)
                continue
            prefix = f"{role}: " if role else ""
            # Clipped so that it fits with its prefix, or bare when the budget is tiny.
            room = budget - len(prefix)
            limit = min(room if room >= 20 else budget, _MAX_SENTENCE)
            clipped = _clip(sentence, limit)
            cand = _Candidate(clipped, sentence, prefix, prev, group, len(out), score, filler)
            seen[key] = cand
            out.append(cand)
    return out


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


class ExtractiveSummarizer:
    """Summarizer that selects sentences instead of writing new ones; always available."""

    name = "extractive"

    def __init__(self) -> None:
        log.info(
            "extractive_summarizer_in_use",
            detail="offline extractive summarizer in use: summaries are selected sentences",
        )

    async def summarize(
        self, previous: str | None, turns: Sequence[Turn], max_chars: int
    ) -> SummaryText:
        started = time.perf_counter()
        # Scoring a long session is CPU work; keep it off the loop so leases keep renewing.
        text = await asyncio.to_thread(summarize_text, previous, list(turns), max_chars)
        source = "\n".join(filter(None, [previous, transcript(turns)]))
        return SummaryText(
            text=text,
            summarizer=self.name,
            model=None,
            tokens_in=estimate_tokens(source),
            tokens_out=estimate_tokens(text),
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    async def aclose(self) -> None:
        """Nothing to release: no connection or model is held."""
