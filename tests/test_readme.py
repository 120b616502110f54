"""The README is what a newcomer reads first: every setting the code reads is in it."""

from __future__ import annotations

from pathlib import Path

from shared.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    missing = [
        f"DARKROOM_{name.upper()}" for name in Settings.model_fields if f"`DARKROOM_{name.upper()}`" not in README
    ]
    assert not missing, f"add these to the README's settings tables: {missing}"


def test_the_first_screen_shows_both_commands_and_the_curls() -> None:
    first_screen = README[: README.index("## The HTTP API")]
    for needle in ("make run", "make test", "curl -s http://127.0.0.1:8000/v1/jobs ", "/v1/jobs/$JOB_ID"):
        assert needle in first_screen, needle
