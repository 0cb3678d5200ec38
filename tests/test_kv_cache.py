"""The engine's growing KV cache: same attention results as transformers' DynamicCache, no reallocation."""


import torch
from transformers import DynamicCache

from conftest import build_tiny_llm
from livevlm.engine.kv_cache import MIN_CAPACITY, GrowingLayer, clear_cache, growing_cache
from livevlm.model import CACHE_KWARG


def _feed(llm, cache, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [llm(input_ids=ids[None], use_cache=True, **{CACHE_KWARG: cache}).logits[0] for ids in chunks]


def test_growing_cache_gives_the_logits_of_dynamic_cache_across_regrowth():
    llm = build_tiny_llm(100)
    ids = torch.randint(0, 100, (700,), generator=torch.Generator().manual_seed(0))
    chunks = [ids[:300], ids[300:301], ids[301:650], ids[650:]]  # grows 256 -> 300 -> 600 -> 1200
    expected = _feed(llm, DynamicCache(config=llm.config), chunks)
    cache = growing_cache(llm.config)
    got = _feed(llm, cache, chunks)
    assert all(isinstance(layer, GrowingLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 700
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_crop_then_continue_equals_a_cache_that_never_saw_the_cropped_tokens():
    llm = build_tiny_llm(100)
    ids = torch.randint(0, 100, (40,), generator=torch.Generator().manual_seed(1))
    cache = growing_cache(llm.config)
    _feed(llm, cache, [ids[:30]])
    cache.crop(-10)  # the multi-frame rollback
    assert cache.get_seq_length() == 20
    got = _feed(llm, cache, [ids[30:]])[0]
    expected = _feed(llm, DynamicCache(config=llm.config), [torch.cat([ids[:20], ids[30:]])])[0][-10:]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_clear_and_refill_reuse_the_buffers_and_the_budget_caps_the_capacity():
    llm = build_tiny_llm(100)
    cache = growing_cache(llm.config, max_tokens=300)
    _feed(llm, cache, [torch.arange(250) % 100, torch.arange(40) % 100])  # 256 would double to 512: capped
    layer = cache.layers[0]
    assert layer.capacity == 300
    pointer = layer.keys.data_ptr()
    clear_cache(cache)
    assert cache.get_seq_length() == 0
    _feed(llm, cache, [torch.arange(290) % 100])
    assert layer.capacity == 300 and layer.keys.data_ptr() == pointer  # nothing was allocated


def test_first_allocation_is_the_minimum_capacity():
    llm = build_tiny_llm(100)
    cache = growing_cache(llm.config)
    _feed(llm, cache, [torch.arange(5)])
    assert cache.layers[0].capacity == MIN_CAPACITY and cache.get_seq_length() == 5
