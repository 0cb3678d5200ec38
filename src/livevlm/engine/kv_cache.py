"""Memory for endless streams: a KV cache written in place, an allocator that does not fragment, static decode steps.

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

Static-shape decode steps (`StaticStepCache`, the engine's `decode="static"|"compiled"`). Decoding one token
at a time through the growing cache is Python-bound on a GPU: every step has new shapes (the cache is one
longer), so nothing can be captured once and replayed. transformers' answer for `generate` is `StaticCache`:
buffers of a fixed capacity, the new key/value written at a tensor position (`index_copy_`), attention over
the whole buffer with a mask that hides the positions not written yet (`get_mask_sizes` gives the mask
builder the full capacity), so every step has the same shapes and `torch.compile` (CUDA graphs) can replay
it. Here the same buffers serve both: a `GrowingLayer` made with `fixed=True` allocates its budget once
(zeroed, at a static address), frames and prefills keep appending through `update` as before, and a decode
step goes through a `StaticStepCache` view of the same layers, which writes at its `position` tensor and
returns the full buffers; the session then moves the fill mark on by one (`advance`). The default layers
(`fixed=False`) are untouched by any of this.
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

MIN_CAPACITY = 256  # tokens: the first allocation


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose storage is a preallocated buffer (see the module docstring).

    Args:
        max_capacity: the most tokens worth allocating (the session's budget); more is still accepted (the
            buffer grows to fit), it only stops the doubling from overshooting the budget.
        fixed: allocate `max_capacity` at once, zeroed and marked as a static address, so that static decode
            steps (`StaticStepCache`) see the same buffers and shapes at every step. Needs `max_capacity`.
    """

    def __init__(self, max_capacity: int | None = None, fixed: bool = False) -> None:
        super().__init__()
        if fixed and max_capacity is None:
            raise ValueError("a fixed-capacity GrowingLayer needs max_capacity")
        self.max_capacity = max_capacity
        self.fixed = fixed
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
            capacity = self.max_capacity if self.fixed else min(capacity, self.max_capacity)
        capacity = max(capacity, needed)
        # A static step attends over the whole buffer: its unwritten part must hold numbers (masked, weight 0,
        # but 0 × NaN from uninitialised memory would still be NaN).
        new = key_states.new_zeros if self.fixed else key_states.new_empty
        keys = new(*key_states.shape[:-2], capacity, key_states.shape[-1])
        values = new(*value_states.shape[:-2], capacity, value_states.shape[-1])
        if self._length:
            assert self._key_buffer is not None and self._value_buffer is not None
            keys[..., :self._length, :] = self._key_buffer[..., :self._length, :]
            values[..., :self._length, :] = self._value_buffer[..., :self._length, :]
        if self.fixed:  # CUDA graphs then read the buffers in place instead of copying them in at every replay
            torch._dynamo.mark_static_address(keys)
            torch._dynamo.mark_static_address(values)
        self._key_buffer, self._value_buffer = keys, values

    def _refresh_views(self) -> None:
        assert self._key_buffer is not None and self._value_buffer is not None
        self.keys = self._key_buffer[..., :self._length, :]
        self.values = self._value_buffer[..., :self._length, :]

    def get_seq_length(self) -> int:
        return self._length

    def reserve(self, tokens: int) -> None:
        """Make the buffers hold at least `tokens` tokens (a static step writes at a position, not through
        `update`); a fixed layer within its budget already does."""
        if tokens > self.capacity:
            assert self._key_buffer is not None and self._value_buffer is not None, "reserve after the first update"
            self._grow(tokens, self._key_buffer, self._value_buffer)

    def write_at(self, position: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `[B, H, T, D]` keys and values at the positions `position` `[T]` (a tensor: a compiled step
        does not depend on its value); → the whole buffers `[B, H, capacity, D]`. The fill mark stays (`advance`)."""
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer.index_copy_(2, position, key_states)
        self._value_buffer.index_copy_(2, position, value_states)
        return self._key_buffer, self._value_buffer

    def advance(self, tokens: int) -> None:
        """Count `tokens` more tokens as filled (after `write_at` wrote them)."""
        self._length += tokens
        self._refresh_views()

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


def growing_cache(config, max_tokens: int | None = None, fixed: bool = False) -> DynamicCache:
    """A `DynamicCache` for `config` (an LLM config) whose full-attention layers are `GrowingLayer`s.

    Layers of another kind (sliding-window layers of some models) are kept as transformers builds them.
    Without a config, layers are created on first use, all `GrowingLayer`s. `fixed`: the layers allocate
    `max_tokens` at once (`GrowingLayer`), for static decode steps (`StaticStepCache`).
    """
    cache = DynamicCache(config=config)
    if not cache.layers:
        cache.layer_class_to_replicate = functools.partial(GrowingLayer, max_tokens, fixed) if fixed else GrowingLayer
        return cache
    cache.layers = [GrowingLayer(max_tokens, fixed) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def clear_cache(cache: DynamicCache) -> None:
    """Empty a cache in place; `GrowingLayer`s keep their buffers for the refill."""
    for layer in cache.layers:
        if isinstance(layer, GrowingLayer):
            layer.clear()
        else:
            layer.reset()


class StaticStepCache(Cache):
    """A static-shape view of a growing cache's layers for one-token decode steps (see the module docstring).

    `update` writes each layer's new key/value at `position` and returns its whole buffers; the mask builder
    gets the full capacity (`get_mask_sizes`) and `position` as the query's offset, so the positions past it
    (unwritten, or left over from a crop or a clear) are masked. `is_compileable` also tells transformers not
    to drop the mask for a one-token query (its `is_causal` shortcut would attend over the whole buffer).
    Every shape and address is the same at every step, the position being a tensor updated in place.

    Args:
        cache: a `growing_cache(..., fixed=True)` after its first forward (the layers exist and hold buffers).
    Raises:
        ValueError: a layer that is not an initialised `GrowingLayer` (sliding-window layers of some models).
    """

    def __init__(self, cache: DynamicCache) -> None:
        if not cache.layers or not all(isinstance(layer, GrowingLayer) and layer.is_initialized
                                       for layer in cache.layers):
            kinds = sorted({type(layer).__name__ for layer in cache.layers})
            raise ValueError(f"static decode steps need a filled cache of full-attention GrowingLayers; this one has "
                             f"{kinds or 'no layers'} (sliding-window models need engine.decode='eager')")
        super().__init__(layers=cache.layers)
        device = cache.layers[0].keys.device
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # [1] where the next step writes
        torch._dynamo.mark_static_address(self.position)

    @property
    def is_compileable(self) -> bool:
        return True

    def prepare(self, position: int) -> None:
        """Before a step (outside a compiled region): the step writes at `position`, = the tokens filled."""
        for layer in self.layers:
            layer.reserve(position + 1)
        self.position.fill_(position)

    def advance(self) -> None:
        """After a step: its token is part of the cache (the growing layers' views and lengths follow)."""
        for layer in self.layers:
            layer.advance(1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `[B, H, 1, D]` at `position` in layer `layer_idx`; → its whole buffers `[B, H, capacity, D]`."""
        return self.layers[layer_idx].write_at(self.position, key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> torch.Tensor:  # type: ignore[override]
        """The query's offset: a tensor, as transformers' StaticLayer returns, so that compiling does not
        specialise on it."""
        return self.position[0]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].capacity, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.layers[0 if layer_idx is None else layer_idx].capacity
