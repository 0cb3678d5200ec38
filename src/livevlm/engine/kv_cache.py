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

Several sessions in one forward (`BatchedCache`, for `engine.batch.SessionBatch`). On a GPU one stream's
frame forward (a dozen tokens) leaves the GPU idle; K streams' frames in one `[K, L]` forward use it. The
K caches live in one set of buffers `[K, H, capacity, D]` per layer, and session k's own cache is made of
`RowLayer`s viewing row k: alone (responses, queries, rebuilds, crops) a session works on its row exactly as
on a fixed growing cache, and the batched forward writes each row's new keys at that row's fill mark.
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


# ---------------------------------------------------------------------------------------------------
# several sessions' caches in one set of buffers


class RowLayer(GrowingLayer):
    """Session k's layer in a `BatchedCache`: a fixed `GrowingLayer` whose buffers are row k `[1, H, capacity, D]`
    of the shared `[K, H, capacity, D]` ones (views, so what the session writes alone the batched forward sees).

    It never regrows (new buffers would leave the shared storage): a session's `max_cache_tokens` must not
    exceed the row's capacity, which its bounded-memory policy then keeps it within.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__(keys.shape[-2], fixed=True)
        self.lazy_initialization(keys, values)
        self._key_buffer, self._value_buffer = keys, values
        torch._dynamo.mark_static_address(keys)  # as a fixed layer's own buffers (static decode steps)
        torch._dynamo.mark_static_address(values)
        self._refresh_views()

    def _grow(self, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError(f"a row of a BatchedCache holds {self.capacity} tokens, {needed} were asked for: a "
                           "session's max_cache_tokens must not exceed the BatchedCache's max_tokens")

    def reset(self) -> None:
        self.clear()  # keep the views of the shared buffers


class BatchedCache(Cache):
    """The KV caches of K sessions in one set of buffers, and the cache of their batched forward.

    Layer i holds keys and values `[K, H, capacity, D]` (zeroed: the masked positions must hold numbers);
    `rows[k]` is session k's own cache, a `DynamicCache` of `RowLayer`s viewing row k.

    A batched forward of the first K' rows, inputs `[K', L, H]`: `prepare(counts)` gives its position ids
    and which keys each query sees; then the LLM's `update` writes each row's real tokens at that row's fill
    mark (one scatter per layer) and returns the buffers up to the longest row's end; `advance(counts)`
    moves the fill marks on after it. Rows are left-padded (row k's real tokens are its last `counts[k]`), so
    that the frame ends of rows fed as many frames fall at the same positions: one `logits_to_keep` serves
    all rows. Pads are never written, and a pad query sees position 0 only (its softmax stays finite).

    Args:
        config: the LLM's config (the layers' kinds, KV heads and head width).
        rows: K, the most sessions.
        max_tokens: each row's capacity (each session's token budget).
        device, dtype: the buffers' (the LLM's).
    Raises:
        ValueError: an LLM with layers other than full attention (sliding windows).
    """

    def __init__(self, config, rows: int, max_tokens: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        kinds = [type(layer) for layer in DynamicCache(config=config).layers]
        if not kinds or any(kind is not DynamicLayer for kind in kinds):
            raise ValueError(f"batched sessions need an LLM of full-attention layers only; this one has "
                             f"{sorted({kind.__name__ for kind in kinds}) or 'no layers'}")
        super().__init__(layers=[])  # the forward's cache is this object; the rows hold the layers
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (rows, heads, max_tokens, head_dim)
        self.key_buffers = [torch.zeros(shape, device=device, dtype=dtype) for _ in kinds]  # [K, H, capacity, D]
        self.value_buffers = [torch.zeros(shape, device=device, dtype=dtype) for _ in kinds]
        self.rows: list[DynamicCache] = []
        for row in range(rows):
            cache = DynamicCache(config=config)
            cache.layers = [RowLayer(keys[row:row + 1], values[row:row + 1])
                            for keys, values in zip(self.key_buffers, self.value_buffers, strict=True)]
            self.rows.append(cache)
        self.max_tokens = max_tokens
        self._write: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, columns, positions)
        self._shape = (0, 0)  # (K', kv_length) of the prepared forward

    def prepare(self, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Before a forward of rows `[:K']` (K' = len(counts)), L = max(counts) positions each, row k's real
        tokens being its last `counts[k]` (0: a row with nothing to forward).

        Returns:
            position_ids `[K', L]` (each row's fill mark onwards; 0 at pads) and `visible` `[K', 1, L, kv_length]`
            bool: row k's real query at position p sees the keys at 0…p (its prefix and its own tokens up to
            itself), kv_length being the longest row's end.
        Raises:
            ValueError: a row whose tokens would not fit in its capacity.
        """
        device = self.key_buffers[0].device
        starts = torch.tensor([row.get_seq_length() for row in self.rows[:len(counts)]])  # [K'] fill marks
        count = torch.tensor(counts)
        ends = starts + count
        if int(ends.max()) > self.max_tokens:
            raise ValueError(f"rows would end at {ends.tolist()}, past the capacity {self.max_tokens}")
        width = max(counts)
        pads = width - count  # [K']
        column = torch.arange(width)
        positions = starts[:, None] + column - pads[:, None]  # [K', L], negative at pads
        real = column >= pads[:, None]  # [K', L]
        key = torch.arange(int(ends.max()))  # [kv_length]
        visible = ((key <= positions[..., None]) & (key < ends[:, None, None])) | (key == 0)  # [K', L, kv_length]
        rows, columns = real.nonzero(as_tuple=True)
        self._write = (rows.to(device), columns.to(device), positions[real].to(device))
        self._shape = (len(counts), key.numel())
        return positions.clamp(min=0).to(device), visible[:, None].to(device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the real tokens of `[K', H, L, D]` at their rows' positions in layer `layer_idx`; → its buffers
        `[K', H, kv_length, D]` (views)."""
        assert self._write is not None, "prepare before the forward"
        rows, columns, positions = self._write
        keys, values = self.key_buffers[layer_idx], self.value_buffers[layer_idx]
        keys[rows, :, positions] = key_states[rows, :, columns]  # [n, H, D] each side
        values[rows, :, positions] = value_states[rows, :, columns]
        batch, length = self._shape
        return keys[:batch, :, :length], values[:batch, :, :length]

    def advance(self, counts: list[int]) -> None:
        """After the forward: rows `[:len(counts)]` hold `counts` more tokens (their views and lengths follow)."""
        for row, count in zip(self.rows, counts, strict=False):
            for layer in row.layers:
                layer.advance(count)
        self._write = None
