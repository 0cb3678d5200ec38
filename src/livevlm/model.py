"""LiveModel: an MLP connector + any HF causal LM, the joint frame/text embedding and the streaming loss.

Read top to bottom: `Connector` maps frame tokens into the LLM's embedding space; `LiveModel` derives its
inputs from a stream's raw frame tokens (`frame_inputs`: the frame changes of `frame_delta`, for training
and the engine alike), puts them at the placeholder positions of the token stream and runs the LLM, and
widens a saved connector for inputs it was trained without (`load_connector`); `streaming_loss` is the
paper's objective; `apply_finetuning` decides what trains (LoRA / full / connector only);
`build_live_model` puts a model together from a config. The vision encoder is not held here: frames are
encoded by `vision.FrameEncoder` (or read from a feature cache) before they reach the model, which is what
lets training use cached features and the engine run encoding in its own pipeline stage.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from livevlm.config import ModelConfig
from livevlm.stream_format import IGNORE

log = logging.getLogger(__name__)


def _cache_kwarg_name() -> str:
    """transformers >= 5.2x names the KV-cache argument `cache`, older releases `past_key_values`."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


CACHE_KWARG = _cache_kwarg_name()


class Connector(nn.Module):
    """Linear(vision_dim → hidden) → GELU → Linear(hidden → llm_dim), as the official v1+ connector.

    With `output_norm`, an RMSNorm follows (as Idefics2's connector ends in one). Without it the frame
    tokens leave the connector at whatever scale the vision features have (~15× SmolLM2's text embeddings
    for DINOv2), so at frame positions the residual stream is mostly the frame embedding; `build_live_model`
    starts the norm's scale at the text embeddings' RMS, so frames enter the LLM as text does.
    """

    def __init__(self, vision_dim: int, llm_dim: int, hidden: int = 0, output_norm: bool = False) -> None:
        super().__init__()
        hidden = hidden or llm_dim
        self.fc1 = nn.Linear(vision_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, llm_dim)
        self.norm = nn.RMSNorm(llm_dim) if output_norm else None

    def forward(self, frame_tokens: torch.Tensor) -> torch.Tensor:
        """`[..., vision_dim]` → `[..., llm_dim]`."""
        projected = self.fc2(self.act(self.fc1(frame_tokens)))
        return projected if self.norm is None else self.norm(projected)


def streaming_loss(logits: torch.Tensor, labels: torch.Tensor, frame_target: torch.Tensor,
                   stream_loss_weight: float = 1.0, key_target: torch.Tensor | None = None,
                   key_frame_weight: float = 1.0) -> torch.Tensor:
    """The LIVE objective: Σ wⱼ·CEⱼ / (number of labelled tokens).

    Args:
        logits: `[B, L, V]`.
        labels: `[B, L]` targets, already shifted (labels[:, i] is what position i predicts); -100 = ignore.
        frame_target: `[B, L]` bool, True at the frame positions (stay silent / speak targets).
        stream_loss_weight: wⱼ at frame positions; 1 elsewhere. 0 drops the frame targets altogether (they
            leave the count too): the "interleaved dialogue" baseline, trained on responses only.
        key_target: `[B, L]` bool, True at the frame targets of key frames (a dialogue's `key_frames_s`);
            their weight is multiplied by `key_frame_weight`. They count once in the denominator, so a
            weight above 1 shifts the loss towards them rather than rescaling it.

    Returns:
        A scalar; 0 (with a gradient path) when nothing is labelled.
    """
    flat_labels = labels.reshape(-1)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat_labels,
                         ignore_index=IGNORE, reduction="none")  # [B*L], 0 where ignored
    weights = torch.where(frame_target.reshape(-1), stream_loss_weight, 1.0)
    if key_target is not None and key_frame_weight != 1.0:
        weights = torch.where(key_target.reshape(-1) & frame_target.reshape(-1), weights * key_frame_weight, weights)
    counted = flat_labels != IGNORE
    if stream_loss_weight == 0:
        counted &= ~frame_target.reshape(-1)
    count = counted.sum().clamp(min=1)
    return (ce * weights).sum() / count


def silent_decisions(frame_logits: torch.Tensor, separator_id: int, threshold: float) -> torch.Tensor:
    """The speak decision at frame ends: `[F, V]` logits → `[F]` bool, True where the model stays silent.

    The official rule: the separator is zeroed when P(separator) < θ, then the argmax decides. So: silent
    iff P(separator) ≥ θ and the separator is the argmax (θ = 0: plain argmax; θ ≥ 0.5: P(separator) ≥ θ).
    """
    probs = frame_logits.float().softmax(-1)
    return (probs[:, separator_id] >= threshold) & (probs.argmax(-1) == separator_id)


class LiveModel(nn.Module):
    """Connector + causal LM. Frame tokens replace the placeholder ids in the token stream.

    Args:
        llm: any HF causal LM (or a peft wrapper of one).
        vision_dim: the connector's input width D': the width D of the frame tokens a stream is fed with,
            twice that with `frame_delta` (`frame_width` gives D back).
        placeholder_id: the token id of `<v>`; it may lie outside the LLM's embedding table (the official
            checkpoint's 128256 does): those positions are never looked up.
        connector_hidden: hidden width of the connector (0 = the LLM's hidden size).
        frame_delta: each frame token also carries its change since the same token of the previous frame
            (D' = 2D). The model derives it itself from the raw frame tokens of a stream (`frame_inputs`),
            so training and the engine cannot compute it differently.
        connector_norm: the connector ends in an RMSNorm (`Connector`). Its scale is a trained weight: a
            checkpoint's is loaded over it, and `build_live_model` starts a fresh one at the text's scale.
    """

    def __init__(self, llm: nn.Module, vision_dim: int, placeholder_id: int, connector_hidden: int = 0,
                 frame_delta: bool = False, connector_norm: bool = False) -> None:
        super().__init__()
        self.llm = llm
        self.placeholder_id = placeholder_id
        self.frame_delta = frame_delta
        llm_dim = llm.get_input_embeddings().embedding_dim
        self.connector = Connector(vision_dim, llm_dim, connector_hidden, connector_norm)
        self.connector.to(next(llm.parameters()).dtype)

    @property
    def device(self) -> torch.device:
        return next(self.connector.parameters()).device

    @property
    def frame_width(self) -> int:
        """D of the raw frame tokens a stream is fed with: the encoder's width (+ 3 with mean_rgb, + hue_bins). With
        frame_delta the connector takes twice that, the changes the model appends (`frame_inputs`)."""
        return self.connector.fc1.in_features // (2 if self.frame_delta else 1)

    def frame_inputs(self, frame_tokens: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """The connector's inputs for consecutive frames of one stream: raw `[T, N, D]` → `[T, N, D']`.

        With `frame_delta`, each token is followed by its change since the same token of the frame before
        (D' = 2D); without, the tokens are returned as they are (D' = D). The one place the changes are
        computed: training (`embed`) and the engine (which feeds a stream piece by piece) both call it.
        Why the changes: without them the LLM has to find what changed in a frame by comparing it with
        earlier frames through attention, which averages and cannot subtract; and the difference is what a
        probe reads a new object's colour from best.

        Args:
            frame_tokens: `[T, N, D]`, T >= 0 consecutive frames.
            previous: `[N, D]` the raw frame just before `frame_tokens[0]`; None at a stream's first frame,
                whose change is zero (nothing was seen before it).
        """
        if not self.frame_delta:
            return frame_tokens
        before = frame_tokens[:1] if previous is None else previous[None].to(frame_tokens)  # [1, N, D]
        return torch.cat([frame_tokens, frame_tokens - torch.cat([before, frame_tokens[:-1]])], dim=-1)

    def embed(self, input_ids: torch.Tensor, frame_tokens: torch.Tensor | None,
              frame_counts: torch.Tensor | None = None) -> torch.Tensor:
        """Joint embedding of token ids and the raw frame tokens of each row's stream.

        Args:
            input_ids: `[B, L]`.
            frame_tokens: `[ΣT, N, D]` the raw frame tokens of the rows' streams, row after row, with ΣT·N =
                the number of placeholder ids in input_ids (row-major order: batch row, then position); None
                when there are none. A model without frame_delta also takes them flat, `[P, D]`.
            frame_counts: `[B]` frames of each row's stream (summing to ΣT); None = one stream (B = 1).

        Returns:
            inputs_embeds `[B, L, H]`.

        Raises:
            ValueError: the tokens do not match the placeholders, or the streams' boundaries are unknown where
                frame_delta needs them (flat tokens, or several rows without frame_counts).
        """
        if frame_tokens is None or (frame_tokens.dim() == 2 and not self.frame_delta):
            return self.embed_inputs(input_ids, frame_tokens)  # nothing to derive: they are the connector's inputs
        return self.embed_inputs(input_ids, self._stream_inputs(input_ids, frame_tokens, frame_counts))

    def _stream_inputs(self, input_ids: torch.Tensor, frame_tokens: torch.Tensor,
                       frame_counts: torch.Tensor | None) -> torch.Tensor:
        """`frame_inputs` of each row's stream `[ΣT, N, D]`, flattened to `[ΣT·N, D']` in placeholder order."""
        if frame_tokens.dim() != 3:
            why = (" (flat tokens have no frame boundaries, and frame_delta derives each frame's change from the "
                   "frame before it; the connector's own inputs go to embed_inputs)") if self.frame_delta else ""
            raise ValueError(f"frame_tokens must be frames [T, N, D], got shape {tuple(frame_tokens.shape)}{why}")
        if frame_counts is None:
            if self.frame_delta and input_ids.shape[0] > 1:
                raise ValueError(f"a batch of {input_ids.shape[0]} streams needs frame_counts [B] (frames per row): "
                                 "with frame_delta each stream's first frame has no change")
            counts = [frame_tokens.shape[0]]
        else:
            counts = [int(c) for c in frame_counts]
            if len(counts) != input_ids.shape[0] or sum(counts) != frame_tokens.shape[0]:
                raise ValueError(f"frame_counts {counts} must give the frames of each of the {input_ids.shape[0]} "
                                 f"rows, {frame_tokens.shape[0]} in all")
        streams = [self.frame_inputs(stream) for stream in frame_tokens.split(counts)]  # [T_b, N, D'] each
        return torch.cat(streams).flatten(0, 1)  # [ΣT·N, D']

    def embed_inputs(self, input_ids: torch.Tensor, inputs: torch.Tensor | None) -> torch.Tensor:
        """Joint embedding from the connector's own inputs (`frame_inputs` already applied).

        What the engine uses to feed a stream in pieces that may split a frame (a cache rebuild's chunks).

        Args:
            input_ids: `[B, L]`.
            inputs: `[P, D']`, P = the number of placeholder ids in input_ids, in row-major order; None
                when there are none.

        Returns:
            inputs_embeds `[B, L, H]`.
        """
        is_frame = input_ids == self.placeholder_id  # [B, L]
        token_embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_frame, 0))  # [B, L, H]
        count = int(is_frame.sum())
        if count == 0:
            return token_embeds
        if inputs is None:
            raise ValueError(f"input_ids hold {count} frame placeholders but no frame_tokens were given")
        if inputs.shape[0] != count:
            raise ValueError(f"input_ids hold {count} frame placeholders but frame_tokens has {inputs.shape[0]} tokens")
        # .to(): under autocast the connector may return another dtype than the embedding table's.
        projected = self.connector(inputs.to(token_embeds.dtype)).to(token_embeds.dtype)  # [P, H]
        return token_embeds.masked_scatter(is_frame[..., None], projected)

    def forward(self, input_ids: torch.Tensor, frame_tokens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                frame_target: torch.Tensor | None = None, stream_loss_weight: float = 1.0,
                key_target: torch.Tensor | None = None, key_frame_weight: float = 1.0,
                past_key_values=None, use_cache: bool = False, position_ids: torch.Tensor | None = None,
                labelled_logits_only: bool = False, frame_counts: torch.Tensor | None = None):
        """Run the LLM on the joint embedding; with `labels`, also return the streaming loss.

        Args:
            input_ids: `[B, L]`.
            key_target, key_frame_weight: the key frames' targets and their weight (`streaming_loss`).
            frame_tokens, frame_counts: the raw frame tokens `[ΣT, N, D]` of the rows' streams and the frames
                of each row `[B]` (None = one stream), as `embed` takes them (a collated batch holds both).
            labelled_logits_only: with `labels`, compute logits only at the positions some row labels
                (`[B, K, V]` instead of `[B, L, V]`). Training needs nothing else, and the vocabulary
                projection of every position is a large share of a small LLM's step (49k × 576 for SmolLM2).

        Returns:
            (logits `[B, L, V]` (or `[B, K, V]`), loss or None, past_key_values or None).
        """
        inputs_embeds = self.embed(input_ids, frame_tokens, frame_counts)
        kwargs = {}
        if past_key_values is not None:  # transformers >= 5.2x calls it `cache`, older ones `past_key_values`
            kwargs[CACHE_KWARG] = past_key_values
        if labels is not None and frame_target is None:
            frame_target = torch.zeros_like(labels, dtype=torch.bool)
        if labels is not None and labelled_logits_only:
            keep = (labels != IGNORE).any(dim=0).nonzero().flatten()  # [K]
            kwargs["logits_to_keep"] = keep
            labels, frame_target = labels[:, keep], frame_target[:, keep]
            key_target = None if key_target is None else key_target[:, keep]
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=use_cache,
                       position_ids=position_ids, **kwargs)
        loss = None
        if labels is not None:
            loss = streaming_loss(out.logits, labels, frame_target, stream_loss_weight, key_target, key_frame_weight)
        return out.logits, loss, (output_cache(out) if use_cache else None)

    def load_connector(self, state: dict[str, torch.Tensor], saved_frame_delta: bool | None = None,
                       new_channels: int = 0) -> None:
        """Load a saved connector, widened with zero input columns for the inputs it was trained without.

        A checkpoint trained without colour (`mean_rgb`) or without frame changes (`frame_delta`) can start a
        model that has them: their `fc1` columns start at zero, so the model starts as the checkpoint (the
        same outputs whatever the new inputs hold) and training learns what they are worth.

        Args:
            state: the connector's state dict; its `fc1.weight` is `[H, D_saved]`, or `[H, 2·D_saved]` when
                saved with frame_delta (the tokens' columns, then their changes').
            saved_frame_delta: whether the checkpoint was trained with frame_delta; None = as this model.
            new_channels: channels each raw frame token has here and not in the checkpoint (mean_rgb's
                colours, `vision.RGB_CHANNELS`, then hue_bins'), appended after the saved ones (and after each
                change's).

        Raises:
            ValueError: the checkpoint has frame_delta and this model not (inputs can be added, not taken
                away), or the widened connector still takes another width than this one (naming both).
        """
        saved_frame_delta = self.frame_delta if saved_frame_delta is None else saved_frame_delta
        if saved_frame_delta and not self.frame_delta:
            raise ValueError("model.frame_delta: True in the checkpoint, False here (inputs can be added to a "
                             "checkpoint, not taken away)")
        weight = state["fc1.weight"]  # [H, D_saved] or [H, 2·D_saved]
        parts = list(weight.chunk(2, dim=1)) if saved_frame_delta else [weight]
        if new_channels:
            parts = [torch.cat([part, part.new_zeros(part.shape[0], new_channels)], dim=1) for part in parts]
        if self.frame_delta and not saved_frame_delta:
            parts.append(torch.zeros_like(parts[0]))
        state = {**state, "fc1.weight": torch.cat(parts, dim=1)}
        width, expected = state["fc1.weight"].shape[1], self.connector.fc1.in_features
        if width != expected:
            raise ValueError(f"its connector takes {width}-wide frame tokens, this model's takes {expected}")
        self.connector.load_state_dict({k: v.to(self.connector.fc1.weight.dtype) for k, v in state.items()})


def output_cache(out):
    """The KV cache of an HF model output (`cache` in transformers >= 5.2x, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values



def apply_finetuning(model: LiveModel, config: ModelConfig) -> LiveModel:
    """Make what `config.finetune` says trainable; the connector always trains.

    "lora": LoRA (peft) on `config.lora_targets` that exist in the LLM; "full": every LLM weight;
    "connector": the LLM stays frozen.
    """
    if config.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        names = {name.rsplit(".", 1)[-1] for name, module in model.llm.named_modules() if isinstance(module, nn.Linear)}
        targets = [t for t in config.lora_targets if t in names]
        if not targets:
            raise ValueError(f"none of model.lora_targets {config.lora_targets} names a Linear layer of the LLM; "
                             f"its Linear layers are {sorted(names)}")
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=targets, bias="none")
        model.llm = get_peft_model(model.llm, lora)
    else:
        model.llm.requires_grad_(config.finetune == "full")
    model.connector.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("finetune=%s: %.2fM trainable parameters", config.finetune, trainable / 1e6)
    return model


def build_live_model(config: ModelConfig, llm: nn.Module, vision_dim: int, placeholder_id: int) -> LiveModel:
    """A LiveModel around an already loaded LLM, with a fresh connector and the configured finetuning.

    A fresh connector's output norm (`config.connector_norm`) starts at the RMS of the LLM's input embedding
    table, so frame tokens enter at the text's scale; done here, not in `LiveModel`, because a loaded
    checkpoint overwrites the scale and the table can be large (an 8B LLM's is 0.5 G values).
    """
    model = LiveModel(llm, vision_dim, placeholder_id, config.connector_hidden, config.frame_delta,
                      config.connector_norm)
    if model.connector.norm is not None:
        with torch.no_grad():
            text_rms = llm.get_input_embeddings().weight.float().pow(2).mean().sqrt()
            model.connector.norm.weight.fill_(text_rms.item())
    return apply_finetuning(model, config)
