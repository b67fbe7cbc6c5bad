"""The offline summarizer keeps what a user would look for, within the size it was given."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from worker.domain import Turn
from worker.summarizers.base import (
    Summarizer,
    check_summary,
    input_chars,
    transcript,
    transcript_chars,
)
from worker.summarizers.extractive import (
    NO_CONTENT,
    ExtractiveSummarizer,
    estimate_tokens,
    split_sentences,
    summarize_text,
)


def turn(role: str, text: str) -> Turn:
    return Turn(role=role, text=text, raw=f"{role}:{text}".encode())


SUPPORT_CHAT = [
    turn("user", "Hello!"),
    turn("assistant", "Hi there, how can I help?"),
    turn("user", "My name is Marguerite Okafor and order ORD-58291 never arrived."),
    turn("assistant", "Sorry to hear that. Let me look into it."),
    turn("tool", '{"order_id": "ORD-58291", "status": "lost", "refund_due": 129.99}'),
    turn("assistant", "The carrier lost the parcel. A refund of $129.99 is due to you."),
    turn("user", "Ok thanks."),
    turn("user", "Can you also send the replacement to my office in Lisbon?"),
    turn("assistant", "Sure."),
    turn("assistant", "I need to confirm the Lisbon address with the warehouse by Friday."),
    turn("user", "Great, thanks!"),
    turn("assistant", "You're welcome."),
    turn("user", "Bye!"),
]
FILLER = ("Hello!", "Ok thanks.", "Sure.", "Great, thanks!", "You're welcome.", "Bye!")


def run(previous: str | None, turns: list[Turn], max_chars: int) -> str:
    return asyncio.run(ExtractiveSummarizer().summarize(previous, turns, max_chars)).text


def chatter(n: int, topic: str = "the weather") -> list[Turn]:
    """Turns that say something, but less than a name, an id, an amount or a task."""
    roles = ("user", "assistant")
    return [
        turn(roles[i % 2], f"We talked about {topic} for a while, round {i}.") for i in range(n)
    ]


def test_split_sentences_keeps_decimals_abbreviations_and_bullets() -> None:
    text = "It costs 3.5 EUR, e.g. for Dr. Smith. Call me!\n- first item\n* second item? yes"
    assert split_sentences(text) == [
        "It costs 3.5 EUR, e.g. for Dr. Smith.",
        "Call me!",
        "first item",
        "second item?",
        "yes",
    ]
    assert split_sentences("東京の会議は3月5日です。よろしく！") == [
        "東京の会議は3月5日です。",
        "よろしく！",
    ]


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        # Abbreviations in any case, and initials, end no sentence...
        ("See E.G. the notes. Then go.", ["See E.G. the notes.", "Then go."]),
        ("Ask J. R. Tolkien. He knows.", ["Ask J. R. Tolkien.", "He knows."]),
        ("We met approx. twice. Fine.", ["We met approx. twice.", "Fine."]),
        # ...but a word that only ends like one does, and a lower-case "initial", do.
        ("It runs on Node.js. Then stops.", ["It runs on Node.js.", "Then stops."]),
        ("Plan b. Then c.", ["Plan b.", "Then c."]),
        ("Buy milk etc.. Then rest.", ["Buy milk etc..", "Then rest."]),
        # Closing quotes and brackets stay with their sentence.
        (
            'He said "stop." Then left (quietly.) Done',
            ['He said "stop."', "Then left (quietly.)", "Done"],
        ),
        # After a CJK full stop a new sentence starts at once, abbreviation or not.
        ("好。Dr. Li came. Bye", ["好。", "Dr. Li came.", "Bye"]),
    ],
)
def test_sentence_boundaries(text: str, sentences: list[str]) -> None:
    assert split_sentences(text) == sentences


def test_a_long_run_of_dots_is_split_in_one_pass() -> None:
    # A tool's progress bar. Trying a sentence end from every dot of the run took time growing
    # with the square of its length (16,000 dots: 5 s; these 200,000: about a quarter of an
    # hour, far past the suite's per-test timeout). Now it takes milliseconds.
    bar = "." * 200_000
    text = f"Downloading {bar} done. Next step is ORD-77812!!!!{bar}"
    assert split_sentences(text) == [
        f"Downloading {bar}",
        "done.",
        f"Next step is ORD-77812!!!!{bar}",
    ]
    summary = summarize_text(None, [turn("tool", text), turn("user", "Is ORD-77812 there?")], 300)
    assert "ORD-77812" in summary
    assert len(summary) <= 300


_NOUNS = ("apples", "rivers", "clouds", "trains", "music", "lamps", "paint", "tea", "maps", "ink")
_PEOPLE = ("Bruno", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kai")


@pytest.mark.parametrize(
    "salient",
    [
        "the parcel reference is QZ-58291 for now.",
        "we need to renew the insurance contract soon.",
        "the contract is with Marguerite Okafor in Lisbon.",
        "the bill came to $129.99 in the end.",
        "the visit moved to 2024-11-03 after all.",
        "write to marguerite@example.com about it.",
        "the form is at https://example.com/claims now.",
        "can you ship it somewhere else instead?",
    ],
)
def test_one_salient_sentence_outranks_small_talk_with_numbers(salient: str) -> None:
    # Filler at both ends takes the first/last-turn bonus, so only salience decides.
    small_talk = [
        turn(("user", "assistant")[i % 2], f"{p} talked about {n} for {i + 10} minutes, {i + 40}.")
        for i, (p, n) in enumerate(zip(_PEOPLE, _NOUNS, strict=True))
    ]
    turns = [
        turn("user", "Hello!"),
        *small_talk[:5],
        turn("user", salient),
        *small_talk[5:],
        turn("user", "Bye!"),
    ]
    # Room for any one line, never two.
    assert run(None, turns, 80) == f"user: {salient}"


def test_names_ids_amounts_and_open_tasks_survive() -> None:
    budget = 320
    text = run(None, SUPPORT_CHAT, budget)
    assert len(text) <= budget < input_chars(None, SUPPORT_CHAT)
    for fact in ("Marguerite Okafor", "ORD-58291", "129.99", "Lisbon", "need to confirm"):
        assert fact in text, (fact, text)


def test_filler_is_dropped_even_when_everything_fits() -> None:
    text = run(None, SUPPORT_CHAT, 10_000)
    for filler in FILLER:
        assert filler not in text, text
    assert "ORD-58291" in text
    assert "need to confirm the Lisbon address" in text


@pytest.mark.parametrize("max_chars", [1, 7, 40, 300, 1500])
def test_max_chars_is_respected_on_a_long_conversation(max_chars: int) -> None:
    turns = [
        turn(
            ("user", "assistant", "tool")[i % 3],
            f"Step {i}: ticket TCK-{i:05d} for Ana Souza costs ${i}.50, "
            f"due on 2024-05-{i % 28 + 1:02d}. We will need to follow up with the Porto team "
            "next week, please remind me.",
        )
        for i in range(200)
    ]
    text = run(None, turns, max_chars)
    assert 0 < len(text) <= max_chars
    if max_chars >= 300:
        assert "TCK-" in text


def test_a_single_overlong_sentence_is_cut_with_an_ellipsis() -> None:
    words = " ".join(f"word{i}" for i in range(500))
    text = run(None, [turn("user", words)], 100)
    assert len(text) <= 100
    assert text.endswith("…")
    assert text.startswith("user: word0 word1")


def test_never_longer_than_its_input() -> None:
    turns = [turn("user", "Bob paid $5.")]
    text = run(None, turns, 1000)
    assert len(text) <= input_chars(None, turns)
    assert "$5" in text
    assert check_summary(text, None, turns) == text


def test_short_input_keeps_every_sentence_when_only_role_labels_overflow() -> None:
    previous = "user: Hana Kim, ORD-1."
    turns = [
        turn("user", "Paid $5 on 2024-02-01."),
        turn("assistant", "Refund RF-9 is due."),
        turn("user", "Thanks!"),
    ]
    text = run(previous, turns, 1000)
    assert len(text) <= input_chars(previous, turns)
    assert text.splitlines() == [
        "user: Hana Kim, ORD-1.",
        "Paid $5 on 2024-02-01.",
        "Refund RF-9 is due.",
    ]


def test_never_empty_when_there_is_text() -> None:
    assert run(None, [turn("user", "ok"), turn("assistant", "   ")], 500) == "ok"
    assert run(None, [turn("user", "  "), turn("assistant", "")], 500) == NO_CONTENT
    assert (
        run("user: Ida's case is ID-77.", [turn("user", " ")], 500) == "user: Ida's case is ID-77."
    )
    # A fold of nothing must not carry its placeholder into the next summary.
    assert (
        run(NO_CONTENT, [turn("user", "Order ORD-1 shipped.")], 500) == "user: Order ORD-1 shipped."
    )


def test_deterministic() -> None:
    # Many sentences score alike, so any unordered tie-break would show.
    turns = [turn("user", f"Point {i % 10}{i // 10} was noted.") for i in range(100)]
    first = run("user: Customer is Hana Kim.", turns, 400)
    assert len(first) > 300
    for _ in range(5):
        assert run("user: Customer is Hana Kim.", turns, 400) == first
    assert summarize_text("user: Customer is Hana Kim.", turns, 400) == first


def test_previous_facts_survive_successive_folds_in_stable_order() -> None:
    summary = run(None, SUPPORT_CHAT, 300)
    for fold in range(6):
        # Each fold brings names and ids of its own, nearly as telling as the first ones.
        turns = [
            turn(
                ("user", "assistant")[i % 2], f"{name} Silva opened ticket TCK-{fold}{i:02d} today."
            )
            for i, name in enumerate(_PEOPLE * 3)
        ]
        summary = run(summary, turns, 300)
        assert len(summary) <= 300
    assert "Marguerite Okafor" in summary
    assert "ORD-58291" in summary
    lines = summary.splitlines()
    assert lines[0] == "user: My name is Marguerite Okafor and order ORD-58291 never arrived."


def test_previous_summary_comes_first_then_new_turns_in_order() -> None:
    previous = "user: My name is Alice Moreau.\nassistant: Ticket INC-4411 is open."
    turns = [
        turn("user", "The blender model BX-200 arrived broken on Monday."),
        turn("assistant", "I will ship a new BX-200 by 2024-06-03, please keep the box."),
        # Filler leaves room in the budget (never above the input's size) for role labels.
        *(turn("user", "Okay, thanks so much!") for _ in range(3)),
    ]
    lines = run(previous, turns, 1000).splitlines()
    assert lines == [
        "user: My name is Alice Moreau.",
        "assistant: Ticket INC-4411 is open.",
        "user: The blender model BX-200 arrived broken on Monday.",
        "assistant: I will ship a new BX-200 by 2024-06-03, please keep the box.",
    ]


def test_near_identical_sentences_appear_once() -> None:
    previous = "user: My order ORD-58291 is late."
    turns = [
        turn("user", "my order ORD-58291 is LATE!"),
        turn("user", "It was due on 2024-01-09."),
        *(turn("user", "Okay, thanks so much!") for _ in range(3)),
    ]
    text = run(previous, turns, 1000)
    assert text.count("ORD-58291") == 1
    assert "2024-01-09" in text


def test_unicode_text() -> None:
    turns = [
        turn("user", "Je m'appelle Élodie Fèvre, commande CMD-9921 à 42,50 € 🎉."),
        turn("assistant", "Merci Élodie, je dois vérifier la livraison demain."),
        turn("user", "東京の会議は3月5日です。"),
        turn("user", "👍"),
        *chatter(20),
    ]
    text = run(None, turns, 260)
    assert len(text) <= 260
    for fact in ("Élodie Fèvre", "CMD-9921", "🎉", "東京の会議は3月5日です。"):
        assert fact in text, (fact, text)
    assert "👍" not in text


def test_tool_output_numbers_are_kept() -> None:
    turns = [
        *chatter(10, "the refund policy"),
        turn("tool", '{"refund_id": "RF-7731", "amount_eur": 42.5, "iban_last4": "0417"}'),
        *chatter(10, "the refund policy in general terms"),
    ]
    text = run(None, turns, 150)
    assert len(text) <= 150
    tool_lines = [line for line in text.splitlines() if line.startswith("tool: ")]
    assert tool_lines, text
    for value in ("RF-7731", "42.5", "0417"):
        assert value in tool_lines[0]
    assert '"' not in tool_lines[0]


def test_an_echoed_id_does_not_outrank_its_first_mention() -> None:
    turns = [
        turn("user", "Hi!"),
        turn("user", "I'm Marguerite and order ORD-58291 never arrived."),
        turn("tool", '{"order_id": "ORD-58291", "weight_kg": 2.5, "zone": 14}'),
        turn("user", "Bye!"),
    ]
    assert run(None, turns, 60) == "user: I'm Marguerite and order ORD-58291 never arrived."


def test_tool_prose_weighs_less_than_what_people_said() -> None:
    turns = [
        turn("user", "Hi!"),
        turn("user", "the courier said the parcel is delayed somewhere."),
        turn("tool", "courier reports that the parcel is delayed somewhere."),
        turn("user", "Bye!"),
    ]
    assert run(None, turns, 60) == "user: the courier said the parcel is delayed somewhere."


async def test_summary_text_provenance_and_protocol() -> None:
    summarizer: Summarizer = ExtractiveSummarizer()
    result = await summarizer.summarize(None, SUPPORT_CHAT, 200)
    await summarizer.aclose()
    assert summarizer.name == "extractive"
    assert result.summarizer == "extractive"
    assert result.model is None
    assert result.tokens_out == estimate_tokens(result.text) > 0
    assert result.tokens_in is not None and result.tokens_in > result.tokens_out
    assert result.latency_ms >= 0
    assert check_summary(result.text, None, SUPPORT_CHAT) == result.text


@pytest.mark.parametrize("previous", [None, "", "user: Customer is Hana Kim."])
@pytest.mark.parametrize("count", [0, 1, len(SUPPORT_CHAT)])
def test_transcript_chars_counts_what_a_model_would_read(previous: str | None, count: int) -> None:
    turns = SUPPORT_CHAT[:count]
    read = "\n".join(filter(None, [previous, transcript(turns)]))
    assert transcript_chars(previous, turns) == len(read)


def test_max_chars_must_be_positive() -> None:
    with pytest.raises(ValueError):
        summarize_text(None, SUPPORT_CHAT, 0)


async def test_logs_once_that_the_offline_summarizer_is_in_use() -> None:
    with capture_logs() as logs:
        summarizer = ExtractiveSummarizer()
        await summarizer.summarize(None, SUPPORT_CHAT, 200)
        await summarizer.summarize("user: Customer is Hana Kim.", SUPPORT_CHAT, 200)
    events = [e["event"] for e in logs]
    assert events == ["extractive_summarizer_in_use"]
