"""`livevlm train` on a tiny random LLM: the loss falls, a killed run resumes to the same loss curve,
a full disk keeps the previous checkpoint, and bad input (recipe keys, missing features) is named."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_llm, build_tiny_tokenizer
from livevlm.checkpoint import CheckpointError, load_checkpoint
from livevlm.cli import CommandError
from livevlm.cli.arguments import add_dataclass_arguments, dataclass_from_namespace
from livevlm.cli.train import TrainArgs
from livevlm.cli.train import train as train_command
from livevlm.config import ConfigError, ModelConfig, load_recipe
from livevlm.data.dataset import MissingFeaturesError
from livevlm.data.features import feature_name, save_features
from livevlm.train import bf16_supported, latest_checkpoint, read_metrics, train

TEXTS = ["A red circle appears on the left.", "A blue square leaves.", "A green triangle moves to the right.",
         "It stopped."]
NUM_DIALOGUES = 8
FRAMES, TOKENS_PER_FRAME, VISION_DIM = 8, 2, 16  # 4 s at 2 fps; pooled token + 1x1 grid


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny LLM folder, 8 narration-like dialogues and their feature cache ([8, 2, 16] random tokens)."""
    root = tmp_path_factory.mktemp("train")
    tokenizer = build_tiny_tokenizer()
    build_tiny_llm(len(tokenizer)).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    generator = torch.Generator().manual_seed(0)
    lines = []
    for i in range(NUM_DIALOGUES):
        video = f"videos/{i:03d}.mp4"
        tokens = torch.randn(FRAMES, TOKENS_PER_FRAME, VISION_DIM, generator=generator)
        save_features(root / "features" / feature_name(video), tokens, {"fps": "2.0"})
        turns = [{"role": "user", "time_s": 0.0, "text": "Please narrate the video in real time."},
                 {"role": "assistant", "time_s": 0.0, "text": "Sure."},
                 {"role": "assistant", "time_s": 1.0 + 0.5 * (i % 3), "text": TEXTS[i % 4]},
                 {"role": "assistant", "time_s": 3.0, "text": TEXTS[(i + 1) % 4]}]
        lines.append(json.dumps({"id": f"d{i}", "video": video, "fps": 2.0, "duration_s": 4.0, "turns": turns}))
    (root / "dialogues.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is ~5x faster than two on a shared 2-core machine, and deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_recipe(workdir: Path, out: Path, **train: object) -> Path:
    """A recipe for the tiny setup: LoRA with dropout (so resuming must restore the RNG), batch 2 x 2."""
    settings = {"data": str(workdir / "dialogues.jsonl"), "features": str(workdir / "features"),
                "output_dir": str(out / "run"), "max_steps": 6, "batch_size": 2, "grad_accum": 2, "lr": 5e-3,
                "warmup_ratio": 0.1, "save_steps": 2, "log_steps": 1, "seed": 0, **train}
    recipe = {"model": {"llm": str(workdir / "llm"), "grid": 1, "pooled_token": True, "finetune": "lora",
                        "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1},
              "train": settings}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_loss_falls_and_the_result_is_a_livevlm_checkpoint(workdir, tmp_path):
    recipe = load_recipe(write_recipe(workdir, tmp_path, max_steps=12, batch_size=4, grad_accum=1, lr=2e-2,
                                      eval_data=str(workdir / "dialogues.jsonl"), eval_steps=6))
    folder = train(recipe)
    curve = [loss for _, loss in losses(tmp_path / "run")]
    assert len(curve) == 12
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.3
    evals = [(r["step"], r["eval_loss"]) for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in r]
    assert [step for step, _ in evals] == [6, 12] and evals[1][1] < evals[0][1]
    loaded = load_checkpoint(folder)  # connector + LoRA only, loadable by the engine
    assert loaded.model.connector.fc1.in_features == VISION_DIM
    assert {p.name for p in folder.iterdir()} >= {"livevlm.yaml", "connector.safetensors", "adapter_model.safetensors"}


def test_key_frame_weight_reaches_the_loss_through_the_key_frames_only(workdir, tmp_path):
    marked = tmp_path / "marked.jsonl"  # the same dialogues, each with its first speaking frame as a key frame
    lines = [json.loads(line) for line in (workdir / "dialogues.jsonl").read_text().splitlines()]
    marked.write_text("".join(json.dumps(d | {"key_frames_s": [d["turns"][2]["time_s"]]}) + "\n" for d in lines))

    def first_loss(name: str, data: Path, weight: float) -> float:
        train(load_recipe(write_recipe(workdir, tmp_path / name, data=str(data), max_steps=1, key_frame_weight=weight)))
        return losses(tmp_path / name / "run")[0][1]

    plain = first_loss("plain1", workdir / "dialogues.jsonl", 1.0)
    assert first_loss("plain3", workdir / "dialogues.jsonl", 3.0) == plain  # no key frames: the weight does nothing
    assert first_loss("marked1", marked, 1.0) == plain  # weight 1: the marks do nothing
    assert first_loss("marked3", marked, 3.0) > plain


KILLER = """
import os, signal, sys
import livevlm
from transformers import TrainerCallback
from livevlm.config import load_recipe
from livevlm.train import train

class KillAfterLogging(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step == int(sys.argv[2]) and "loss" in (logs or {}):
            os.kill(os.getpid(), signal.SIGKILL)

train(load_recipe(sys.argv[1]), callbacks=[KillAfterLogging()])
"""


def test_killed_run_resumes_to_the_same_loss_curve(workdir, tmp_path):
    """SIGKILL after step 4 is logged (checkpoint-3 on disk, step 4 lost), rerun: same curve and weights.

    LoRA dropout is on, an epoch is 2 steps and checkpoint-3 lies mid-epoch, so the RNG state and the
    position inside the epoch both matter (dropping either breaks the equality).
    """
    whole = load_recipe(write_recipe(workdir, tmp_path / "whole", save_steps=3))
    train(whole)
    expected = losses(tmp_path / "whole" / "run")

    recipe_path = write_recipe(workdir, tmp_path / "killed", save_steps=3)
    run = tmp_path / "killed" / "run"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(recipe_path), "4"], env=env, capture_output=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4]  # step 4 was logged, then the process died
    assert latest_checkpoint(run).name == "checkpoint-3"

    train(load_recipe(recipe_path))  # resume="auto"
    resumed = losses(run)
    assert [s for s, _ in resumed] == [s for s, _ in expected] == [1, 2, 3, 4, 5, 6]
    assert resumed == expected  # bit-exact: same data order, dropout masks, optimizer and schedule
    for name in ("connector.safetensors", "adapter_model.safetensors"):
        final = load_file(str(run / "model" / name))
        reference = load_file(str(tmp_path / "whole" / "run" / "model" / name))
        assert final.keys() == reference.keys()
        assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_disk_full_while_writing_the_livevlm_checkpoint_keeps_the_previous_one(workdir, tmp_path, monkeypatch):
    recipe = load_recipe(write_recipe(workdir, tmp_path, max_steps=4))
    import livevlm.checkpoint

    real_save = livevlm.checkpoint.save_file
    calls = []

    def save_until_disk_full(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) > 1:  # the livevlm checkpoint of step 2 is written, the one of step 4 hits ENOSPC
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(livevlm.checkpoint, "save_file", save_until_disk_full)
    with pytest.raises(OSError, match="previous one there is intact") as caught:
        train(recipe)
    assert caught.value.errno == errno.ENOSPC
    run = tmp_path / "run"
    kept = load_file(str(run / "model" / "connector.safetensors"))
    at_step_2 = load_file(str(run / "checkpoint-2" / "model.safetensors"))
    for name, tensor in kept.items():
        assert torch.equal(tensor, at_step_2[f"connector.{name}"])
    assert [p.name for p in run.iterdir() if p.name.startswith(".model")] == []  # no temporary left
    load_checkpoint(run / "model")


def test_disk_full_while_writing_a_trainer_checkpoint_resumes_from_the_previous(workdir, tmp_path, monkeypatch):
    recipe_path = write_recipe(workdir, tmp_path, max_steps=4)
    real_save = torch.save

    def optimizer_hits_full_disk(obj, f, *args, **kwargs):
        if str(f).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", optimizer_hits_full_disk)
    with pytest.raises(OSError, match="No space left"):
        train(load_recipe(recipe_path))
    monkeypatch.undo()
    run = tmp_path / "run"
    assert (run / "checkpoint-4").is_dir() and latest_checkpoint(run).name == "checkpoint-2"
    train(load_recipe(recipe_path))
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4]
    assert latest_checkpoint(run).name == "checkpoint-4"


def test_resuming_with_a_changed_recipe_names_the_changed_keys(workdir, tmp_path, caplog):
    train(load_recipe(write_recipe(workdir, tmp_path, max_steps=2)))
    with caplog.at_level("WARNING", logger="livevlm.train"):
        train(load_recipe(write_recipe(workdir, tmp_path, max_steps=4)))
    assert "changed recipe (train.max_steps)" in caplog.text
    assert [s for s, _ in losses(tmp_path / "run")] == [1, 2, 3, 4]


@pytest.mark.skipif(not bf16_supported(), reason="no bf16 on this machine")
def test_bf16_mixed_precision_trains(workdir, tmp_path):
    train(load_recipe(write_recipe(workdir, tmp_path, max_steps=1, bf16=True)))
    assert len(losses(tmp_path / "run")) == 1


def test_missing_features_name_the_videos(workdir, tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    for i in range(NUM_DIALOGUES):
        if i != 5:
            name = feature_name(f"videos/{i:03d}.mp4")
            (features / name).write_bytes((workdir / "features" / name).read_bytes())
    recipe = load_recipe(write_recipe(workdir, tmp_path, features=str(features)))
    with pytest.raises(MissingFeaturesError, match=r"1 video\(s\) have no features .*videos/005\.mp4"):
        train(recipe)


@pytest.mark.parametrize(("override", "named"), [("train.lrr=1e-4", "train.lrr"),
                                                 ("train.batch_size=two", "train.batch_size"),
                                                 ("train.key_frame_weight=-1", "train.key_frame_weight"),
                                                 ("model.finetune=everything", "model.finetune")])
def test_bad_recipe_key_or_type_is_named(workdir, tmp_path, override, named):
    args = TrainArgs(recipe=str(write_recipe(workdir, tmp_path)), overrides=[override])
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        train_command(args)


def test_bad_key_inside_the_recipe_file_is_named(workdir, tmp_path):
    path = write_recipe(workdir, tmp_path)
    recipe = json.loads(path.read_text())
    recipe["train"]["gradient_accumulation"] = 4
    path.write_text(json.dumps(recipe))
    with pytest.raises(ConfigError, match=r"unknown key train\.gradient_accumulation"):
        load_recipe(path)


def test_a_key_given_twice_in_the_recipe_file_is_named(tmp_path):
    # yaml.safe_load would keep the second `lr` silently; a hand-edited recipe must not run half-read
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n  epochs: 1\n  lr: 5.0e-4\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: line 4: key 'lr' is given twice"):
        load_recipe(path)


def test_a_recipe_that_is_not_yaml_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train: [lr: 1\n")
    with pytest.raises(ConfigError, match=r"r\.yaml is not valid YAML"):
        load_recipe(path)


def test_resume_from_a_folder_that_is_no_checkpoint_says_so(workdir, tmp_path):
    recipe = load_recipe(write_recipe(workdir, tmp_path))
    with pytest.raises(FileNotFoundError, match="not a complete training checkpoint"):
        train(recipe, resume=str(tmp_path))


def test_init_from_starts_training_from_the_checkpoints_weights(workdir, tmp_path):
    from peft import get_peft_model_state_dict
    from transformers import TrainerCallback

    first = train(load_recipe(write_recipe(workdir, tmp_path / "a", max_steps=2)))
    seen: dict[str, dict[str, torch.Tensor]] = {}

    class WeightsAtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["connector"] = {k: v.detach().cpu().clone() for k, v in model.connector.state_dict().items()}
            lora = get_peft_model_state_dict(model.llm, save_embedding_layers=False)
            seen["lora"] = {k: v.detach().cpu().clone() for k, v in lora.items()}

    # another seed: fresh weights would differ from the first run's
    train(load_recipe(write_recipe(workdir, tmp_path / "b", max_steps=1, seed=1, init_from=str(first))),
          callbacks=[WeightsAtStart()])
    for name, start in (("connector", seen["connector"]), ("adapter_model", seen["lora"])):
        saved = load_file(first / f"{name}.safetensors")
        assert saved.keys() == start.keys()
        for key, value in saved.items():
            assert torch.equal(start[key], value), key


def test_init_from_a_full_finetune_checkpoint_starts_from_its_llm(workdir, tmp_path):
    from transformers import AutoModelForCausalLM, TrainerCallback

    recipe = load_recipe(write_recipe(workdir, tmp_path / "a", max_steps=3, lr=5e-2))
    recipe.model.finetune = "full"
    first = train(recipe)
    seen: dict[str, torch.Tensor] = {}

    class WeightsAtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen.update({k: v.detach().cpu().clone() for k, v in model.llm.state_dict().items()})

    recipe = load_recipe(write_recipe(workdir, tmp_path / "b", max_steps=1, init_from=str(first)))
    recipe.model.finetune = "full"
    train(recipe, callbacks=[WeightsAtStart()])
    trained = AutoModelForCausalLM.from_pretrained(first / "llm").state_dict()
    base = build_tiny_llm(len(build_tiny_tokenizer())).state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in trained)  # the first run changed the LLM
    assert all(torch.equal(seen[k], v) for k, v in trained.items())


def test_init_from_a_checkpoint_with_other_lora_settings_names_them(workdir, tmp_path):
    first = train(load_recipe(write_recipe(workdir, tmp_path / "a", max_steps=1)))
    recipe = load_recipe(write_recipe(workdir, tmp_path / "b", max_steps=1, init_from=str(first)))
    recipe.model.lora_r = 4
    with pytest.raises(CheckpointError, match="model.lora_r: 8 in the checkpoint, 4 here"):
        train(recipe)


def test_init_from_a_folder_that_is_no_checkpoint_names_the_setting_before_any_work(workdir, tmp_path):
    recipe = load_recipe(write_recipe(workdir, tmp_path / "b", max_steps=1, init_from=str(tmp_path / "stage1")))
    with pytest.raises(ConfigError, match=r"train.init_from: .*stage1 is not a livevlm checkpoint"):
        train(recipe)
    assert not (tmp_path / "b" / "run").exists()


def test_connector_lr_gives_the_connector_its_own_peak_lr(workdir, tmp_path):
    from transformers import TrainerCallback

    seen: dict[str, list[tuple[float, str]]] = {}

    class GroupsAtFirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if "groups" not in seen:
                names = {id(p): n.split(".")[0] for n, p in model.named_parameters()}
                seen["groups"] = [(group["initial_lr"], names[id(p)]) for group in optimizer.param_groups
                                  for p in group["params"]]

    train(load_recipe(write_recipe(workdir, tmp_path, max_steps=1, lr=1e-3, connector_lr=5e-3)),
          callbacks=[GroupsAtFirstStep()])
    assert set(seen["groups"]) == {(1e-3, "llm"), (5e-3, "connector")}  # the connector's weights and biases


def rgb_features(workdir: Path) -> Path:
    """The workdir's feature cache with 3 colour channels appended, as `data encode --mean_rgb true` writes."""
    from livevlm.data.features import load_features

    out = workdir / "features-rgb"
    if not out.is_dir():
        for file in sorted((workdir / "features").glob("*.safetensors")):
            tokens, meta = load_features(file)
            save_features(out / file.name, torch.cat([tokens, torch.ones(*tokens.shape[:2], 3)], dim=-1),
                          {**meta, "mean_rgb": "True"})
    return out


def test_init_from_a_model_without_colour_starts_a_mean_rgb_model_as_it(workdir, tmp_path):
    from transformers import TrainerCallback

    first = train(load_recipe(write_recipe(workdir, tmp_path / "a", max_steps=2)))
    seen: dict[str, torch.Tensor] = {}

    class ConnectorAtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["fc1"] = model.connector.fc1.weight.detach().cpu().clone()

    recipe = load_recipe(write_recipe(workdir, tmp_path / "b", max_steps=1, init_from=str(first),
                                      features=str(rgb_features(workdir))))
    recipe.model.mean_rgb = True
    train(recipe, callbacks=[ConnectorAtStart()])
    saved = load_file(first / "connector.safetensors")["fc1.weight"]  # [H, 16]
    assert seen["fc1"].shape == (saved.shape[0], VISION_DIM + 3)
    assert torch.equal(seen["fc1"][:, :VISION_DIM], saved)
    assert torch.equal(seen["fc1"][:, VISION_DIM:], torch.zeros(saved.shape[0], 3))  # colour starts unused


def test_init_from_a_colour_model_starts_a_frame_delta_model_as_it(workdir, tmp_path):
    from transformers import TrainerCallback

    rgb = str(rgb_features(workdir))
    first = load_recipe(write_recipe(workdir, tmp_path / "a", max_steps=2, features=rgb))
    first.model.mean_rgb = True
    first = train(first)
    seen: dict[str, torch.Tensor] = {}

    class ConnectorAtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["fc1"] = model.connector.fc1.weight.detach().cpu().clone()

    recipe = load_recipe(write_recipe(workdir, tmp_path / "b", max_steps=1, init_from=str(first), features=rgb))
    recipe.model.mean_rgb = recipe.model.frame_delta = True
    second = train(recipe, callbacks=[ConnectorAtStart()])
    saved = load_file(first / "connector.safetensors")["fc1.weight"]  # [H, 16 + 3]
    assert seen["fc1"].shape == (saved.shape[0], 2 * (VISION_DIM + 3))
    assert torch.equal(seen["fc1"][:, :VISION_DIM + 3], saved)
    assert torch.equal(seen["fc1"][:, VISION_DIM + 3:], torch.zeros_like(saved))  # the changes start unused
    back = load_recipe(write_recipe(workdir, tmp_path / "c", max_steps=1, init_from=str(second), features=rgb))
    back.model.mean_rgb = True
    with pytest.raises(CheckpointError, match="model.frame_delta: True in the checkpoint, False here"):
        train(back)


def test_a_cache_without_colour_for_a_mean_rgb_model_is_named(workdir, tmp_path):
    recipe = load_recipe(write_recipe(workdir, tmp_path, max_steps=1))
    recipe.model.mean_rgb = True
    with pytest.raises(ConfigError, match="model.mean_rgb=True but .* was encoded with mean_rgb=False"):
        train(recipe)


def test_a_cache_without_hues_for_a_hue_bins_model_is_named(workdir, tmp_path):
    recipe = load_recipe(write_recipe(workdir, tmp_path, max_steps=1))
    recipe.model.hue_bins = 12
    with pytest.raises(ConfigError, match="model.hue_bins=12 but .* was encoded with hue_bins=0; re-encode with "
                                          "`livevlm data encode … --hue-bins 12`"):
        train(recipe)


def test_a_cache_without_change_hues_for_a_change_hues_model_is_named(workdir, tmp_path):
    for i in range(NUM_DIALOGUES):  # a cache with hues, encoded without --change-hues
        save_features(tmp_path / "hues" / feature_name(f"videos/{i:03d}.mp4"),
                      torch.zeros(FRAMES, TOKENS_PER_FRAME, VISION_DIM + 12), {"fps": "2.0", "hue_bins": "12"})
    recipe = load_recipe(write_recipe(workdir, tmp_path, max_steps=1, features=str(tmp_path / "hues")))
    recipe.model.hue_bins = 12
    recipe.model.change_hues = True
    with pytest.raises(ConfigError, match="model.change_hues=True but .* was encoded with change_hues=False; "
                                          "re-encode with `livevlm data encode … --change-hues`"):
        train(recipe)


def test_change_hues_without_hue_bins_are_refused_in_the_recipe():
    with pytest.raises(ConfigError, match="model.change_hues needs model.hue_bins"):
        ModelConfig(change_hues=True)


def test_hue_bins_of_two_are_refused_in_the_recipe():
    with pytest.raises(ConfigError, match="model.hue_bins must be 0 .* or at least 3 bins"):
        ModelConfig(hue_bins=2)


def test_more_processes_than_gpus_is_named_before_training(workdir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(CommandError, match=r"2 training processes .* 1 visible GPU\(s\): launch at most 1"):
        train_command(TrainArgs(recipe=str(write_recipe(workdir, tmp_path))))
    assert not (tmp_path / "run").exists()


def test_the_train_command_destroys_the_process_group_before_it_returns(workdir, tmp_path, monkeypatch):
    """A live gloo group at interpreter exit can abort a finished run (SIGABRT): the command ends it."""
    import torch.distributed as dist

    import livevlm.train

    def train_in_a_group(recipe, **_):  # what a torchrun/accelerate launch leaves behind: an initialised group
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        return tmp_path / "run" / "model"

    monkeypatch.setattr(livevlm.train, "train", train_in_a_group)
    assert train_command(TrainArgs(recipe=str(write_recipe(workdir, tmp_path)))) == 0
    assert not dist.is_initialized()


def test_a_finished_rank_of_a_multi_process_launch_leaves_without_finalising(workdir, tmp_path, monkeypatch,
                                                                          capsys):
    """gloo's worker threads can abort a finalising interpreter: a finished rank prints, then leaves by os._exit."""
    import livevlm.train

    class Left(Exception):
        pass

    def leave(code):
        exits.append(code)
        raise Left

    exits: list[int] = []
    monkeypatch.setattr(livevlm.train, "train", lambda recipe, **_: tmp_path / "run" / "model")
    monkeypatch.setattr(os, "_exit", leave)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun / accelerate set for each of two ranks
    with pytest.raises(Left):
        train_command(TrainArgs(recipe=str(write_recipe(workdir, tmp_path))))
    assert exits == [0]
    assert capsys.readouterr().out == f"livevlm checkpoint: {tmp_path / 'run' / 'model'}\n"


def test_command_line_takes_overrides_after_the_recipe():
    import argparse

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainArgs)
    args = dataclass_from_namespace(TrainArgs, parser.parse_args(
        ["r.yaml", "train.lr=1e-4", "model.grid=2", "--resume", "never"]))
    assert args == TrainArgs(recipe="r.yaml", overrides=["train.lr=1e-4", "model.grid=2"], resume="never")


def test_two_processes_over_gloo_train_one_step_on_cpu(workdir, tmp_path):
    """The multi-process path (DDP over gloo, torchrun): gathered token counts, rank 0 alone writes."""
    recipe_path = write_recipe(workdir, tmp_path, max_steps=2, save_steps=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}  # CPU processes even on a GPU machine (two ranks on one GPU fail in NCCL)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "livevlm.cli", "train", str(recipe_path)],
                          env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    run = tmp_path / "run"
    assert [s for s, _ in losses(run)] == [1, 2]  # one line per step: only rank 0 logs
    assert sorted(p.name for p in (run / "checkpoint-2").glob("rng_state_*.pth")) == ["rng_state_0.pth",
                                                                                         "rng_state_1.pth"]
    load_checkpoint(run / "model")


def clip_file(root: Path, count: int) -> Path:
    """`count` two-frame "what just changed?" clips of their own videos, with their own feature cache."""
    generator = torch.Generator().manual_seed(1)
    lines = []
    for i in range(count):
        video = f"videos/clip{i}.mp4"
        save_features(root / "features" / feature_name(video),
                      torch.randn(2, TOKENS_PER_FRAME, VISION_DIM, generator=generator), {"fps": "2.0"})
        turns = [{"role": "user", "time_s": 0.5, "text": "What just changed?"},
                 {"role": "assistant", "time_s": 0.5, "text": TEXTS[i % 4]}]
        lines.append(json.dumps({"id": f"clip{i}", "video": video, "fps": 2.0, "duration_s": 1.0, "turns": turns}))
    (root / "clips.jsonl").write_text("\n".join(lines) + "\n")
    return root / "clips.jsonl"


def test_train_mix_adds_count_dialogues_of_another_file_drawn_once_with_the_seed(workdir, tmp_path):
    from livevlm.stream_format import StreamFormat, register_placeholder
    from livevlm.train import training_set

    clips = clip_file(tmp_path / "clips", 6)
    mix = [{"data": str(clips), "features": str(tmp_path / "clips" / "features"), "count": 3}]
    recipe = load_recipe(write_recipe(workdir, tmp_path, mix=mix))
    tokenizer = build_tiny_tokenizer()
    register_placeholder(tokenizer, recipe.format.placeholder)
    fmt = StreamFormat(tokenizer, recipe.format, recipe.model.tokens_per_frame)
    dataset, width = training_set(recipe.train, fmt, recipe.model)
    assert width == VISION_DIM and len(dataset) == NUM_DIALOGUES + 3
    drawn = dataset.datasets[1]
    expected = sorted(torch.randperm(6, generator=torch.Generator().manual_seed(0))[:3].tolist())  # train.seed=0
    assert list(drawn.indices) == expected
    assert dataset[NUM_DIALOGUES].frame_tokens.shape[0] == 2  # a clip's two frames, from its own cache
    recipe.train.mix[0].count = 0
    assert len(training_set(recipe.train, fmt, recipe.model)[0]) == NUM_DIALOGUES + 6


def test_train_mix_trains_on_both_files(workdir, tmp_path):
    clips = clip_file(tmp_path / "clips", 4)
    mix = [{"data": str(clips), "features": str(tmp_path / "clips" / "features")}]
    folder = train(load_recipe(write_recipe(workdir, tmp_path, max_steps=3, mix=mix)))  # 12 dialogues, batch 2x2
    assert (folder / "adapter_model.safetensors").is_file()
    assert [step for step, _ in losses(tmp_path / "run")] == [1, 2, 3]


def test_a_mixed_file_whose_cache_has_other_channels_is_named(workdir, tmp_path):
    mix = [{"data": str(workdir / "dialogues.jsonl"), "features": str(rgb_features(workdir))}]
    with pytest.raises(ConfigError, match="model.mean_rgb=False but .*features-rgb.* was encoded with mean_rgb=True"):
        train(load_recipe(write_recipe(workdir, tmp_path, max_steps=1, mix=mix)))


@pytest.mark.parametrize("entry, named", [({"data": "nowhere.jsonl", "features": "f"}, r"train.mix\[0\].data"),
                                          ({"features": "f"}, r"train.mix\[0\].data"),
                                          ({"data": "DIALOGUES", "features": "F", "count": 99},
                                           r"train.mix\[0\].count=99 but .* holds 8 dialogues")])
def test_a_bad_mixed_file_is_named(workdir, tmp_path, entry, named):
    entry = {k: str(workdir / "dialogues.jsonl") if v == "DIALOGUES" else str(workdir / "features") if v == "F" else v
             for k, v in entry.items()}
    with pytest.raises(ConfigError, match=named):
        train(load_recipe(write_recipe(workdir, tmp_path, max_steps=1, mix=[entry])))
