"""Memory for endless streams: a KV cache written in place, and an allocator that does not fragment.

transformers' `DynamicCache` grows each layer by `torch.cat` at every forward: for a stream fed a frame
at a time for hours, a copy of the whole cache and a fresh, slightly larger block per layer per frame.
Here each layer keeps one buffer `[B, H, capacity, D]`, doubles it when full (capped at the session's
token budget) and writes new keys and values into it; `keys`/`values` are views of the filled part.
Cropping (the multi-frame rollback) and clearing (the bounded-memory rebuild) only move the fill mark, so
after warm-up the cache allocates nothing.

That alone did not keep a stream's process flat: the forwards' temporaries also grow with the cache
(attention scores and masks), and glibc serves them from a heap that fragments.
`livevlm.runtime.pin_mmap_threshold` fixes that part for the whole process (an hour-long stream had peaked
72 % above a 5-minute one); the `livevlm` command applies it, the library never does.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

MIN_CAPACITY = 256  # tokens: the first allocation


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose storage is a preallocated buffer (see the module docstring).

    Args:
        max_capacity: the most tokens worth allocating (the session's budget); more is still accepted (the
            buffer grows to fit), it only stops the doubling from overshooting the budget.
    """

    def __init__(self, max_capacity: int | None = None) -> None:
        super().__init__()
        self.max_capacity = max_capacity
        self._key_buffer: torch.Tensor | None = None  # [B, H, capacity, D]
        self._value_buffer: torch.Tensor | None = None
        self._length = 0

    @property
    def capacity(self) -> int:
        return 0 if self._key_buffer is None else self._key_buffer.shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `[B, H, T, D]` keys and values; → all cached keys and values `[B, H, length, D]` (views)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self._length + key_states.shape[-2]
        if end > self.capacity:
            self._grow(end, key_states, value_states)
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[..., self._length:end, :] = key_states
        self._value_buffer[..., self._length:end, :] = value_states
        self._length = end
        self._refresh_views()
        return self.keys, self.values

    def _grow(self, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        capacity = max(MIN_CAPACITY, 2 * self.capacity)
        if self.max_capacity is not None:
            capacity = min(capacity, self.max_capacity)
        capacity = max(capacity, needed)
        keys = key_states.new_empty(*key_states.shape[:-2], capacity, key_states.shape[-1])
        values = value_states.new_empty(*value_states.shape[:-2], capacity, value_states.shape[-1])
        if self._length:
            assert self._key_buffer is not None and self._value_buffer is not None
            keys[..., :self._length, :] = self._key_buffer[..., :self._length, :]
            values[..., :self._length, :] = self._value_buffer[..., :self._length, :]
        self._key_buffer, self._value_buffer = keys, values

    def _refresh_views(self) -> None:
        assert self._key_buffer is not None and self._value_buffer is not None
        self.keys = self._key_buffer[..., :self._length, :]
        self.values = self._value_buffer[..., :self._length, :]

    def get_seq_length(self) -> int:
        return self._length

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` tokens (a negative count, as `DynamicLayer.crop`)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self._length = max(0, self._length + tokens_to_remove)
        self._refresh_views()

    def clear(self) -> None:
        """Forget every token and keep the buffers (refilling them allocates nothing)."""
        self._length = 0
        if self._key_buffer is not None:
            self._refresh_views()

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        self._length = 0
        super().reset()


def growing_cache(config, max_tokens: int | None = None) -> DynamicCache:
    """A `DynamicCache` for `config` (an LLM config) whose full-attention layers are `GrowingLayer`s.

    Layers of another kind (sliding-window layers of some models) are kept as transformers builds them.
    Without a config, layers are created on first use, all `GrowingLayer`s.
    """
    cache = DynamicCache(config=config)
    if not cache.layers:
        cache.layer_class_to_replicate = GrowingLayer
        return cache
    cache.layers = [GrowingLayer(max_tokens) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def clear_cache(cache: DynamicCache) -> None:
    """Empty a cache in place; `GrowingLayer`s keep their buffers for the refill."""
    for layer in cache.layers:
        if isinstance(layer, GrowingLayer):
            layer.clear()
        else:
            layer.reset()
