"""Grouped-query attention without the KV-cache copy: the same outputs as transformers' SDPA path."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import bias_separator
from livevlm.attention import NAME, gqa_sdpa_attention, use_cache_friendly_attention
from livevlm.config import EngineConfig, FormatConfig
from livevlm.engine import FrameEvent, ResponseEvent, StreamSession
from livevlm.model import LiveModel
from livevlm.stream_format import StreamFormat, register_placeholder


class _Module(torch.nn.Module):
    num_key_value_groups = 3


def test_grouped_heads_with_a_mask_equal_the_repeated_heads():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 6, 5, 8, generator=generator)  # 6 query heads, 5 new tokens
    key, value = torch.randn(2, 1, 2, 12, 8, generator=generator)  # 2 KV heads, 12 cached tokens
    mask = torch.ones(5, 12, dtype=torch.bool).tril(diagonal=7)[None, None]  # the new tokens are the last 5
    got, _ = gqa_sdpa_attention(_Module(), query, key, value, mask)
    repeated = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(3, dim=1), value.repeat_interleave(3, dim=1), attn_mask=mask)
    assert got.shape == (1, 5, 6, 8)
    torch.testing.assert_close(got, repeated.transpose(1, 2), rtol=0, atol=1e-6)


@pytest.fixture
def fmt(tiny_tokenizer):
    register_placeholder(tiny_tokenizer)
    return StreamFormat(tiny_tokenizer, FormatConfig(), tokens_per_frame=2)


def _model(fmt, seed: int) -> LiveModel:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fmt.tokenizer), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048)
    llm = LlamaForCausalLM(config).eval()
    return bias_separator(LiveModel(llm, 8, fmt.placeholder_id).eval(), fmt.separator_id, 2.0)


def test_a_stream_says_and_decides_the_same_with_either_attention(fmt):
    tokens = torch.randn(30, 2, 8, generator=torch.Generator().manual_seed(1))
    times = [i / 2 for i in range(30)]

    def run(switch: bool) -> list:
        model = _model(fmt, seed=3)
        if switch:
            assert use_cache_friendly_attention(model.llm)
            assert model.llm.config._attn_implementation == NAME
        session = StreamSession(model, fmt, EngineConfig(threshold=0.6, max_new_tokens=5, max_frames_per_forward=4))
        session.add_query("What is there?")
        return session.step(tokens, times)

    plain, switched = run(False), run(True)
    assert any(isinstance(e, ResponseEvent) for e in plain)  # it speaks, so generation is covered too
    assert [e for e in switched if isinstance(e, ResponseEvent)] == [e for e in plain if isinstance(e, ResponseEvent)]
    p_plain = torch.tensor([e.p_speak for e in plain if isinstance(e, FrameEvent)])
    p_switched = torch.tensor([e.p_speak for e in switched if isinstance(e, FrameEvent)])
    torch.testing.assert_close(p_switched, p_plain, rtol=0, atol=1e-6)


def test_a_model_with_eager_attention_is_left_alone(fmt):
    model = _model(fmt, seed=0)
    model.llm.set_attn_implementation("eager")
    assert not use_cache_friendly_attention(model.llm)
    assert model.llm.config._attn_implementation == "eager"


def test_an_inference_checkpoint_loads_with_it_and_a_trainable_one_without(tiny_checkpoint):
    from livevlm.checkpoint import load_checkpoint

    folder, _ = tiny_checkpoint
    assert load_checkpoint(folder).model.llm.config._attn_implementation == NAME
    assert load_checkpoint(folder, trainable=True).model.llm.config._attn_implementation != NAME
