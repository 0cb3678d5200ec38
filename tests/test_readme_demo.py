"""The README's quick-start excerpt is what the shipped default model says on the demo video.

The excerpt is the first thing a user compares with their own run; a new default model that changes what it
says must come with a new excerpt."""

import re
from pathlib import Path

import livevlm
from livevlm.engine import ResponseEvent
from livevlm.world import demo_video

README = Path(__file__).parent.parent / "README.md"
LINE = re.compile(r"^\[\s*([0-9.]+)s\] (User|Assistant): (.*)$")


def readme_excerpt() -> list[tuple[str, float, str]]:
    """(role, time_s, text) of the first ```text block after "Quick start" (the demo's printed dialogue)."""
    text = README.read_text()
    block = text[text.index("```text", text.index("## Quick start")):]
    block = block[:block.index("```", len("```text"))]
    return [(m[2], float(m[1]), m[3]) for m in map(LINE.match, block.splitlines()) if m]


def test_the_readme_shows_what_the_default_model_says_on_the_demo_video():
    excerpt = readme_excerpt()
    queries = [(time_s, text) for role, time_s, text in excerpt if role == "User"]
    assert queries == [(0.0, "Please narrate the video in real time.")]  # the quick start's command
    video, _ = demo_video(7, 30.0)  # `livevlm stream --demo`'s defaults
    said = [(round(e.time_s, 1), e.text) for e in livevlm.load().stream(video, queries)
            if isinstance(e, ResponseEvent)]
    assert said == [(time_s, text) for role, time_s, text in excerpt if role == "Assistant"]
