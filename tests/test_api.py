"""The Python API (`livevlm.load`, `LiveVLM.stream`, `livevlm.evaluate`) and the README's example."""

import re
from pathlib import Path

import pytest

import livevlm
from livevlm.api import PROMPT_LOOKUP
from livevlm.config import ConfigError
from livevlm.engine import FrameEvent, QueryEvent, ResponseEvent, TokenEvent
from livevlm.video import VideoError

README = Path(__file__).parent.parent / "README.md"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    ckpt, video = tiny_checkpoint
    return livevlm.load(ckpt, device="cpu"), video


def test_a_stream_yields_typed_events_in_order_and_a_summary(tiny):
    model, video = tiny
    stream = model.stream(video, queries=[(1.0, "Narrate.")], threshold=0.0, max_new_tokens=3)
    assert stream.summary is None
    events = list(stream)
    frames = [e for e in events if isinstance(e, FrameEvent)]
    assert [e.time_s for e in frames] == [i / 2 for i in range(12)]  # 6 s at the model's 2 fps
    query = next(i for i, e in enumerate(events) if isinstance(e, QueryEvent))
    assert events[query] == QueryEvent(1.0, "Narrate.")
    answer = next(i for i in range(query + 1, len(events)) if isinstance(events[i], ResponseEvent))
    tokens = events[query + 1:answer]  # the answer's tokens as they were decoded, then the answer
    assert all(isinstance(e, TokenEvent) for e in tokens) and events[answer].answer_to_query
    assert tuple(e.token_id for e in tokens) == events[answer].token_ids and len(tokens) >= 1
    assert stream.summary.frames == 12 and stream.threshold == 0.0
    assert stream.summary.responses == sum(isinstance(e, ResponseEvent) for e in events)


def test_the_same_stream_twice_says_the_same(tiny):
    model, video = tiny
    runs = [[e for e in model.stream(video, threshold=0.5, max_new_tokens=3) if not isinstance(e, FrameEvent)]
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_bad_input_is_refused_before_the_stream_starts(tiny, tmp_path):
    model, video = tiny
    with pytest.raises(ConfigError, match="≥ 0"):
        model.stream(video, queries=[(-5.0, "Narrate.")])
    with pytest.raises(ConfigError, match=r"not in \[0, 1\]"):
        model.stream(video, threshold=1.5)
    with pytest.raises(VideoError, match="does not exist"):
        model.stream(tmp_path / "missing.mp4")


def test_the_static_decode_step_says_what_the_eager_loop_says(tiny):
    """`decode="static"` through the API: the whole stream's responses as the default eager decoding (the
    engine's exactness tests are in test_static_decode.py); an unknown mode is refused before streaming."""
    model, video = tiny
    runs = {decode: [e for e in model.stream(video, queries=[(1.0, "Narrate.")], threshold=0.5, max_new_tokens=3,
                                             decode=decode) if isinstance(e, ResponseEvent)]
            for decode in ("eager", "static")}
    assert runs["static"] == runs["eager"] and runs["eager"]
    with pytest.raises(ConfigError, match="engine.decode must be one of"):
        model.stream(video, decode="fast")


def test_prompt_lookup_is_on_with_eager_decoding_and_says_the_same(tiny):
    """The API guesses tokens (`PROMPT_LOOKUP`) with eager decoding only, and the stream says what it says
    token by token (the engine's own tests: test_prompt_lookup.py)."""
    model, video = tiny
    assert model.engine_config().prompt_lookup == PROMPT_LOOKUP > 0
    assert model.engine_config(decode="static").prompt_lookup == 0
    assert model.engine_config(prompt_lookup=0).prompt_lookup == 0
    runs = {lookup: [e for e in model.stream(video, queries=[(1.0, "Narrate.")], threshold=0.5, max_new_tokens=8,
                                             prompt_lookup=lookup) if isinstance(e, ResponseEvent | TokenEvent)]
            for lookup in (0, None)}
    assert runs[None] == runs[0] and runs[0]
    with pytest.raises(ConfigError, match="engine.decode='eager'"):
        model.stream(video, decode="static", prompt_lookup=4)


def test_without_a_threshold_the_models_recommended_one_runs(tiny):
    model, _ = tiny
    assert model.threshold == 0.725  # the tiny checkpoint stores none: the engine's (the paper's) θ
    assert model.session().config.threshold == 0.725


def readme_python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no ```python block"
    return blocks[0]


def test_the_readme_python_example_runs(capsys):
    """The README's first Python block, exactly as written, on the shipped default model."""
    exec(compile(readme_python_example(), str(README), "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.splitlines()
    assert any(re.match(r"\s*\d+\.\d+s\s+\S", line) for line in printed), printed  # at least one response
    assert re.match(r"\d+(\.\d+)? frames per second", printed[-1]), printed[-1]
