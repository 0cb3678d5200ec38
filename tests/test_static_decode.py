"""Static-shape decode steps (engine.decode "static" / "compiled") say what the eager decode loop says.

The static step attends over the cache's whole fixed-capacity buffer with the unfilled part masked, where the
eager forward attends over the filled part only. The masked positions weigh exactly 0 (exp(-inf)), so the
logits differ at most by the order in which the kernel sums the keys: on some CPUs (the AVX2 AMD EPYC of
2026-12-06) PyTorch's SDPA kernel blocks a longer key range differently, and p_speak moves by ~4e-9. So the
events are compared as `test_batch` compares them: times, decisions, token ids and texts exactly, p_speak
within 1e-6.
"""

import pytest
import torch
import torch._dynamo.testing

from livevlm.attention import NAME
from livevlm.config import ConfigError, EngineConfig
from livevlm.engine import ResponseEvent, StreamSession, TokenEvent
from livevlm.engine.kv_cache import StaticStepCache
from livevlm.model import CACHE_KWARG
from test_batch import assert_same_events
from test_engine import fmt, frames, mixed_threshold, random_model, run_stream  # noqa: F401 (fixtures)


@pytest.mark.parametrize("attention", ["sdpa", "eager", NAME])
def test_static_decode_gives_the_eager_events(fmt, random_model, attention):  # noqa: F811
    """Responses and an answer decoded by the static step: the same frame decisions (p_speak within 1e-6), times,
    token ids and texts as the eager loop, so the later frames also saw the same cache. With transformers'
    attention functions and livevlm's (`livevlm.attention`, what loaded checkpoints use on a CPU)."""
    random_model.llm.set_attn_implementation(attention)
    tokens, times = frames(40)
    threshold = mixed_threshold(random_model, fmt, tokens, times)
    caches = []  # the cache of every LLM forward
    random_model.llm.register_forward_pre_hook(lambda module, args, kwargs: caches.append(kwargs[CACHE_KWARG]),
                                               with_kwargs=True)
    runs = {decode: run_stream(random_model, fmt, EngineConfig(threshold=threshold, max_new_tokens=6, decode=decode),
                               tokens, times, query_at=13)[0] for decode in ("eager", "static")}
    said = [e for e in runs["eager"] if isinstance(e, ResponseEvent)]
    assert len(said) >= 4 and any(e.answer_to_query for e in said)
    assert_same_events(runs["static"], runs["eager"])
    # every token after a response's first went through the static step (the last of a cut one is not fed)
    decoded = sum(len(e.token_ids) - (e.reason == "max_tokens") for e in said)
    assert sum(isinstance(cache, StaticStepCache) for cache in caches) == decoded > 20


def bounded_stream(model, layout, decode: str, threshold: float, tokens, times) -> tuple[list, int]:
    """The stream of `test_cache_stays_bounded_on_a_long_stream` (100-token budget), 5 frames a step, with
    TokenEvents; → (events, responses decoded after the cache was first rebuilt)."""
    config = EngineConfig(threshold=threshold, max_new_tokens=6, max_frames_per_forward=4, decode=decode)
    session = StreamSession(model, layout, config, system_prompt="Watch.", max_cache_tokens=100)
    events, after_rebuild = [], 0
    for start in range(0, len(times), 5):
        new = list(session.step_events(tokens[start:start + 5], times[start:start + 5]))
        after_rebuild += session.windowed * sum(isinstance(e, ResponseEvent) for e in new)
        events += new
    return events, after_rebuild


def test_static_decode_gives_the_eager_events_across_rebuilds(fmt, random_model):  # noqa: F811
    """The bounded-memory rebuilds clear and refill the buffers the static step writes in place (stale keys
    past the fill mark, masked): the events stay those of the eager loop."""
    tokens, times = frames(40, seed=3)
    threshold = mixed_threshold(random_model, fmt, tokens[:20], times[:20])
    eager, after_rebuild = bounded_stream(random_model, fmt, "eager", threshold, tokens, times)
    static, _ = bounded_stream(random_model, fmt, "static", threshold, tokens, times)
    assert after_rebuild >= 3  # rebuilt early enough for responses to be decoded on a refilled cache
    assert_same_events(static, eager)


def test_compiled_decode_gives_the_eager_tokens_from_one_graph(fmt, random_model):  # noqa: F811
    """torch.compile captures the static step whole (dynamo's graph capture, run by the "aot_eager" backend:
    inductor's code generation takes ~50 s on a CPU) once, and replays it for every token of every response."""
    torch._dynamo.reset()  # what earlier tests compiled counts towards dynamo's recompile limit
    backend = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    tokens, times = frames(12)
    config = EngineConfig(threshold=1.0, max_new_tokens=6)  # every frame speaks (6 tokens each)
    eager = StreamSession(random_model, fmt, config).step(tokens, times)
    compiled = StreamSession(random_model, fmt, EngineConfig(threshold=1.0, max_new_tokens=6, decode="compiled"),
                             compile_backend=backend)
    events = list(compiled.step_events(tokens, times))
    said = [e.token_ids for e in eager if isinstance(e, ResponseEvent)]
    assert [e.token_ids for e in events if isinstance(e, ResponseEvent)] == said and len(said) == 12
    assert sum(isinstance(e, TokenEvent) for e in events) == sum(map(len, said)) > 50
    assert backend.frame_count == 1  # one graph, no break, no recompilation


def test_an_unknown_decode_mode_is_refused_naming_the_valid_ones():
    """A typo in a recipe's engine.decode fails when the config is made, not at the first response."""
    with pytest.raises(ConfigError, match=r"engine.decode must be one of \['eager', 'static', 'compiled'\], "
                                          r"got 'cuda-graphs'"):
        EngineConfig(decode="cuda-graphs")
