"""The streaming session on tiny models: training layout, multi-frame == per-frame, teacher forcing, bounded memory."""

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import bias_separator
from livevlm.config import EngineConfig, FormatConfig
from livevlm.engine import FrameEvent, QueryEvent, ResponseEvent, StreamSession, TokenEvent
from livevlm.model import LiveModel
from livevlm.stream_format import Frames, Message, StreamFormat, register_placeholder

N, D = 2, 8  # tokens per frame, frame-token width
SCRIPT = "A red circle"  # what the scripted LLM says after every "Assistant:"


@pytest.fixture
def fmt(tiny_tokenizer):
    register_placeholder(tiny_tokenizer)
    return StreamFormat(tiny_tokenizer, FormatConfig(), tokens_per_frame=N)


@pytest.fixture
def random_model(fmt, tiny_llm):
    """Random weights, with the separator as the argmax at frames (P(sep) still varies frame to frame)."""
    torch.manual_seed(1)
    return bias_separator(LiveModel(tiny_llm, D, fmt.placeholder_id).eval(), fmt.separator_id, 3.0)


def scripted_model(fmt) -> LiveModel:
    """A real 1-layer Llama whose weights make it a bigram machine: after ":" it says SCRIPT, then eos.

    Attention and MLP outputs are zeroed, so the last hidden state is the current token's embedding; the
    embeddings are one-hot and the LM head maps each script token to the next. Frames (connector outputs)
    give a zero hidden state, so their decisions are whatever the threshold makes them (1.0 / 0.0).
    """
    vocab = len(fmt.tokenizer)
    hidden = vocab + (-vocab) % 8
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    llm = LlamaForCausalLM(config).eval()
    chain = [fmt.speak_ids()[-1], *fmt.response_ids(SCRIPT), fmt.eos_id]
    assert len(set(chain)) == len(chain), "the script must not repeat a token"
    with torch.no_grad():
        for layer in llm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        llm.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        llm.lm_head.weight.zero_()
        for current, following in zip(chain, chain[1:], strict=False):
            llm.lm_head.weight[following, current] = 1.0
    torch.manual_seed(2)
    model = LiveModel(llm, D, fmt.placeholder_id).eval()
    with torch.no_grad():  # frames give a zero hidden state: all logits 0 but the separator's small bias,
        model.connector.fc2.weight.zero_()  # so frames stay silent at θ = 0 and speak at θ = 1; the script's
        model.connector.fc2.bias.zero_()  # logits (1.0) still beat the bias (0.5) while it talks
    return bias_separator(model, fmt.separator_id, 0.5)


def frames(count: int, seed: int = 0) -> tuple[torch.Tensor, list[float]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, N, D, generator=generator), [i / 2 for i in range(count)]


def responses(events) -> list[tuple[float, str, bool]]:
    return [(e.time_s, e.text, e.answer_to_query) for e in events if isinstance(e, ResponseEvent)]


def p_speak(events) -> list[float]:
    return [e.p_speak for e in events if isinstance(e, FrameEvent)]


# ---------------------------------------------------------------------------------------------------
# the training layout


def test_query_right_after_a_response_is_fed_in_the_training_layout(fmt):
    # every frame speaks
    session = StreamSession(scripted_model(fmt), fmt, EngineConfig(threshold=1.0), record_fed_ids=True)
    tokens, times = frames(2)
    first = session.step(tokens[:1], times[:1])
    session.add_query("Where?", time_s=0.2)
    second = session.step(tokens[1:], times[1:])
    assert responses(first) == [(0.0, SCRIPT, False)]
    assert [e for e in second if isinstance(e, QueryEvent)] == [QueryEvent(0.2, "Where?")]
    assert responses(second) == [(0.2, SCRIPT, True), (0.5, SCRIPT, False)]
    expected = fmt.render([Frames(1), Message("assistant", SCRIPT), Message("user", "Where?"),
                           Message("assistant", SCRIPT), Frames(1), Message("assistant", SCRIPT)])
    assert session.fed_ids == expected.input_ids


def test_a_response_cut_by_max_new_tokens_still_leaves_the_training_layout(fmt):
    session = StreamSession(scripted_model(fmt), fmt, EngineConfig(threshold=1.0, max_new_tokens=4),
                            record_fed_ids=True)
    events = session.step(*frames(2))
    cut = fmt.tokenizer.decode(fmt.response_ids(SCRIPT)[:4]).strip()
    assert [(e.text, e.reason) for e in events if isinstance(e, ResponseEvent)] == [(cut, "max_tokens")] * 2
    expected = fmt.render([Frames(1), Message("assistant", cut), Frames(1), Message("assistant", cut)])
    assert session.fed_ids == expected.input_ids
    # the cache holds everything but the last pending tokens (the cut token and eos ride on the next forward)
    assert session.cache_ids == session.fed_ids[:-2] and session.cache_length == len(session.cache_ids)


def test_a_default_session_keeps_no_record_of_the_ids_it_fed(fmt):
    """An endless stream's memory stays bounded: the id record is for checking layouts only."""
    session = StreamSession(scripted_model(fmt), fmt, EngineConfig(threshold=1.0))
    session.add_query("Narrate.", time_s=0.0)
    session.step(*frames(3))
    assert session.fed_ids == [] and session.cache_length > 0


def test_a_query_before_the_first_frame_follows_that_frame(fmt):
    session = StreamSession(scripted_model(fmt), fmt, EngineConfig(threshold=1.0), record_fed_ids=True)
    session.add_query("Narrate.", time_s=0.0)
    events = session.step(*frames(1))
    assert [type(e) for e in events] == [FrameEvent, QueryEvent, ResponseEvent]  # frame 0 does not speak itself
    expected = fmt.render([Frames(1), Message("user", "Narrate."), Message("assistant", SCRIPT)])
    assert session.fed_ids == expected.input_ids


def test_flush_answers_queries_left_at_the_end_of_a_stream(fmt):
    session = StreamSession(scripted_model(fmt), fmt, EngineConfig(threshold=0.0))
    session.step(*frames(3))
    session.add_query("What happened?")
    assert responses(session.flush()) == [(1.0, SCRIPT, True)]  # at the time of the last frame


def test_step_events_yields_each_response_token_before_its_response(fmt):
    session = StreamSession(scripted_model(fmt), fmt, EngineConfig(threshold=1.0, max_frames_per_forward=1))
    session.add_query("Narrate.", time_s=0.0)
    events = list(session.step_events(*frames(2)))
    script = fmt.response_ids(SCRIPT)
    assert [type(e) for e in events] == ([FrameEvent, QueryEvent] + [TokenEvent] * len(script) + [ResponseEvent]
                                         + [FrameEvent] + [TokenEvent] * len(script) + [ResponseEvent])
    answer, spoken = [e for e in events if isinstance(e, ResponseEvent)]
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert [e.token_id for e in tokens] == list(answer.token_ids) + list(spoken.token_ids) == script * 2
    assert [(e.time_s, e.answer_to_query) for e in tokens] == [(0.0, True)] * len(script) + [(0.5, False)] * len(
        script)


def test_step_is_step_events_without_the_tokens(fmt):
    config = EngineConfig(threshold=1.0, max_new_tokens=4)
    listed = StreamSession(scripted_model(fmt), fmt, config).step(*frames(3))
    streamed = list(StreamSession(scripted_model(fmt), fmt, config).step_events(*frames(3)))
    assert listed == [e for e in streamed if not isinstance(e, TokenEvent)]
    assert any(isinstance(e, TokenEvent) for e in streamed)


def test_flush_events_answers_a_query_with_no_frame_coming(fmt):
    session = StreamSession(scripted_model(fmt), fmt, EngineConfig(threshold=0.0))
    session.step(*frames(2))
    session.add_query("And now?")
    events = list(session.flush_events())
    assert [type(e) for e in events] == [QueryEvent] + [TokenEvent] * len(fmt.response_ids(SCRIPT)) + [ResponseEvent]
    assert events[-1].text == SCRIPT and list(session.flush_events()) == []


# ---------------------------------------------------------------------------------------------------
# decisions: multi-frame forwards and teacher forcing


def mixed_threshold(model, fmt, tokens, times) -> float:
    """A threshold between observed P(sep) values, so that about a quarter of the frames speak at first."""
    silent = StreamSession(model, fmt, EngineConfig(threshold=0.0, max_frames_per_forward=1))
    p_sep = sorted(1.0 - p for p in p_speak(silent.step(tokens, times)))
    k = len(p_sep) // 4
    return (p_sep[k - 1] + p_sep[k]) / 2


def run_stream(model, fmt, config: EngineConfig, tokens, times, query_at: int) -> tuple[list, StreamSession]:
    session = StreamSession(model, fmt, config, record_fed_ids=True)
    events = session.step(tokens[:query_at], times[:query_at])
    session.add_query("What just happened?")
    events += session.step(tokens[query_at:], times[query_at:])
    return events, session


def test_multi_frame_forward_gives_the_per_frame_events(fmt, random_model):
    tokens, times = frames(40)
    threshold = mixed_threshold(random_model, fmt, tokens, times)
    calls = []
    random_model.llm.register_forward_hook(lambda *args: calls.append(1))
    single, single_session = run_stream(random_model, fmt, EngineConfig(threshold=threshold, max_new_tokens=6,
                                                                        max_frames_per_forward=1),
                                        tokens, times, query_at=13)
    single_calls = len(calls)
    multi, multi_session = run_stream(random_model, fmt, EngineConfig(threshold=threshold, max_new_tokens=6,
                                                                      max_frames_per_forward=8),
                                      tokens, times, query_at=13)
    spoken = [r for r in responses(single) if not r[2]]
    assert 3 <= len(spoken) <= 30  # mixed decisions, so rollbacks happen
    assert responses(multi) == responses(single)
    assert [e.time_s for e in multi if isinstance(e, FrameEvent)] == times
    assert max(abs(a - b) for a, b in zip(p_speak(multi), p_speak(single), strict=True)) < 1e-4
    assert multi_session.fed_ids == single_session.fed_ids
    assert len(calls) - single_calls < single_calls  # fewer LLM forwards


def test_per_frame_decisions_equal_one_teacher_forced_forward(fmt, random_model):
    tokens, times = frames(12)
    session = StreamSession(random_model, fmt, EngineConfig(threshold=0.0, max_frames_per_forward=5),
                            record_fed_ids=True)
    got = p_speak(session.step(tokens, times))
    rendered = fmt.render([Frames(12)])
    assert session.fed_ids == rendered.input_ids
    with torch.no_grad():
        logits, _, _ = random_model(torch.tensor([rendered.input_ids]), tokens)
    frame_ends = [i for i, is_frame in enumerate(rendered.frame_target) if is_frame]
    expected = 1.0 - torch.softmax(logits[0, frame_ends].float(), dim=-1)[:, fmt.separator_id]
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), expected.double(), atol=1e-5, rtol=0)


def test_decisions_at_a_decision_token_equal_one_teacher_forced_forward(tiny_tokenizer, tiny_llm):
    """With `format.decision` the engine reads each frame's decision at that token, as training labels it."""
    register_placeholder(tiny_tokenizer)
    fmt = StreamFormat(tiny_tokenizer, FormatConfig(decision="|"), tokens_per_frame=N)
    torch.manual_seed(1)
    model = bias_separator(LiveModel(tiny_llm, D, fmt.placeholder_id).eval(), fmt.separator_id, 3.0)
    tokens, times = frames(12)
    session = StreamSession(model, fmt, EngineConfig(threshold=0.0, max_frames_per_forward=5), record_fed_ids=True)
    got = p_speak(session.step(tokens, times))
    assert session.fed_ids == fmt.render([Frames(12)]).input_ids
    expected = teacher_forced_p_speak(model, fmt, [Frames(12)], tokens)
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), expected, atol=1e-5, rtol=0)


def test_a_rebuilt_cache_keeps_the_decision_tokens(tiny_tokenizer):
    register_placeholder(tiny_tokenizer)
    fmt = StreamFormat(tiny_tokenizer, FormatConfig(decision="|"), tokens_per_frame=N)
    session = StreamSession(scripted_model(fmt), fmt, EngineConfig(threshold=0.0, window_frames=6))
    tokens, times = frames(20)
    session.add_query("Narrate.", time_s=0.0)
    session.step(tokens, times)
    kept = session.cache_ids.count(fmt.placeholder_id) // N
    assert session.windowed and 1 <= kept <= 6
    expected = fmt.render([Message("user", "Narrate."), Message("assistant", SCRIPT), Frames(kept)])
    assert session.cache_ids == expected.input_ids


def test_a_frame_delta_model_names_the_width_before_the_doubling(fmt, tiny_llm):
    model = LiveModel(tiny_llm, 2 * D, fmt.placeholder_id, frame_delta=True).eval()
    with pytest.raises(ValueError, match=f"D={2 * D} wide but the model takes {D} \\(before frame_delta doubles it\\)"):
        StreamSession(model, fmt, EngineConfig()).step(torch.zeros(1, N, 2 * D), [0.0])


@pytest.fixture
def delta_model(fmt, tiny_llm):
    """A random frame_delta model (raw frame tokens D wide, the connector 2D), silent at most frames."""
    torch.manual_seed(1)
    return bias_separator(LiveModel(tiny_llm, 2 * D, fmt.placeholder_id, frame_delta=True).eval(),
                          fmt.separator_id, 3.0)


def teacher_forced_p_speak(model, fmt, items, tokens=None, inputs=None) -> torch.Tensor:
    """p_speak at every frame end of one forward over the render of `items`, fed the raw `tokens` `[T, N, D]`
    as training feeds them (the model derives its inputs), or the connector's own `inputs` `[T·N, 2D]`."""
    rendered = fmt.render(items)
    ids = torch.tensor([rendered.input_ids])
    with torch.no_grad():
        if inputs is None:
            logits, _, _ = model(ids, tokens)
        else:
            logits = model.llm(inputs_embeds=model.embed_inputs(ids, inputs)).logits
    frame_ends = [i for i, is_frame in enumerate(rendered.frame_target) if is_frame]
    return (1.0 - torch.softmax(logits[0, frame_ends].float(), dim=-1)[:, fmt.separator_id]).double()


@pytest.mark.parametrize("per_forward", [1, 5])
def test_frame_delta_decisions_equal_one_teacher_forced_forward(fmt, delta_model, per_forward):
    """The engine (pieces of a stream, its own previous frame) and training (the whole stream) give the
    model the same inputs: the per-frame decisions equal one forward over the raw tokens."""
    tokens, times = frames(9)
    session = StreamSession(delta_model, fmt, EngineConfig(threshold=0.0, max_frames_per_forward=per_forward),
                            record_fed_ids=True)
    got = []
    for start, end in ((0, 2), (2, 3), (3, 9)):
        got += p_speak(session.step(tokens[start:end], times[start:end]))
    assert session.fed_ids == fmt.render([Frames(9)]).input_ids
    expected = teacher_forced_p_speak(delta_model, fmt, [Frames(9)], tokens)
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), expected, atol=1e-5, rtol=0)
    # and the changes matter: fed as nine one-frame streams (every change zero), the decisions differ
    zeroed = torch.cat([delta_model.frame_inputs(tokens[t:t + 1]) for t in range(9)]).flatten(0, 1)
    assert (teacher_forced_p_speak(delta_model, fmt, [Frames(9)], inputs=zeroed) - expected).abs().max() > 1e-3


def test_a_rebuilt_frame_delta_cache_replays_the_kept_frames_inputs_exactly(fmt, delta_model):
    """The record keeps raw frames; a rebuild derives their inputs as when they were first fed, so the first
    kept frame keeps its change since the dropped frame before it (exactly: the connector sees the same)."""
    session = StreamSession(delta_model, fmt, EngineConfig(threshold=0.0, window_frames=6, max_frames_per_forward=1))
    tokens, times = frames(20)
    fed = []  # the connector's inputs of every forward, [P, 2D]
    delta_model.connector.register_forward_hook(lambda module, args, out: fed.append(args[0].clone()))
    session.step(tokens[:19], times[:19])
    kept = session.cache_ids.count(fmt.placeholder_id) // N
    assert session.windowed and kept == 4  # rebuilt before frame 18 to frames 15-17, then frame 18 fed
    assert session.cache_ids == fmt.render([Frames(kept)]).input_ids
    replayed, frame_18 = fed[-2:]
    assert torch.equal(replayed, delta_model.frame_inputs(tokens[15:18], previous=tokens[14]).flatten(0, 1))
    assert torch.equal(frame_18, delta_model.frame_inputs(tokens[18:19], previous=tokens[17]).flatten(0, 1))
    first_time = [inputs for inputs in fed if len(inputs) == N]  # frames 0-18, one a forward
    assert torch.equal(torch.cat(first_time[15:18]), replayed)  # what frames 15-17 were fed with the first time
    got = p_speak(session.step(tokens[19:], times[19:]))
    inputs = delta_model.frame_inputs(tokens[15:], previous=tokens[14]).flatten(0, 1)
    expected = teacher_forced_p_speak(delta_model, fmt, [Frames(kept + 1)], inputs=inputs)
    assert got == pytest.approx(expected[-1:].tolist(), abs=1e-5)


def test_sampling_is_reproducible_from_the_seed(fmt, random_model):
    tokens, times = frames(4)
    config = EngineConfig(threshold=1.0, max_new_tokens=5, temperature=1.0, top_p=0.9, repetition_penalty=1.3)
    runs = [responses(StreamSession(random_model, fmt, config, seed=seed).step(tokens, times)) for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_frame_tokens_of_the_wrong_shape_are_refused(fmt, random_model):
    session = StreamSession(random_model, fmt, EngineConfig())
    with pytest.raises(ValueError, match="N=3 tokens per frame"):
        session.step(torch.zeros(1, 3, D), [0.0])
    with pytest.raises(ValueError, match="T = len"):
        session.step(torch.zeros(2, N, D), [0.0])
    with pytest.raises(ValueError, match=f"D={D + 3} wide but the model takes {D};"):
        session.step(torch.zeros(1, N, D + 3), [0.0])


# ---------------------------------------------------------------------------------------------------
# bounded memory


def test_cache_stays_bounded_on_a_long_stream(fmt, random_model, caplog):
    tokens, times = frames(200, seed=3)
    config = EngineConfig(threshold=mixed_threshold(random_model, fmt, tokens[:40], times[:40]), max_new_tokens=6,
                          max_frames_per_forward=4)
    session = StreamSession(random_model, fmt, config, system_prompt="Watch.", max_cache_tokens=100)
    lengths = []
    with caplog.at_level(logging.INFO, logger="livevlm.engine.session"):
        for start in range(0, 200, 5):
            session.step(tokens[start:start + 5], times[start:start + 5])
            lengths.append(session.cache_length)
    assert max(lengths) <= 100
    assert min(lengths[10:]) >= 25  # it drops to about half the budget, not to nothing
    assert session.frames_seen == 200
    assert sum("sliding window" in r.message for r in caplog.records) == 1


def test_the_window_changes_nothing_before_the_budget_is_reached(fmt, random_model):
    tokens, times = frames(120, seed=4)
    config = EngineConfig(threshold=mixed_threshold(random_model, fmt, tokens[:40], times[:40]), max_new_tokens=6)
    bounded = StreamSession(random_model, fmt, config, system_prompt="Watch.", max_cache_tokens=300)
    unbounded = StreamSession(random_model, fmt, config, system_prompt="Watch.")
    before = []
    for i in range(120):
        events = bounded.step(tokens[i:i + 1], times[i:i + 1])
        if bounded.windowed:
            break
        before += events
    assert len(p_speak(before)) >= 40  # the window started late enough to compare something
    same_calls = [e for i in range(len(p_speak(before))) for e in unbounded.step(tokens[i:i + 1], times[i:i + 1])]
    assert same_calls == before  # exact: the same forwards on the same cache


def test_the_rebuilt_cache_is_the_render_of_the_kept_conversation(fmt, random_model):
    """A query stays pinned after its frames are dropped; the cache equals a fresh render and forward."""
    session = StreamSession(scripted_model(fmt), fmt, EngineConfig(threshold=0.0, window_frames=6))
    tokens, times = frames(20)
    session.add_query("Narrate.", time_s=0.0)
    session.step(tokens[:19], times[:19])
    kept = session.cache_ids.count(fmt.placeholder_id) // N
    assert session.windowed and 1 <= kept <= 6
    expected = fmt.render([Message("user", "Narrate."), Message("assistant", SCRIPT), Frames(kept)])
    assert session.cache_ids == expected.input_ids
    # the next decision equals one forward over the same conversation from scratch (contiguous positions)
    got = p_speak(session.step(tokens[19:], times[19:]))
    fresh = fmt.render([Message("user", "Narrate."), Message("assistant", SCRIPT), Frames(kept + 1)])
    with torch.no_grad():
        logits, _, _ = session.model(torch.tensor([fresh.input_ids]), tokens[19 - kept:])
    expected_p = 1.0 - torch.softmax(logits[0, -1].float(), dim=-1)[fmt.separator_id].item()
    assert got == pytest.approx([expected_p], abs=1e-5)


def test_a_frame_window_holds_at_most_that_many_frames(fmt, random_model):
    session = StreamSession(random_model, fmt, EngineConfig(threshold=0.0, window_frames=8, max_frames_per_forward=3))
    tokens, times = frames(50)
    held = []
    for start in range(0, 50, 3):
        session.step(tokens[start:start + 3], times[start:start + 3])
        held.append(session.cache_ids.count(fmt.placeholder_id) // N)
    assert max(held) <= 8 and min(held[5:]) >= 4


def test_a_budget_too_small_for_one_response_is_refused(fmt, random_model):
    with pytest.raises(ValueError, match="max_cache_tokens=50 is too small"):
        StreamSession(random_model, fmt, EngineConfig(), max_cache_tokens=50)
