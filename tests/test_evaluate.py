"""`livevlm evaluate` end to end on a tiny random checkpoint, and calibrating a model's speak threshold."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_llm
from livevlm.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_recommended_threshold,
    resolve_threshold,
    save_checkpoint,
    store_recommended_threshold,
)
from livevlm.cli import run
from livevlm.config import ConfigError, FormatConfig, ModelConfig
from livevlm.data.features import feature_name, load_features, save_features
from livevlm.default_model import DEFAULT_MODEL_DIR
from livevlm.evaluation.free_running import choose_free_running_threshold
from livevlm.evaluation.stream_eval import choose_threshold, json_ready, sweep_edge_warning
from livevlm.model import build_live_model

FRAMES, VISION_DIM = 8, 16  # 4 s at 2 fps; a pooled token + a 1x1 grid per frame


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny connector-only checkpoint, 3 narration dialogues and their feature cache."""
    root = tmp_path_factory.mktemp("evaluate")
    tokenizer, placeholder, llm = save_tiny_llm(root / "llm")
    config = ModelConfig(llm=str(root / "llm"), grid=1, finetune="connector")
    torch.manual_seed(0)
    model = build_live_model(config, llm, vision_dim=VISION_DIM, placeholder_id=placeholder)
    save_checkpoint(model, tokenizer, config, FormatConfig(), root / "ckpt")
    generator = torch.Generator().manual_seed(0)
    lines = []
    for i in range(3):
        video = f"videos/{i:03d}.mp4"
        save_features(root / "features" / feature_name(video), torch.randn(FRAMES, 2, VISION_DIM, generator=generator),
                      {"fps": "2.0"})
        turns = [{"role": "user", "time_s": 0.0, "text": "Please narrate the video in real time."},
                 {"role": "assistant", "time_s": 0.0, "text": "Sure."},
                 {"role": "assistant", "time_s": 1.5 + 0.5 * i, "text": "A red circle appears."}]
        lines.append(json.dumps({"id": f"d{i}", "video": video, "fps": 2.0, "duration_s": 4.0, "turns": turns}))
    (root / "dialogues.jsonl").write_text("\n".join(lines) + "\n")
    return root / "ckpt", root / "dialogues.jsonl", root / "features"


def evaluate(capsys, *args: str) -> dict:
    assert run(["evaluate", *args]) == 0
    return json.loads(capsys.readouterr().out, parse_constant=reject_non_json)


def reject_non_json(constant: str) -> None:
    raise AssertionError(f"evaluate printed {constant}, which is not JSON")


def test_evaluate_prints_the_four_metrics_at_the_engine_threshold_and_zero(setup, capsys):
    ckpt, data, features = setup
    result = evaluate(capsys, "--model", str(ckpt), "--data", str(data), "--features", str(features))
    assert result["threshold"] == 0.725 and set(result["by_threshold"]) == {"0.725", "0.0"}
    assert result["lm_ppl"] >= 1.0 and result["time_diff_s"] >= 0.0
    assert 0.0 <= result["lm_correctness"] <= 1.0 and 0.0 <= result["fluency"] <= 1.0
    assert result["dialogues"] == 3


def test_features_of_another_width_than_the_model_takes_are_named(setup, tmp_path, capsys):
    ckpt, data, features = setup
    for file in features.glob("*.safetensors"):  # as if encoded with --mean-rgb for a model without it
        tokens, meta = load_features(file)
        save_features(tmp_path / file.name, torch.cat([tokens, torch.zeros(*tokens.shape[:2], 3)], -1), meta)
    assert run(["evaluate", "--model", str(ckpt), "--data", str(data), "--features", str(tmp_path)]) != 0
    assert "frame tokens are 19 wide, the model takes 16" in capsys.readouterr().err


def test_evaluate_in_bfloat16_agrees_with_float32(setup, capsys):
    """The precision a GPU gets by default (`--dtype auto`) changes the figures by rounding only."""
    ckpt, data, features = setup
    common = ["--model", str(ckpt), "--data", str(data), "--features", str(features), "--device", "cpu"]
    full = evaluate(capsys, *common, "--dtype", "float32")
    half = evaluate(capsys, *common, "--dtype", "bfloat16")
    assert half["lm_ppl"] == pytest.approx(full["lm_ppl"], rel=0.05)
    assert half["turns"] == full["turns"] and half["dialogues"] == full["dialogues"] == 3


def test_choose_threshold_stores_the_best_timed_and_later_runs_use_it(setup, capsys, tmp_path):
    ckpt, data, features = setup
    model = Path(shutil.copytree(ckpt, tmp_path / "ckpt"))
    common = ["--model", str(model), "--data", str(data), "--features", str(features)]
    sweep = ["--threshold", "0", "--threshold", "0.5", "--threshold", "0.999"]
    result = evaluate(capsys, *common, *sweep, "--choose-threshold")
    scores = {float(t): (-m["within_1s"], m["time_diff_s"], abs(float(t) - 0.725))
              for t, m in result["by_threshold"].items()}
    assert result["chosen_threshold"] == min(scores, key=scores.get)
    assert read_recommended_threshold(model) == result["chosen_threshold"]
    again = evaluate(capsys, *common)
    assert again["threshold"] == result["chosen_threshold"]
    assert {float(t) for t in again["by_threshold"]} == {result["chosen_threshold"], 0.725, 0.0}


def test_a_threshold_chosen_at_the_edge_of_the_sweep_asks_to_sweep_past_it():
    assert "highest" in sweep_edge_warning(0.875, [0.725, 0.8, 0.875])
    assert "lowest" in sweep_edge_warning(0.6, [0.6, 0.7, 0.8])
    assert sweep_edge_warning(0.8, [0.6, 0.8, 0.9]) is None
    assert sweep_edge_warning(0.8, [0.8]) is None  # one θ is no sweep


def test_choose_threshold_refuses_the_shipped_default_model(setup, capsys):
    _, data, features = setup
    assert run(["evaluate", "--data", str(data), "--features", str(features), "--choose-threshold"]) == 2
    assert "read-only" in capsys.readouterr().err
    assert run(["evaluate", "--model", str(DEFAULT_MODEL_DIR), "--data", str(data), "--features", str(features),
                "--choose-threshold"]) == 2
    assert "read-only" in capsys.readouterr().err


def test_choosing_takes_the_most_turns_within_1s_then_the_lowest_time_diff_then_the_engine_default():
    def m(within: float, diff: float) -> dict[str, float]:
        return {"within_1s": within, "time_diff_s": diff}

    assert choose_threshold({"0.725": m(0.75, 2.3), "0.9": m(0.70, 1.9), "0.0": m(0.5, 3.7)}) == 0.725
    assert choose_threshold({"0.725": m(0.75, 2.3), "0.8": m(0.75, 2.0)}) == 0.8
    assert choose_threshold({"0.9": m(0.75, 2.0), "0.7": m(0.75, 2.0)}) == 0.7
    with pytest.raises(ValueError, match="no timed turns"):
        choose_threshold({"0.725": m(math.nan, math.nan)})


def test_a_stored_threshold_is_loaded_and_an_explicit_one_wins(setup, tmp_path):
    ckpt, _, _ = setup
    assert load_checkpoint(ckpt).threshold is None
    assert resolve_threshold(None, load_checkpoint(ckpt)) == 0.725
    model = Path(shutil.copytree(ckpt, tmp_path / "m"))
    store_recommended_threshold(model, 0.8)
    loaded = load_checkpoint(model)
    assert loaded.threshold == 0.8 and loaded.model_config == load_checkpoint(ckpt).model_config
    assert resolve_threshold(None, loaded) == 0.8 and resolve_threshold(0.5, loaded) == 0.5


def test_a_bad_stored_threshold_names_the_key(tmp_path):
    (tmp_path / "livevlm.yaml").write_text("model: {}\nengine: {threshold: 1.5}\n")
    with pytest.raises(ConfigError, match="engine.threshold"):
        read_recommended_threshold(tmp_path)
    (tmp_path / "livevlm.yaml").write_text("model: {}\nengine: {max_new_tokens: 3}\n")
    with pytest.raises(CheckpointError, match="only `threshold`"):
        read_recommended_threshold(tmp_path)
    with pytest.raises(ConfigError, match="engine.threshold"):
        store_recommended_threshold(tmp_path, -0.1)


def test_nan_and_infinite_metrics_print_as_null_at_any_depth():
    result = {"by_task": {"questions": {"time_diff_s": math.nan, "fluency": 0.5}}, "sweep": [math.inf, 1.0, 2]}
    assert json_ready(result) == {"by_task": {"questions": {"time_diff_s": None, "fluency": 0.5}},
                                  "sweep": [None, 1.0, 2]}


def test_the_python_api_takes_any_iterable_of_thresholds(setup, capsys):
    """`livevlm.evaluate` reads the θs once: a generator gives the same figures as the command's list."""
    import livevlm

    ckpt, data, features = setup
    by_api = livevlm.evaluate(ckpt, data, features=features, thresholds=(t for t in (0.5, 0.725)), device="cpu")
    by_command = evaluate(capsys, "--model", str(ckpt), "--data", str(data), "--features", str(features),
                          "--threshold", "0.5", "--threshold", "0.725")
    assert set(by_api["by_threshold"]) == {"0.5", "0.725"}
    assert json.loads(json.dumps(json_ready(by_api))) == by_command


# ---------------------------------------------------------------------------------------------------
# --free-running: the real engine, its own responses matched to the ground-truth turns


def test_free_running_scores_by_hand_when_every_frame_speaks(setup, capsys):
    """θ = 1: the model speaks after every one of the 8 frames (0, 0.5, … 3.5 s) of each of the 3 dialogues.
    The one spontaneous turn of dialogue i (at 1.5 + 0.5 i s) is matched at offset 0; the 4 other responses
    within 1 s of it are duplicates; "Sure." answers the query and is not a trigger."""
    ckpt, data, features = setup
    result = evaluate(capsys, "--model", str(ckpt), "--data", str(data), "--features", str(features),
                      "--free-running", "--threshold", "1.0", "--max-new-tokens", "3")
    assert (result["turns"], result["responses"], result["matched"], result["answers"]) == (3, 24, 3, 3)
    assert result["trigger_precision"] == 3 / 24 and result["trigger_recall"] == 1.0 and result["time_diff_s"] == 0
    p, r = result["trigger_precision"], result["trigger_recall"]
    assert result["trigger_f1"] == pytest.approx(2 * p * r / (p + r))
    assert result["duplicate_ratio"] == 12 / 24
    assert set(result["by_task"]) == {"all"} and result["by_task"]["all"]["turns"] == 3


def test_free_running_resumes_from_its_results_file_and_refuses_other_settings(setup, capsys, tmp_path):
    ckpt, data, features = setup
    results = tmp_path / "results.jsonl"
    common = ["--model", str(ckpt), "--data", str(data), "--features", str(features), "--free-running",
              "--results", str(results), "--max-new-tokens", "3"]
    first = evaluate(capsys, *common, "--limit", "2")
    assert first["dialogues"] == 2 and len(results.read_text().splitlines()) == 2
    full = evaluate(capsys, *common)  # streams only the third dialogue
    assert full["dialogues"] == 3 and len(results.read_text().splitlines()) == 3
    assert run(["evaluate", *common, "--tolerance", "2"]) == 2
    assert "results.jsonl:1 was written with" in capsys.readouterr().err


def test_free_running_choose_threshold_streams_once_per_theta_and_stores_the_best_f1(setup, capsys, tmp_path):
    """Each θ is streamed (its own resumable results file) and scored; the stored θ is the one the rule picks
    from those scores (the rule itself, by hand, is the next test but one)."""
    ckpt, data, features = setup
    model = Path(shutil.copytree(ckpt, tmp_path / "ckpt"))
    results = tmp_path / "sweep.jsonl"
    result = evaluate(capsys, "--model", str(model), "--data", str(data), "--features", str(features),
                      "--free-running", "--choose-threshold", "--threshold", "0.5", "--threshold", "1",
                      "--max-new-tokens", "3", "--results", str(results))
    by_threshold = {float(t): scores for t, scores in result["by_threshold"].items()}
    assert set(by_threshold) == {0.5, 1.0}
    assert by_threshold[1.0]["trigger_f1"] == pytest.approx(2 / 9)  # every frame speaks (the test above)
    assert result["chosen_threshold"] == choose_free_running_threshold(by_threshold)
    assert read_recommended_threshold(model) == result["chosen_threshold"]
    files = {p.name: len(p.read_text().splitlines()) for p in tmp_path.glob("sweep-theta*.jsonl")}
    assert files == {"sweep-theta0.5.jsonl": 3, "sweep-theta1.jsonl": 3}


def test_free_running_choose_threshold_needs_the_thetas_to_try(setup, capsys, tmp_path):
    ckpt, data, features = setup
    model = Path(shutil.copytree(ckpt, tmp_path / "ckpt"))
    common = ["evaluate", "--model", str(model), "--data", str(data), "--features", str(features), "--free-running"]
    assert run([*common, "--choose-threshold"]) == 2
    assert "give the θs to try with --threshold" in capsys.readouterr().err
    assert run([*common, "--threshold", "0.5", "--threshold", "0.7"]) == 2  # several θs only to choose among
    assert "several only with --choose-threshold" in capsys.readouterr().err


def test_the_free_running_choice_takes_the_fewest_duplicates_within_one_turn_of_the_best_f1():
    def m(f1: float, duplicates: float, turns: int = 10) -> dict[str, float]:
        return {"trigger_f1": f1, "duplicate_ratio": duplicates, "turns": turns}

    assert choose_free_running_threshold({0.9: m(0.72, 0.28), 0.7: m(0.91, 0.03), 0.5: m(0.80, 0.0)}) == 0.7
    assert choose_free_running_threshold({0.9: m(0.9, 0.10), 0.8: m(0.9, 0.05)}) == 0.8
    assert choose_free_running_threshold({0.9: m(0.9, 0.05), 0.7: m(0.9, 0.05)}) == 0.7  # nearer 0.725
    # 100 turns: 0.835 and 0.833 are within one turn (0.01), so the fewer duplicates win; 0.82 is not
    assert choose_free_running_threshold({0.8: m(0.835, 0.053, 100), 0.725: m(0.833, 0.028, 100),
                                          0.7: m(0.82, 0.01, 100)}) == 0.725
    assert choose_free_running_threshold({0.8: m(0.835, 0.03, 100), 0.725: m(0.833, 0.03, 100)}) == 0.8  # then F1
    assert choose_free_running_threshold({0.0: m(math.nan, math.nan), 1.0: m(0.1, 0.5)}) == 1.0  # never spoke: F1 0
    with pytest.raises(ValueError, match="no spontaneous turns"):
        choose_free_running_threshold({0.7: m(math.nan, math.nan, turns=0)})


def test_the_world_benchmark_renders_its_videos_once_and_scores_them(tiny_checkpoint, tmp_path):
    import livevlm

    model = livevlm.load(tiny_checkpoint[0], device="cpu")
    first = model.evaluate_world(videos=1, seed=5, duration=4.0, threshold=1.0, cache_dir=tmp_path)
    assert first["benchmark"] == {"name": "world", "videos": 1, "seed": 5, "duration_s": 4.0}
    assert first["dialogues"] >= 2 and first["turns"] >= 1  # narration, reminders, questions of the one video
    assert 1 <= first["matched"] <= min(first["turns"], first["responses"])  # θ = 1 speaks at every frame
    p, r = first["trigger_precision"], first["trigger_recall"]
    assert first["trigger_f1"] == pytest.approx(2 * p * r / (p + r))
    files = sorted(p.name for p in (tmp_path / "world-seed5-1x4s").iterdir())
    assert files == ["annotations.jsonl", "dialogue.jsonl", "videos"]
    mtime = (tmp_path / "world-seed5-1x4s" / "videos" / "000.mp4").stat().st_mtime_ns
    again = model.evaluate_world(videos=1, seed=5, duration=4.0, threshold=1.0, cache_dir=tmp_path)
    assert (tmp_path / "world-seed5-1x4s" / "videos" / "000.mp4").stat().st_mtime_ns == mtime  # reused
    assert again["trigger_f1"] == first["trigger_f1"] and again["object_named"] == first["object_named"]


def test_an_unknown_benchmark_is_refused_before_loading(capsys):
    assert run(["evaluate", "--benchmark", "epic-kitchens"]) == 2
    assert "choose one of world, coin-step" in capsys.readouterr().err


def test_free_running_names_the_record_whose_video_is_missing(setup, capsys, tmp_path):
    ckpt, data, _ = setup
    missing = tmp_path / "missing.jsonl"
    missing.write_text(data.read_text())  # its videos/*.mp4 do not exist next to it: encoding on the fly fails
    assert run(["evaluate", "--model", str(ckpt), "--data", str(missing), "--free-running"]) == 2
    err = capsys.readouterr().err
    assert "record 'd0' (record 1)" in err and "videos/000.mp4" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------
# --judge: judge score and PAUC (livevlm.evaluation.judge, livevlm.evaluation.pauc)


def test_free_running_with_the_words_judge_adds_judge_score_and_pauc(setup, capsys):
    ckpt, data, features = setup
    result = evaluate(capsys, "--model", str(ckpt), "--data", str(data), "--features", str(features),
                      "--free-running", "--threshold", "1.0", "--max-new-tokens", "3", "--judge", "words")
    assert result["judge"] == "words" and 1.0 <= result["judge_score"] <= 5.0
    assert set(result["pauc"]) == {"0", "0.5", "1"} and all(0.0 <= v <= 1.0 for v in result["pauc"].values())
    assert result["by_task"]["all"]["pauc"] == result["pauc"]


def test_an_unreachable_judge_names_its_url_and_keeps_the_finished_records(setup, capsys, tmp_path):
    import socket

    ckpt, data, features = setup
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    results = tmp_path / "results.jsonl"
    common = ["--model", str(ckpt), "--data", str(data), "--features", str(features), "--free-running",
              "--max-new-tokens", "3", "--results", str(results)]
    assert run(["evaluate", *common, "--judge", "openai", "--base-url", url, "--judge-model", "m",
                "--judge-retries", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # one line, after the retries' warnings
    assert f"{url}/chat/completions: cannot connect" in err and "gave up after 2 attempts" in err
    assert f"the 1 dialogue(s) streamed so far are kept in {results}: run the same command again" in err
    assert [json.loads(line)["id"] for line in results.read_text().splitlines()] == ["d0"]  # streamed, not judged
    resumed = evaluate(capsys, *common, "--judge", "words")  # judges d0 from the file, streams d1 and d2
    assert resumed["dialogues"] == 3 and resumed["judge"] == "words"
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["id"], r.get("judge")) for r in lines] == [("d0", None), ("d0", "words"), ("d1", "words"),
                                                          ("d2", "words")]
