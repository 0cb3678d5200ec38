"""Every shipped recipe (recipes/) and experiment recipe (experiments/recipes/) loads and validates; the
accelerate configs parse the way `accelerate launch` reads them.

The DeepSpeed and FSDP configs cannot *run* here: deepspeed is not installed (it builds against CUDA), and
accelerate turns FSDP on only for GPU-like devices (on CPU it silently falls back to DDP over gloo, which
tests/test_train.py runs with two processes). So they are checked the way accelerate consumes them: the
launcher parses the file into its arguments and environment, and accelerate's own plugin classes are built
from that environment.
"""

from pathlib import Path

import pytest
import yaml

from livevlm.config import ConfigError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
RECIPE_FILES = sorted(p for p in RECIPES.glob("*.yaml") if p.name != "base.yaml")  # the default model's, the paper's
EXPERIMENT_FILES = sorted((ROOT / "experiments" / "recipes").glob("*.yaml"))  # not shipped, still must load
ACCELERATE_FILES = sorted((RECIPES / "accelerate").glob("*.yaml"))


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_recipes_are_shipped():
    assert {"default.yaml", "official_v1plus.yaml"} <= {p.name for p in RECIPE_FILES}
    assert {p.name for p in ACCELERATE_FILES} == {"deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"}
    assert EXPERIMENT_FILES, "experiments/recipes/ holds the experiment recipes"
    assert not any(p.name.startswith("experiment-") for p in RECIPE_FILES), "experiments live in experiments/"


@pytest.mark.parametrize("path", RECIPE_FILES + EXPERIMENT_FILES + ACCELERATE_FILES, ids=_name)
def test_every_recipe_says_how_to_run_it(path):
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    runs = ("livevlm train", "livevlm.cli train")
    assert any(command in line for line in header for command in runs), path


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=_name)
def test_every_experiment_recipe_names_its_own_path(path):
    """The header's `livevlm train` line must point at where the file is now, not at recipes/."""
    assert f"livevlm train {_name(path)}" in path.read_text(), path


@pytest.mark.parametrize("path", RECIPE_FILES + EXPERIMENT_FILES, ids=_name)
def test_every_recipe_loads_and_validates(path):
    recipe = load_recipe(path)
    assert recipe.train.output_dir


def test_official_recipe_is_the_papers_setup():
    recipe = load_recipe(RECIPES / "official_v1plus.yaml")
    model, train = recipe.model, recipe.train
    assert (model.frame_size, model.tokens_per_frame, model.connector_hidden) == (384, 10, 4096)
    assert (model.finetune, model.lora_r, model.lora_alpha, model.lora_dropout) == ("lora", 128, 256, 0.05)
    assert model.lora_targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                  "lm_head"]
    assert (train.lr, train.epochs, train.batch_size * train.grad_accum) == (2e-4, 2, 64)
    assert train.bf16 and train.gradient_checkpointing
    assert recipe.format.fps == 2.0 and recipe.format.frames_close == "]\n"


def _launch_args(path: Path):
    """What `accelerate launch --config_file PATH -m livevlm.cli train R.yaml` makes of the file."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(path), "-m", "livevlm.cli", "train", "r.yaml"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    return args, defaults, mixed_precision_from_config


def test_fsdp_config_builds_accelerates_fsdp2_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _launch_args(RECIPES / "accelerate" / "fsdp.yaml")
    assert args.use_fsdp and not args.use_deepspeed and args.mixed_precision == "bf16"
    for key, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2  # per-parameter sharding: frozen base + trainable LoRA in one layer
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.reshard_after_forward is True


@pytest.mark.parametrize(("name", "stage"), [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_configs_build_accelerates_deepspeed_plugin(monkeypatch, name, stage):
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults, mixed_precision_from_config = _launch_args(RECIPES / "accelerate" / name)
    assert args.use_deepspeed and not args.use_fsdp
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)  # as `accelerate launch` sets it
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = DeepSpeedPlugin().deepspeed_config
    assert config["zero_optimization"]["stage"] == stage
    # Batch size and accumulation come from the recipe through HF Trainer ("auto").
    assert config["train_micro_batch_size_per_gpu"] == config["gradient_accumulation_steps"] == "auto"
    # ZeRO-3 shards the weights: they must be gathered on save for the checkpoints to hold them.
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)


def test_the_shipped_recipes_share_their_base(tmp_path):
    """`base: base.yaml` is merged under a recipe, section by section, and the recipe's own keys win. Every
    shipped recipe builds on it, directly or through another shipped recipe (stage 3 on stage 2)."""
    for path in RECIPE_FILES:
        chain = path
        while "base: base.yaml" not in chain.read_text():
            chain = RECIPES / yaml.safe_load(chain.read_text())["base"]
            assert chain in RECIPE_FILES, path
        assert load_recipe(path).model.lora_targets[-1] == "lm_head"  # from the base
    (tmp_path / "b.yaml").write_text("model: {grid: 2, lora_r: 4}\ntrain: {lr: 1.0e-3}\n")
    (tmp_path / "r.yaml").write_text("base: b.yaml\nmodel: {grid: 3}\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    assert (recipe.model.grid, recipe.model.lora_r, recipe.train.lr) == (3, 4, 1.0e-3)
    (tmp_path / "b.yaml").write_text("base: r.yaml\n")
    with pytest.raises(ConfigError, match="comes back to itself"):
        load_recipe(tmp_path / "r.yaml")


def test_the_default_models_stages_chain():
    """Stage 1 → (widened for the changed hues) → stage 1b → stage 2: each starts from the one before, with the
    same model settings (stage 1 without change_hues, which the widening adds), as the build runs them."""
    from dataclasses import asdict, replace

    align, changes, streams = (load_recipe(RECIPES / name) for name in
                               ("default-align.yaml", "default-changes.yaml", "default.yaml"))
    assert asdict(replace(align.model, change_hues=True)) == asdict(changes.model) == asdict(streams.model)
    build = (ROOT / "scripts" / "build_default_model.sh").read_text()
    assert changes.train.init_from == "runs/default-align-chg"
    assert f"python scripts/init_change_hues.py {align.train.output_dir}/model runs/default-align-chg" in build
    assert streams.train.init_from == f"{changes.train.output_dir}/model"
    # stage 1b's clips have a cache of their own, encoded with the streams' inputs (their frames only)
    assert Path(changes.train.features).name == Path(streams.train.features).name == "features-chg12"
    assert (f"livevlm data encode $data/{Path(changes.train.data).relative_to('data')} --out "
            f"$data/{Path(changes.train.features).relative_to('data')} --mean-rgb \\\n  --hue-bins 12 --change-hues "
            "--used-frames-only") in build
    # stage 2 keeps some of stage 1b's clips, from the same file and cache
    assert [(m.data, m.features) for m in streams.train.mix] == [(changes.train.data, changes.train.features)]


def test_the_default_models_notes_stage_follows_the_streams_and_is_what_ships():
    """Stage 3 (notes) starts from stage 2 with its model settings and the notes layout; the build chooses θ for,
    evaluates and packages stage 3's model."""
    from dataclasses import asdict

    streams, notes = (load_recipe(RECIPES / name) for name in ("default.yaml", "default-notes.yaml"))
    assert asdict(notes.model) == asdict(streams.model)
    assert (streams.format.note_role, notes.format.note_role) == ("", "Note")
    assert notes.train.init_from == f"{streams.train.output_dir}/model"
    build = (ROOT / "scripts" / "build_default_model.sh").read_text()
    assert build.index("livevlm train recipes/default.yaml") < build.index("livevlm train recipes/default-notes.yaml")
    model = f"{notes.train.output_dir}/model"
    assert f"livevlm evaluate --model {model} " in build and build.rstrip().endswith(f"package-default {model}")
    # every file the stage reads is made by the build
    for path in [notes.train.data, *(m.data for m in notes.train.mix)]:
        assert f" $data/{Path(path).relative_to('data')}\n" in build, path


def test_the_shipped_default_model_was_trained_with_the_default_recipes_model_settings():
    """What `scripts/build_default_model.sh` trains is what ships (a setting the checkpoint omits has its default)."""
    from dataclasses import asdict, fields

    import yaml

    from livevlm.config import ModelConfig

    shipped = yaml.safe_load((ROOT / "src" / "livevlm" / "assets" / "default_model" / "livevlm.yaml").read_text())
    defaults = {f.name: f.default for f in fields(ModelConfig)}
    recipe = asdict(load_recipe(RECIPES / "default-notes.yaml").model)
    assert {name: shipped["model"].get(name, defaults[name]) for name in recipe} == recipe
    assert shipped["format"]["note_role"] == load_recipe(RECIPES / "default-notes.yaml").format.note_role
