"""Training data: dialogue JSONL + feature cache → rendered samples and padded batches."""

import json

import pytest
import torch

from livevlm.config import FormatConfig
from livevlm.data.dataset import MissingFeaturesError, StreamDataset, collate_streams
from livevlm.data.features import feature_name, load_features, save_features
from livevlm.stream_format import IGNORE, StreamFormat, register_placeholder


def write_dialogues(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def narration(i, duration=5.0):
    return {"id": f"n{i}", "video": f"videos/{i:03d}.mp4", "fps": 2.0, "duration_s": duration,
            "turns": [{"role": "user", "time_s": 0.0, "text": "Narrate."},
                      {"role": "assistant", "time_s": 0.0, "text": "Sure."},
                      {"role": "assistant", "time_s": 2.0, "text": "A red circle appears."}]}


@pytest.fixture
def fmt(tiny_tokenizer):
    register_placeholder(tiny_tokenizer)
    return StreamFormat(tiny_tokenizer, FormatConfig(), tokens_per_frame=2)


@pytest.fixture
def cached(tmp_path):
    write_dialogues(tmp_path / "d.jsonl", [narration(0), narration(1, duration=3.0)])
    for i, frames in ((0, 10), (1, 6)):
        tokens = torch.arange(frames * 2 * 4, dtype=torch.float32).reshape(frames, 2, 4) + 1000 * i
        save_features(tmp_path / "cache" / feature_name(f"videos/{i:03d}.mp4"), tokens, {"fps": "2.0"})
    return tmp_path


def test_sample_has_one_frame_token_set_per_frame_and_speaks_at_the_turn(cached, fmt):
    dataset = StreamDataset(cached / "d.jsonl", fmt, cache_dir=cached / "cache")
    sample = dataset[0]
    assert sample.frame_tokens.shape == (10, 2, 4)  # 5 s at 2 fps
    assert int((sample.input_ids == fmt.placeholder_id).sum()) == 10 * 2
    frame_labels = sample.labels[sample.frame_target].tolist()
    # frame 0 is followed by the query (unlabelled); frames 1..3 silent; frame 4 (2.0 s) speaks; 5..9 silent
    assert frame_labels == [fmt.separator_id] * 3 + [fmt.speak_id] + [fmt.separator_id] * 5


def test_samples_hold_the_raw_cached_tokens_of_their_stream(cached, fmt):
    """Derived inputs (frame_delta's changes) are the model's job (`LiveModel.frame_inputs`), not the data's."""
    dataset = StreamDataset(cached / "d.jsonl", fmt, cache_dir=cached / "cache")
    stored, _ = load_features(cached / "cache" / feature_name("videos/001.mp4"))
    assert torch.equal(dataset[1].frame_tokens, stored)  # [6, 2, 4], as cached


def test_max_frames_truncates_stream_and_drops_later_turns(cached, fmt):
    sample = StreamDataset(cached / "d.jsonl", fmt, cache_dir=cached / "cache", max_frames=3)[0]
    assert sample.frame_tokens.shape[0] == 3
    assert fmt.speak_id not in sample.labels[sample.frame_target].tolist()


def test_key_frames_mark_their_frames_decision_targets_and_nothing_else(tmp_path, fmt):
    record = narration(0) | {"key_frames_s": [0.0, 1.0, 2.0, 4.5]}  # frame 0 is followed by the query: no target
    write_dialogues(tmp_path / "d.jsonl", [record])
    save_features(tmp_path / "cache" / feature_name("videos/000.mp4"), torch.zeros(10, 2, 4), {"fps": "2.0"})
    sample = StreamDataset(tmp_path / "d.jsonl", fmt, cache_dir=tmp_path / "cache", max_frames=8)[0]
    # frame 9 (4.5 s) is cut by max_frames=8; frame 0's end is followed by the user turn, so it has no target
    assert sample.key_target.nonzero().flatten().tolist() == [sample.frame_ends[2], sample.frame_ends[4]]
    assert sample.labels[sample.key_target].tolist() == [fmt.separator_id, fmt.speak_id]
    batch = collate_streams([sample, StreamDataset(tmp_path / "d.jsonl", fmt, tmp_path / "cache")[0]], pad_id=0)
    assert batch["key_target"].sum(dim=1).tolist() == [2, 3]  # uncut, frame 9 keeps its mark


def test_collate_pads_right_and_concatenates_frames_in_placeholder_order(cached, fmt):
    dataset = StreamDataset(cached / "d.jsonl", fmt, cache_dir=cached / "cache")
    batch = collate_streams([dataset[0], dataset[1]], pad_id=fmt.eos_id)
    lengths = [len(dataset[0].input_ids), len(dataset[1].input_ids)]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][1, lengths[1]:] == IGNORE).all()
    assert batch["frame_tokens"].shape == (10 + 6, 2, 4)  # [ΣT, N, D], the streams' frames one after the other
    assert batch["frame_counts"].tolist() == [10, 6]  # where each stream starts, for the model's frame inputs
    assert batch["frame_tokens"][10, 0, 0].item() == 1000.0  # the second stream's first token follows the first's
    assert int((batch["input_ids"] == fmt.placeholder_id).sum()) == batch["frame_tokens"][..., 0].numel()


def test_collate_without_frame_targets_keeps_only_the_text_labels(cached, fmt):
    sample = StreamDataset(cached / "d.jsonl", fmt, cache_dir=cached / "cache")[0]
    batch = collate_streams([sample], pad_id=fmt.eos_id, frame_targets=False)
    assert (batch["labels"][0][sample.frame_target] == IGNORE).all()
    text = ~sample.frame_target & (sample.labels != IGNORE)
    assert torch.equal(batch["labels"][0][text], sample.labels[text]) and int(text.sum()) > 0


def test_missing_features_name_the_videos_and_the_command(tmp_path, fmt):
    write_dialogues(tmp_path / "d.jsonl", [narration(0), narration(7)])
    save_features(tmp_path / "cache" / feature_name("videos/000.mp4"), torch.zeros(10, 2, 4), {"fps": "2.0"})
    with pytest.raises(MissingFeaturesError, match=r"1 video\(s\).*videos/007.mp4.*livevlm data encode"):
        StreamDataset(tmp_path / "d.jsonl", fmt, cache_dir=tmp_path / "cache")


def test_feature_file_roundtrip_keeps_metadata(tmp_path):
    tokens = torch.randn(3, 2, 4)
    save_features(tmp_path / "f.safetensors", tokens, {"fps": "2.0", "encoder": "tiny"})
    loaded, meta = load_features(tmp_path / "f.safetensors")
    assert torch.equal(loaded, tokens) and meta["encoder"] == "tiny"
    assert [p.name for p in tmp_path.iterdir()] == ["f.safetensors"]  # no temporary left behind


def test_encode_cache_is_resumable_and_ignores_half_written_files(tmp_path):
    """A killed `data encode` leaves only a temporary file; the rerun encodes just what is missing."""
    from transformers import Dinov2Config, Dinov2Model

    from livevlm.data.features import encode_dialogue_videos
    from livevlm.vision import build_frame_encoder
    from livevlm.world import WorldSpec, render_video

    for i in range(2):
        render_video(WorldSpec(seed=5, index=i, duration=3.0, size=64), tmp_path / "videos" / f"{i:03d}.mp4")
    write_dialogues(tmp_path / "d.jsonl", [narration(0, duration=3.0), narration(1, duration=3.0)])
    torch.manual_seed(0)
    tower = Dinov2Model(Dinov2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     patch_size=8, image_size=32))
    encoder = build_frame_encoder(tower, image_size=32, grid=2)
    cache = tmp_path / "cache"
    first, second = encode_dialogue_videos(tmp_path / "d.jsonl", encoder, cache)
    assert load_features(first)[0].shape == (6, 5, 16)  # 3 s at 2 fps, CLS + 2x2 grid
    kept = first.stat().st_mtime_ns
    second.unlink()  # "killed" before the second video finished: only a half-written temporary remains
    (cache / f".{second.name}.tmp-999").write_bytes(b"half a file")
    calls = []
    original = encoder.encode

    def counting_encode(frames, batch_size=32):  # frames may be a stream: count the tokens it gives
        tokens = original(frames, batch_size)
        calls.append(len(tokens))
        return tokens

    encoder.encode = counting_encode
    encode_dialogue_videos(tmp_path / "d.jsonl", encoder, cache)
    assert calls == [6]  # only the missing video was encoded again
    assert first.stat().st_mtime_ns == kept
    assert load_features(second)[0].shape == (6, 5, 16)


def test_encode_with_decode_workers_writes_the_same_features(tmp_path):
    """Videos decoded by worker processes give the very tokens one process gives, in every file."""
    from transformers import Dinov2Config, Dinov2Model

    from livevlm.data.features import encode_dialogue_videos
    from livevlm.vision import build_frame_encoder
    from livevlm.world import WorldSpec, render_video

    for i in range(3):
        render_video(WorldSpec(seed=6, index=i, duration=3.0, size=64), tmp_path / "videos" / f"{i:03d}.mp4")
    write_dialogues(tmp_path / "d.jsonl", [narration(i, duration=3.0) for i in range(3)])
    torch.manual_seed(0)
    tower = Dinov2Model(Dinov2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     patch_size=8, image_size=32))
    encoder = build_frame_encoder(tower, image_size=32, grid=2)
    one = encode_dialogue_videos(tmp_path / "d.jsonl", encoder, tmp_path / "one", batch_size=3)
    two = encode_dialogue_videos(tmp_path / "d.jsonl", encoder, tmp_path / "two", batch_size=3, workers=2)
    assert [f.name for f in one] == [f.name for f in two]
    for a, b in zip(one, two, strict=True):
        assert torch.equal(load_features(a)[0], load_features(b)[0])


def test_a_clip_encoded_on_the_fly_has_the_tokens_of_the_whole_videos_cache(tmp_path, fmt):
    """A clip that starts mid-video, encoded on the fly by a `change_hues` encoder, compares its first frame with
    the frame before the clip, as the whole video's cache does: training reads the same tokens either way."""
    from transformers import Dinov2Config, Dinov2Model

    from livevlm.data.features import encode_dialogue_videos
    from livevlm.vision import build_frame_encoder
    from livevlm.world import WorldSpec, render_video

    render_video(WorldSpec(seed=5, index=0, duration=6.0, size=64), tmp_path / "videos" / "000.mp4")
    clip = {**narration(0, duration=6.0), "start_s": 3.0, "end_s": 6.0,  # an object moves at 3.0 s
            "turns": [{"role": "user", "time_s": 3.0, "text": "Narrate."},
                      {"role": "assistant", "time_s": 3.0, "text": "Sure."},
                      {"role": "assistant", "time_s": 4.0, "text": "A red circle appears."}]}
    write_dialogues(tmp_path / "d.jsonl", [clip])
    torch.manual_seed(0)
    tower = Dinov2Model(Dinov2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     patch_size=8, image_size=32))
    encoder = build_frame_encoder(tower, image_size=32, grid=1, hue_bins=6, change_hues=True)
    encode_dialogue_videos(tmp_path / "d.jsonl", encoder, tmp_path / "cache")
    cached = StreamDataset(tmp_path / "d.jsonl", fmt, cache_dir=tmp_path / "cache")[0].frame_tokens
    on_the_fly = StreamDataset(tmp_path / "d.jsonl", fmt, encoder=encoder)[0].frame_tokens
    assert cached.shape == (6, 2, 16 + 6 + 6)  # 3-6 s at 2 fps; CLS + 1x1 grid
    assert cached[0, :, -6:].sum() > 0  # the clip's first frame changed since the one before
    assert torch.allclose(on_the_fly, cached, atol=1e-5)


def clip(start_s, end_s, i=0):
    """A two-turn clip of video i between start_s and end_s (as `--from world-changes` writes them)."""
    return {"id": f"c{i}-{start_s}", "video": f"videos/{i:03d}.mp4", "fps": 2.0, "duration_s": 6.0,
            "start_s": start_s, "end_s": end_s,
            "turns": [{"role": "user", "time_s": end_s - 0.5, "text": "What just changed?"},
                      {"role": "assistant", "time_s": end_s - 0.5, "text": "A red circle appears."}]}


@pytest.fixture
def change_encoder():
    from transformers import Dinov2Config, Dinov2Model

    from livevlm.vision import build_frame_encoder

    torch.manual_seed(0)
    tower = Dinov2Model(Dinov2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     patch_size=8, image_size=32))
    return build_frame_encoder(tower, image_size=32, grid=1, hue_bins=6, change_hues=True)


def test_a_used_frames_cache_holds_only_the_clips_frames_with_the_whole_videos_tokens(tmp_path, fmt, change_encoder):
    """`--used-frames-only` encodes the frames the clips cover (0-1, 6-8 and 10 of 12: clips at 0-1 s, 3-4 s,
    3.5-4.5 s and 5-5.5 s), each run compared with the frame before it, so training reads the same tokens as
    from the whole video's cache."""
    from livevlm.data.features import encode_dialogue_videos
    from livevlm.world import WorldSpec, render_video

    render_video(WorldSpec(seed=5, index=0, duration=6.0, size=64), tmp_path / "videos" / "000.mp4")
    clips = [clip(0.0, 1.0), clip(3.0, 4.0), clip(3.5, 4.5), clip(5.0, 5.5)]
    write_dialogues(tmp_path / "d.jsonl", clips)
    encode_dialogue_videos(tmp_path / "d.jsonl", change_encoder, tmp_path / "whole", batch_size=4)
    (used,) = encode_dialogue_videos(tmp_path / "d.jsonl", change_encoder, tmp_path / "used", batch_size=2,
                                     used_frames_only=True)
    from safetensors import safe_open

    with safe_open(str(used), framework="pt") as handle:
        assert handle.get_tensor("frame_index").tolist() == [0, 1, 6, 7, 8, 10]
        assert handle.metadata()["video_frames"] == "12"
    whole = StreamDataset(tmp_path / "d.jsonl", fmt, cache_dir=tmp_path / "whole")
    sparse = StreamDataset(tmp_path / "d.jsonl", fmt, cache_dir=tmp_path / "used")
    for index in range(len(clips)):
        expected = whole[index].frame_tokens
        assert expected.shape[0] == sparse[index].frame_tokens.shape[0] > 0
        assert torch.allclose(sparse[index].frame_tokens, expected, atol=1e-5)
    assert whole[1].frame_tokens[0, :, -6:].sum() > 0  # frame 6 changed since frame 5, which was not encoded


def test_a_used_frames_cache_is_reencoded_only_for_frames_it_lacks_and_refuses_others(tmp_path, fmt, change_encoder):
    from livevlm.data.features import FramesNotCachedError, encode_dialogue_videos
    from livevlm.world import WorldSpec, render_video

    render_video(WorldSpec(seed=5, index=0, duration=6.0, size=64), tmp_path / "videos" / "000.mp4")
    write_dialogues(tmp_path / "d.jsonl", [clip(0.0, 1.0)])
    (used,) = encode_dialogue_videos(tmp_path / "d.jsonl", change_encoder, tmp_path / "c", used_frames_only=True)
    kept = used.stat().st_mtime_ns
    encode_dialogue_videos(tmp_path / "d.jsonl", change_encoder, tmp_path / "c", used_frames_only=True)
    assert used.stat().st_mtime_ns == kept  # it holds every frame the file uses: skipped
    write_dialogues(tmp_path / "e.jsonl", [clip(4.0, 5.0)])
    with pytest.raises(FramesNotCachedError, match="frames 8…9 .*--used-frames-only"):
        StreamDataset(tmp_path / "e.jsonl", fmt, cache_dir=tmp_path / "c")[0]
    with pytest.raises(FramesNotCachedError, match="re-encode without it"):
        load_features(used)
    encode_dialogue_videos(tmp_path / "e.jsonl", change_encoder, tmp_path / "c", used_frames_only=True)
    assert StreamDataset(tmp_path / "e.jsonl", fmt, cache_dir=tmp_path / "c")[0].frame_tokens.shape == (2, 2, 28)
    encode_dialogue_videos(tmp_path / "e.jsonl", change_encoder, tmp_path / "c")  # the whole video replaces it
    assert load_features(used)[0].shape == (12, 2, 28)
