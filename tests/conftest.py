"""Shared fixtures: a tiny tokenizer trained in-process and a tiny random LLM; no downloads, ever."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental hub download fails loudly instead of hanging
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402

from livevlm import runtime  # noqa: E402

runtime.cap_onednn_isa()  # what the `livevlm` command does; bf16 tests need it on CPUs that report AMX

import torch  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that needs a default backbone whose PyPI package is not installed is skipped, not failed: the
    skip reason is the error's message, which gives the pip command (`backbones.MissingAssetError`)."""
    from livevlm.backbones import MissingAssetError

    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and call.excinfo.errisinstance(MissingAssetError):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {call.excinfo.value}")


TINY_CORPUS = [
    "A multimodal AI assistant is helping users with some activities.",
    "Below is their conversation, interleaved with the list of video frames received by the assistant.",
    "User: Please narrate the video in real time. Assistant: Sure. A red circle appears on the left.",
    "A blue square leaves. A green triangle moves to the right. What just happened? It stopped.",
]


def build_tiny_tokenizer():
    """A byte-level BPE with ~300 tokens, trained on a few sentences: fast, deterministic, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_tokenizer():
    return build_tiny_tokenizer()


def build_tiny_llm(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return LlamaForCausalLM(config).eval()


def save_tiny_llm(folder):
    """A tiny tokenizer with the `<v>` placeholder registered and a tiny LLM sized for it, both saved in
    `folder` (a checkpoint's `model.llm`). Returns (tokenizer, placeholder id, llm)."""
    from livevlm.stream_format import register_placeholder

    tokenizer = build_tiny_tokenizer()
    placeholder = register_placeholder(tokenizer)
    llm = build_tiny_llm(len(tokenizer))
    llm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer, placeholder, llm


@pytest.fixture
def tiny_llm(tiny_tokenizer):
    return build_tiny_llm(len(tiny_tokenizer))


# --- the packaged backbones, converted once per test session (SmolLM2 ~17 s, DINOv2 ~3 s) ------------


@pytest.fixture(scope="session")
def asset_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("livevlm-cache")


@pytest.fixture(scope="session")
def dinov2_dir(asset_cache):
    from livevlm import backbones

    return backbones.materialize_dinov2(asset_cache)


@pytest.fixture(scope="session")
def smollm2_dir(asset_cache):
    from livevlm import backbones

    return backbones.materialize_smollm2(asset_cache)


@pytest.fixture
def smollm2_tokenizer(smollm2_dir):
    """A fresh SmolLM2 tokenizer with the frame placeholder registered."""
    from transformers import AutoTokenizer

    from livevlm.stream_format import register_placeholder

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    register_placeholder(tokenizer)
    return tokenizer


def bias_separator(model, separator_id: int, bias: float):
    """Give a LiveModel's LM head a bias towards the separator, so that a random model stays silent where
    its P(separator) is above θ (the decision rule also asks the separator to be the argmax)."""
    from torch import nn

    head = model.llm.lm_head
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[separator_id] = bias
    model.llm.lm_head = biased
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved checkpoint of a tiny random model (LLM + DINOv2 tower + connector) and a 6-s synthetic-world
    video: (checkpoint folder, video path). What the command line and the API load in tests."""
    from transformers import Dinov2Config, Dinov2Model

    from livevlm.checkpoint import save_checkpoint
    from livevlm.config import FormatConfig, ModelConfig
    from livevlm.model import build_live_model
    from livevlm.world import WorldSpec, render_video

    root = tmp_path_factory.mktemp("stream")
    tokenizer, placeholder, llm = save_tiny_llm(root / "llm")
    torch.manual_seed(0)
    tower = Dinov2Model(Dinov2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     patch_size=8, image_size=32))
    tower.save_pretrained(root / "vision")
    config = ModelConfig(llm=str(root / "llm"), vision=str(root / "vision"), frame_size=32, grid=2,
                         finetune="connector")
    model = build_live_model(config, llm, vision_dim=16, placeholder_id=placeholder)
    save_checkpoint(model, tokenizer, config, FormatConfig(), root / "ckpt")
    video = root / "world.mp4"
    render_video(WorldSpec(seed=3, index=0, duration=6.0, size=64), video)
    return root / "ckpt", video


@pytest.fixture(scope="session")
def load_script():
    """Import a script of the repository that is not a package module (`benchmarks/…`), by its path."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def load(relative: str):
        spec = importlib.util.spec_from_file_location(Path(relative).stem, root / relative)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
