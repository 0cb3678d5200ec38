"""Prompt-lookup decoding (engine.prompt_lookup) says what the token-by-token loop says, in fewer forwards.

A guess is checked in one multi-token forward and only the tokens the model picks itself (its argmax) are kept,
so the responses are the same ids; the cache is cropped back to what was kept, so later frames see the cache
the token-by-token loop leaves (their P(speak) equal to float noise, as with multi-frame forwards).
"""

import pytest
import torch

from conftest import bias_separator, build_tiny_llm
from livevlm.config import ConfigError, EngineConfig
from livevlm.engine import ResponseEvent, StreamSession, TokenEvent
from livevlm.model import LiveModel
from test_engine import D, fmt, frames, mixed_threshold, p_speak, random_model, responses  # noqa: F401 (fixtures)


@pytest.fixture
def varied_model(fmt):  # noqa: F811
    """The tiny random LLM with its weights (not its norms) ten times larger: at the usual scale it says one
    token over and over, so every guess would be right; this one's responses vary, so some guesses are wrong."""
    llm = build_tiny_llm(len(fmt.tokenizer))
    with torch.no_grad():
        for name, weight in llm.named_parameters():
            if "norm" not in name:
                weight.mul_(10.0)
    torch.manual_seed(1)
    return bias_separator(LiveModel(llm, D, fmt.placeholder_id).eval(), fmt.separator_id, 3.0)


def stream(model, layout, prompt_lookup: int, threshold: float, tokens, times) -> tuple[list, StreamSession, dict]:
    """40 frames one at a time, a query at frame 13; → events (with TokenEvents), the session, and counts of
    the LLM's forwards and of cache crops (a crop here = a guess not kept whole: one frame per forward)."""
    config = EngineConfig(threshold=threshold, max_new_tokens=12, max_frames_per_forward=1,
                          prompt_lookup=prompt_lookup, repetition_penalty=1.1)  # applied per guessed position
    session = StreamSession(model, layout, config, record_fed_ids=True)
    counts = {"forwards": 0, "crops": 0}
    hook = model.llm.register_forward_hook(lambda *args: counts.__setitem__("forwards", counts["forwards"] + 1))
    crop = session._cache.crop

    def counting_crop(tokens_to_remove: int) -> None:
        counts["crops"] += 1
        crop(tokens_to_remove)

    session._cache.crop = counting_crop
    events = list(session.step_events(tokens[:13], times[:13]))
    session.add_query("What just happened?")
    events += list(session.step_events(tokens[13:], times[13:]))
    hook.remove()
    return events, session, counts


def test_prompt_lookup_gives_the_token_by_token_responses_in_fewer_forwards(fmt, varied_model):  # noqa: F811
    tokens, times = frames(40)
    threshold = mixed_threshold(varied_model, fmt, tokens, times)
    plain, plain_session, plain_counts = stream(varied_model, fmt, 0, threshold, tokens, times)
    lookup, lookup_session, lookup_counts = stream(varied_model, fmt, 4, threshold, tokens, times)
    said = [e for e in plain if isinstance(e, ResponseEvent)]
    assert len(said) >= 4 and any(e.answer_to_query for e in said)
    assert responses(lookup) == responses(plain)
    assert [e.token_ids for e in lookup if isinstance(e, ResponseEvent)] == [e.token_ids for e in said]
    assert [(e.time_s, e.token_id) for e in lookup if isinstance(e, TokenEvent)] == \
        [(e.time_s, e.token_id) for e in plain if isinstance(e, TokenEvent)]  # every token streamed, in order
    assert lookup_session.fed_ids == plain_session.fed_ids
    assert lookup_session.cache_length == plain_session.cache_length == len(lookup_session.cache_ids)
    assert max(abs(a - b) for a, b in zip(p_speak(lookup), p_speak(plain), strict=True)) < 1e-4
    assert plain_counts["crops"] == 0 and lookup_counts["crops"] >= 1  # some guesses were cut short
    assert lookup_counts["forwards"] < plain_counts["forwards"]  # and some were kept


def test_a_guess_never_runs_past_max_new_tokens(fmt, random_model):  # noqa: F811
    """A response cut at max_new_tokens leaves its last token unfed (it goes in with the eos), guesses or not."""
    tokens, times = frames(30, seed=2)
    events = {}
    for lookup in (0, 8):
        config = EngineConfig(threshold=1.0, max_new_tokens=5, max_frames_per_forward=1, prompt_lookup=lookup)
        session = StreamSession(random_model, fmt, config, record_fed_ids=True)
        events[lookup] = (responses(session.step(tokens, times)), session.fed_ids, session.cache_length)
    assert events[8] == events[0]


@pytest.mark.parametrize("settings, named", [({"prompt_lookup": -1}, "engine.prompt_lookup must be >= 0"),
                                             ({"prompt_lookup": 4, "temperature": 0.7}, "engine.temperature=0"),
                                             ({"prompt_lookup": 4, "decode": "static"}, "engine.decode='eager'")])
def test_prompt_lookup_settings_it_cannot_honour_are_named(settings, named):
    with pytest.raises(ConfigError, match=named):
        EngineConfig(**settings)
