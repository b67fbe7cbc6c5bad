"""Log lines: with JSON chosen, every line on stderr is one JSON object, libraries' too."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from worker import logs


@pytest.fixture(autouse=True)
def logging_as_it_was() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level, config = root.handlers[:], root.level, structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


def test_library_logs_and_their_tracebacks_are_json_lines_too(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure("info", "json")
    structlog.get_logger("worker.test").info("ours", n=1)
    try:
        raise ValueError("bad request line")
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    logging.getLogger("aiohttp.access").info("below warning: not shown")

    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]

    assert [(x["event"], x["level"]) for x in lines] == [
        ("ours", "info"),
        ("Error handling request", "error"),
    ]
    assert lines[1]["logger"] == "aiohttp.server"
    assert "ValueError: bad request line" in lines[1]["exception"]


def test_tracebacks_on_a_terminal_show_no_local_variables(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure("info", "console")

    def connect(url: str) -> None:
        raise ConnectionError("refused")

    try:
        connect("postgresql://app:" + "s3cret" + "-pw@db/agents")  # whole only as a local
    except ConnectionError:
        structlog.get_logger("worker.test").exception("session_crashed")

    shown = capsys.readouterr().err
    assert "ConnectionError" in shown and "s3cret-pw" not in shown
