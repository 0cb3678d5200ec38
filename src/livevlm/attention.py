"""Attention for streaming on a CPU: grouped-query attention without copying the KV cache.

SmolLM2, Llama-3 and most current LLMs share each key/value head among several query heads (GQA).
transformers' SDPA path lets `scaled_dot_product_attention` handle the groups itself (`enable_gqa`) only
when there is no attention mask, as CUDA's fast kernels need; otherwise it repeats every cached key and value
for every query head (`repeat_kv`) before each forward. A stream's forwards always have a mask (several new
tokens on top of a cache), so every frame copied the whole cache, ×(heads / KV heads), in every layer: at
4,000 cached tokens that copy was 60 % of the default model's LLM time per frame. PyTorch's CPU kernels take
a mask and `enable_gqa` together, so on a CPU this path passes both and nothing is copied; the result is
the same attention (the same products, summed in the same order per head).

`use_cache_friendly_attention(llm)` switches a loaded model to it; everything it does not cover (other
devices, no groups, single-token decoding, which transformers already packs without a copy) goes to
transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "livevlm_sdpa"


def gqa_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query `[B, H, q, D]`, key/value `[B, Hkv, k, D]`, a mask
    broadcastable to `[B, H, q, k]` → output `[B, q, H, D]` and no weights."""
    groups = getattr(module, "num_key_value_groups", 1)
    plain = (groups == 1 or query.device.type != "cpu" or attention_mask is None or query.shape[2] == 1
             or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None)
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                            scale=scaling, is_causal=False, enable_gqa=True)  # [B, H, q, D]
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, gqa_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the same masks as transformers' SDPA


def use_cache_friendly_attention(llm: torch.nn.Module) -> bool:
    """Switch a loaded LLM that uses transformers' SDPA attention to `gqa_sdpa_attention`. Returns whether it
    switched: models with another attention (eager, flash) are left as they are."""
    config = getattr(llm, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(llm, "set_attn_implementation"):
        return False
    llm.set_attn_implementation(NAME)
    return True
