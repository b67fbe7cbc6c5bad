"""Settings an operator can get wrong are refused when read (the command exits 2 with one
line), not found out later by every session failing, or by a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.config import ConfigFileError, LogLevel, Settings
from worker.hot.keys import KeyPattern, PatternError

REFUSED = {
    "CONSOLIDATOR_LOG_LEVEL": "verbose",
    "CONSOLIDATOR_LOG_FORMAT": "xml",
    "CONSOLIDATOR_MAX_SESSIONS_PER_S": "inf",
    "CONSOLIDATOR_MAX_CPU_PRESSURE": "101",  # a percentage
    "CONSOLIDATOR_LEASE_TTL_S": "0.0001",
    "CONSOLIDATOR_CONCURRENCY": "10000000",
    "CONSOLIDATOR_RETENTION": "99999999999d",
    "CONSOLIDATOR_METRICS_PORT": "70000",
    "CONSOLIDATOR_METADATA_PATTERN": "session:meta",
    "CONSOLIDATOR_AGENT_LOCK_PATTERN": "chat:lock",
}
BAD_URLS = {
    "CONSOLIDATOR_REDIS_URL": ["foo", "http://x", "redis://127.0.0.1:99999/0"],
    "CONSOLIDATOR_DATABASE_URL": ["foo", "mysql://x/y", "postgresql://u@h:notaport/x"],
}


@pytest.mark.parametrize(("name", "value"), REFUSED.items())
def test_a_value_that_would_fail_at_run_time_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert refused.value.errors()[0]["loc"] == (name.removeprefix("CONSOLIDATOR_").lower(),)


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, vs in BAD_URLS.items() for v in vs])
def test_a_url_of_the_wrong_kind_is_refused_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value.replace("://", "://:s3cret@", 1))
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert "s3cret" not in refused.value.errors()[0]["msg"]


def test_log_level_is_read_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSOLIDATOR_LOG_LEVEL", "WARNING")
    assert Settings().log_level is LogLevel.WARNING


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("concurrncy = 4\n", "unknown setting(s) concurrncy"),
        ("concurrency = \n", "config file"),
        (None, "No such file"),
    ],
)
def test_a_config_file_that_is_missing_broken_or_misspelt_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str | None, says: str
) -> None:
    path = tmp_path / "consolidator.toml"
    if text is not None:
        path.write_text(text)
    monkeypatch.setenv("CONSOLIDATOR_CONFIG_FILE", str(path))
    with pytest.raises(ConfigFileError, match=r"config file .*") as refused:
        Settings()
    assert says in str(refused.value)


def test_a_good_config_file_is_used_and_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "consolidator.toml"
    path.write_text('concurrency = 7\nkey_pattern = "chat:{id}"\n')
    monkeypatch.setenv("CONSOLIDATOR_CONFIG_FILE", str(path))
    monkeypatch.setenv("CONSOLIDATOR_CONCURRENCY", "9")
    settings = Settings()
    assert (settings.concurrency, settings.pattern) == (9, "chat:{id}")


@pytest.mark.parametrize("pattern", ["{id}", "{app}{user}{id}"])
def test_a_key_pattern_that_matches_every_key_is_refused(pattern: str) -> None:
    # With it, other applications' lists would be archived and cut down as conversations.
    with pytest.raises(PatternError, match="no fixed part"):
        KeyPattern.compile(pattern)


def test_every_setting_is_documented_in_the_readme() -> None:
    # The README's tables are where operators look: a setting missing there does not exist
    # for them. A row may name two that share a prefix (`CONSOLIDATOR_LOG_FORMAT` / `_LOG_LEVEL`).
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = []
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        variable = alias if isinstance(alias, str) else f"CONSOLIDATOR_{name.upper()}"
        tails = [variable[i:] for i, c in enumerate(variable) if c == "_"]
        if f"`{variable}`" not in readme and not any(f"/ `{t}`" in readme for t in tails):
            missing.append(variable)
    assert missing == []
