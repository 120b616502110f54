"""The registry refuses an `upscaler` that is not an upscaler, before any job can be routed to it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.registry import parse_registry

UPSCALER = '[models.x4]\nsource = "builtin:tiny-x4-upscaler"\nupscale_factor = 4\ntasks = ["upscale"]\n'


def test_a_model_upscales_with_its_upscaler_and_everything_else_on_itself() -> None:
    registry = parse_registry(UPSCALER + '[models.sd]\nsource = "builtin:tiny-sd2"\nupscaler = "x4"\n')
    sd = registry.models["sd"]
    assert registry.runs_on(sd, "upscale").name == "x4"
    assert registry.runs_on(sd, "img2img").name == "sd"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('[models.sd]\nsource = "a"\nupscaler = "nope"\n', "upscaler 'nope' is not an upscaler"),
        ('[models.sd]\nsource = "a"\nupscaler = "other"\n[models.other]\nsource = "b"\n', "'other' is not an upscaler"),
        ('[models.x4]\nsource = "a"\nupscale_factor = 4\n', 'must have tasks = ["upscale"]'),
    ],
)
def test_a_bad_upscaler_entry_is_refused(text: str, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        parse_registry(text)
