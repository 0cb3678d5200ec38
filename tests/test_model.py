"""LiveModel: joint embedding, the streaming loss by hand, LoRA/full/connector finetuning."""

import math

import pytest
import torch

from livevlm.config import FormatConfig, ModelConfig
from livevlm.model import LiveModel, apply_finetuning, build_live_model, streaming_loss
from livevlm.stream_format import IGNORE, Frames, Message, StreamFormat, register_placeholder


def test_streaming_loss_by_hand_weight_one_and_two():
    # position 0: softmax([0, ln2, 0]) = [1/4, 1/2, 1/4], target 1 -> CE = ln 2 (a frame target)
    # position 1: ignored; position 2: uniform over 3, target 2 -> CE = ln 3
    logits = torch.tensor([[[0.0, math.log(2), 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, IGNORE, 2]])
    frame_target = torch.tensor([[True, False, False]])
    w1 = streaming_loss(logits, labels, frame_target, 1.0)
    w2 = streaming_loss(logits, labels, frame_target, 2.0)
    assert w1.item() == pytest.approx((math.log(2) + math.log(3)) / 2, abs=1e-6)
    assert w2.item() == pytest.approx((2 * math.log(2) + math.log(3)) / 2, abs=1e-6)


def test_streaming_loss_weight_zero_drops_frame_targets_from_the_mean():
    # the interleaved-dialogue baseline: only the text target (CE = ln 3) counts, over one token
    logits = torch.tensor([[[0.0, math.log(2), 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, IGNORE, 2]])
    frame_target = torch.tensor([[True, False, False]])
    assert streaming_loss(logits, labels, frame_target, 0.0).item() == pytest.approx(math.log(3), abs=1e-6)


def test_key_frame_weight_multiplies_the_key_frames_targets_only():
    # positions 0 and 2 are frame targets (CE ln 2 and ln 3), position 2 a key frame; position 3 text (CE ln 3)
    logits = torch.tensor([[[0.0, math.log(2), 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, IGNORE, 2, 0]])
    frame_target = torch.tensor([[True, False, True, False]])
    key = torch.tensor([[False, False, True, True]])  # a key mark off the frame targets is ignored
    loss = streaming_loss(logits, labels, frame_target, 2.0, key_target=key, key_frame_weight=5.0)
    assert loss.item() == pytest.approx((2 * math.log(2) + 10 * math.log(3) + math.log(3)) / 3, abs=1e-6)
    plain = streaming_loss(logits, labels, frame_target, 2.0, key_target=key, key_frame_weight=1.0)
    assert plain.item() == pytest.approx((2 * math.log(2) + 2 * math.log(3) + math.log(3)) / 3, abs=1e-6)


def _tiny_sample(tokenizer, tokens_per_frame=2):
    register_placeholder(tokenizer)
    fmt = StreamFormat(tokenizer, FormatConfig(), tokens_per_frame)
    rendered = fmt.render([Frames(2), Message("user", "What just happened?"), Message("assistant", "It stopped."),
                           Frames(2), Message("assistant", "A red circle.")])
    ids = torch.tensor([rendered.input_ids])
    labels = torch.tensor([rendered.labels])
    frame_target = torch.tensor([rendered.frame_target])
    return fmt, ids, labels, frame_target, rendered.num_frames


@pytest.mark.parametrize("weight", [1.0, 2.0])
def test_model_loss_equals_hand_computation_on_tiny_model(tiny_tokenizer, tiny_llm, weight):
    fmt, ids, labels, frame_target, frames = _tiny_sample(tiny_tokenizer)
    model = LiveModel(tiny_llm, vision_dim=8, placeholder_id=fmt.placeholder_id)
    frame_tokens = torch.randn(frames, 2, 8, generator=torch.Generator().manual_seed(0))
    logits, loss, _ = model(ids, frame_tokens, labels=labels, frame_target=frame_target, stream_loss_weight=weight)
    total, count = 0.0, 0
    for i, target in enumerate(labels[0].tolist()):
        if target == IGNORE:
            continue
        ce = -torch.log_softmax(logits[0, i].double(), -1)[target].item()
        total += (weight if frame_target[0, i] else 1.0) * ce
        count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_placeholder_outside_embedding_table_gets_connector_output(tiny_tokenizer, tiny_llm):
    vocab = tiny_llm.get_input_embeddings().num_embeddings
    model = LiveModel(tiny_llm, vision_dim=8, placeholder_id=vocab + 5)  # as the official 128256
    ids = torch.tensor([[1, vocab + 5, 2, vocab + 5]])
    frame_tokens = torch.randn(2, 8)
    embeds = model.embed(ids, frame_tokens)
    expected = model.connector(frame_tokens)
    assert torch.equal(embeds[0, 1], expected[0]) and torch.equal(embeds[0, 3], expected[1])
    assert torch.equal(embeds[0, 0], tiny_llm.get_input_embeddings().weight[1])


def test_frame_token_count_mismatch_names_both_counts(tiny_llm):
    model = LiveModel(tiny_llm, vision_dim=8, placeholder_id=7)
    with pytest.raises(ValueError, match="2 frame placeholders but frame_tokens has 3"):
        model.embed(torch.tensor([[7, 1, 7]]), torch.randn(3, 8))


def test_frame_width_is_the_fed_width_half_the_connectors_with_frame_delta(tiny_llm):
    assert LiveModel(tiny_llm, 10, placeholder_id=0).frame_width == 10
    assert LiveModel(tiny_llm, 10, placeholder_id=0, frame_delta=True).frame_width == 5


def test_connector_norm_starts_frame_tokens_at_the_text_embeddings_rms(tiny_llm):
    model = build_live_model(ModelConfig(finetune="connector", connector_norm=True), tiny_llm, 8, placeholder_id=0)
    text_rms = tiny_llm.get_input_embeddings().weight.pow(2).mean().sqrt()
    projected = model.connector(100 * torch.randn(5, 8, generator=torch.Generator().manual_seed(0)))  # [5, H]
    assert torch.allclose(projected.pow(2).mean(-1).sqrt(), text_rms.expand(5), rtol=1e-4)


@pytest.mark.parametrize("finetune,llm_trains", [("lora", "lora_"), ("full", "all"), ("connector", "none")])
def test_finetune_modes_choose_trainable_weights(tiny_llm, finetune, llm_trains):
    model = build_live_model(ModelConfig(finetune=finetune, lora_r=4, lora_alpha=8), tiny_llm, 8, placeholder_id=7)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    llm_trainable = {n for n in trainable if n.startswith("llm.")}
    connector = {f"connector.{k}" for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
    assert {n for n in trainable if n.startswith("connector.")} == connector
    if llm_trains == "lora_":
        assert llm_trainable and all("lora_" in n for n in llm_trainable)
        assert any("lm_head" in n for n in llm_trainable)
    elif llm_trains == "all":
        assert len(llm_trainable) == len(list(model.llm.parameters()))
    else:
        assert not llm_trainable


def test_unknown_lora_targets_list_the_real_layers(tiny_llm):
    model = LiveModel(tiny_llm, 8, 7)
    with pytest.raises(ValueError, match="q_proj"):
        apply_finetuning(model, ModelConfig(lora_targets=["query_key_value"]))


def test_lora_training_reduces_loss_on_one_sample(tiny_tokenizer, tiny_llm):
    fmt, ids, labels, frame_target, frames = _tiny_sample(tiny_tokenizer)
    torch.manual_seed(0)
    model = build_live_model(ModelConfig(lora_r=8, lora_alpha=16, lora_dropout=0.0), tiny_llm, 8, fmt.placeholder_id)
    frame_tokens = torch.randn(frames, 2, 8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        _, loss, _ = model(ids, frame_tokens, labels=labels, frame_target=frame_target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_labelled_logits_only_gives_the_same_loss(tiny_tokenizer, tiny_llm):
    fmt, ids, labels, frame_target, frames = _tiny_sample(tiny_tokenizer)
    model = LiveModel(tiny_llm, vision_dim=8, placeholder_id=fmt.placeholder_id)
    frame_tokens = torch.randn(frames, 2, 8)
    full_logits, full_loss, _ = model(ids, frame_tokens, labels=labels, frame_target=frame_target,
                                      stream_loss_weight=2.0)
    kept_logits, kept_loss, _ = model(ids, frame_tokens, labels=labels, frame_target=frame_target,
                                      stream_loss_weight=2.0, labelled_logits_only=True)
    keep = (labels[0] != IGNORE).nonzero().flatten()
    assert kept_logits.shape == (1, len(keep), full_logits.shape[-1])
    assert torch.allclose(kept_logits, full_logits[:, keep], atol=1e-6)
    assert kept_loss.item() == pytest.approx(full_loss.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# the model's own frame inputs (frame_delta): one function for training and the engine


def test_frame_inputs_append_each_tokens_change_since_the_frame_before(tiny_llm):
    model = LiveModel(tiny_llm, 4, placeholder_id=0, frame_delta=True)
    tokens = torch.tensor([[[1.0, 2.0]], [[4.0, 2.0]], [[4.0, 7.0]]])  # [T=3, N=1, D=2]
    assert torch.equal(model.frame_inputs(tokens),
                       torch.tensor([[[1.0, 2.0, 0.0, 0.0]], [[4.0, 2.0, 3.0, 0.0]], [[4.0, 7.0, 0.0, 5.0]]]))
    assert torch.equal(model.frame_inputs(tokens[2:], previous=tokens[1]), torch.tensor([[[4.0, 7.0, 0.0, 5.0]]]))
    plain = LiveModel(tiny_llm, 2, placeholder_id=0)
    assert plain.frame_inputs(tokens, previous=tokens[0]) is tokens  # nothing derived without frame_delta


def test_frame_inputs_of_a_stream_at_once_equal_those_fed_frame_by_frame(tiny_llm):
    """Training derives a whole stream's inputs at once, the engine one piece at a time: exactly the same."""
    model = LiveModel(tiny_llm, 2 * 8, placeholder_id=0, frame_delta=True)
    tokens = torch.randn(7, 3, 8, generator=torch.Generator().manual_seed(0))  # [T, N, D]
    at_once = model.frame_inputs(tokens)  # [T, N, 2D]
    one_by_one = torch.cat([model.frame_inputs(tokens[t:t + 1], tokens[t - 1] if t else None) for t in range(7)])
    pieces = torch.cat([model.frame_inputs(tokens[:3]), model.frame_inputs(tokens[3:], previous=tokens[2])])
    assert torch.equal(one_by_one, at_once) and torch.equal(pieces, at_once)
    assert torch.equal(at_once[0, :, 8:], torch.zeros(3, 8))  # a stream's first frame has no change


def _two_streams(tokenizer, tokens_per_frame=2, width=8):
    from livevlm.data.dataset import StreamSample

    register_placeholder(tokenizer)
    fmt = StreamFormat(tokenizer, FormatConfig(), tokens_per_frame)
    generator = torch.Generator().manual_seed(3)
    samples = []
    for index, items in enumerate([
            [Frames(3), Message("user", "What just happened?"), Message("assistant", "It stopped."), Frames(2)],
            [Frames(1), Message("assistant", "A red circle."), Frames(4), Message("assistant", "It stopped.")]]):
        rendered = fmt.render(items)
        samples.append(StreamSample(torch.tensor(rendered.input_ids), torch.tensor(rendered.labels),
                                    torch.tensor(rendered.frame_target),
                                    torch.randn(rendered.num_frames, tokens_per_frame, width, generator=generator),
                                    f"s{index}", rendered.frame_ends))
    return fmt, samples


def test_a_collated_batch_gives_each_stream_its_own_logits_with_frame_delta(tiny_tokenizer, tiny_llm):
    from livevlm.data.dataset import collate_streams

    fmt, samples = _two_streams(tiny_tokenizer)
    torch.manual_seed(0)
    model = LiveModel(tiny_llm, 2 * 8, fmt.placeholder_id, frame_delta=True).eval()
    batch = collate_streams(samples, pad_id=fmt.eos_id)
    assert batch["frame_tokens"].shape == (5 + 5, 2, 8) and batch["frame_counts"].tolist() == [5, 5]
    assert len(samples[0].input_ids) != len(samples[1].input_ids)  # one row is padded
    with torch.no_grad():
        logits, loss, _ = model(**batch)
        for row, sample in enumerate(samples):
            alone, _, _ = model(sample.input_ids[None], sample.frame_tokens)
            assert torch.allclose(logits[row, :len(sample.input_ids)], alone[0], atol=1e-5, rtol=0)
        # what the batch would give if the second stream's first change were taken from the first stream
        crossed = model.embed_inputs(batch["input_ids"], model.frame_inputs(batch["frame_tokens"]).flatten(0, 1))
    assert not torch.allclose(crossed, model.embed(batch["input_ids"], batch["frame_tokens"], batch["frame_counts"]))
    assert loss is not None


def test_frame_inputs_need_the_streams_boundaries(tiny_llm):
    model = LiveModel(tiny_llm, 2 * 8, placeholder_id=7, frame_delta=True)
    with pytest.raises(ValueError, match=r"frames \[T, N, D\], got shape \(4, 8\) \(flat tokens have no frame"):
        model.embed(torch.tensor([[7, 7, 7, 7]]), torch.randn(4, 8))
    with pytest.raises(ValueError, match="a batch of 2 streams needs frame_counts"):
        model.embed(torch.tensor([[7, 7], [7, 7]]), torch.randn(2, 2, 8))
    with pytest.raises(ValueError, match=r"frame_counts \[1, 2\] must give the frames of each of the 2 rows, 2 in all"):
        model.embed(torch.tensor([[7, 7], [7, 7]]), torch.randn(2, 2, 8), torch.tensor([1, 2]))
    plain = LiveModel(tiny_llm, 8, placeholder_id=7)  # nothing to derive: flat tokens are the connector's inputs
    assert plain.embed(torch.tensor([[7, 1, 7]]), torch.randn(2, 8)).shape == (1, 3, 32)


# ---------------------------------------------------------------------------------------------------
# a saved connector widened for inputs it was trained without


@pytest.mark.parametrize("saved_frame_delta", [False, True])
def test_a_widened_connector_gives_the_saved_outputs_whatever_the_new_inputs(tiny_llm, saved_frame_delta):
    torch.manual_seed(0)
    saved = LiveModel(tiny_llm, 8 * (2 if saved_frame_delta else 1), placeholder_id=7, frame_delta=saved_frame_delta)
    widened = LiveModel(tiny_llm, 2 * (8 + 3), placeholder_id=7, frame_delta=True)  # + mean_rgb's colours
    widened.load_connector(saved.connector.state_dict(), saved_frame_delta, new_channels=3)
    tokens = torch.randn(4, 2, 8)  # [T, N, D]
    coloured = torch.cat([tokens, torch.randn(4, 2, 3)], dim=-1)  # any colours: their columns are zero
    ids = torch.tensor([[1, 7, 7, 2, 7, 7, 7, 7, 3, 7, 7]])
    with torch.no_grad():
        expected = saved.embed(ids, tokens)
        assert torch.allclose(widened.embed(ids, coloured), expected, atol=1e-6, rtol=0)


def test_a_connector_cannot_lose_an_input_or_change_its_width(tiny_llm):
    saved = LiveModel(tiny_llm, 2 * 8, placeholder_id=7, frame_delta=True).connector.state_dict()
    with pytest.raises(ValueError, match="model.frame_delta: True in the checkpoint, False here"):
        LiveModel(tiny_llm, 8, placeholder_id=7).load_connector(saved, saved_frame_delta=True)
    with pytest.raises(ValueError, match="its connector takes 16-wide frame tokens, this model's takes 22"):
        LiveModel(tiny_llm, 22, placeholder_id=7, frame_delta=True).load_connector(saved)
