"""benchmarks/stream_speed.py: each run's ratio is to the sequential run of its own round (the machine drifts)."""

import pytest


@pytest.fixture(scope="module")
def stream_speed(load_script):
    return load_script("benchmarks/stream_speed.py")


def run(mode: str, fps: float, round_index: int | None, minutes: float = 1.0) -> dict:
    row = {"mode": mode, "fps": fps, "minutes": minutes}
    return row if round_index is None else row | {"round": round_index}


def test_ratio_is_to_the_sequential_run_of_the_same_round(stream_speed):
    runs = [run("sequential", 2.0, 0), run("fast", 6.0, 0), run("sequential", 3.0, 1), run("fast", 6.0, 1)]
    assert stream_speed.sequential_ratios(runs) == [1.0, 3.0, 1.0, 2.0]


def test_without_a_sequential_run_in_its_round_the_ratio_is_to_the_mean_of_all(stream_speed):
    runs = [run("sequential", 2.0, 0), run("sequential", 4.0, 1), run("fast", 9.0, 2)]
    assert stream_speed.sequential_ratios(runs)[2] == 3.0


def test_other_videos_and_missing_baselines_are_kept_apart(stream_speed):
    runs = [run("sequential", 2.0, 0, minutes=1.0), run("fast", 5.0, 0, minutes=10.0)]
    assert stream_speed.sequential_ratios(runs) == [1.0, None]


def test_summary_prints_the_median_ratio_of_each_mode(stream_speed, capsys):
    rows = [run("sequential", 2.0, r) | {"said": [], "responses": 0, "threads": 1, "mean_latency_s": 0.0,
                                         "peak_rss_mb": 1.0} for r in range(3)]
    rows += [run("fast", fps, r) | {"said": [], "responses": 0, "threads": 2, "mean_latency_s": 0.0,
                                    "peak_rss_mb": 1.0} for r, fps in enumerate((5.0, 7.0, 6.0))]
    stream_speed.print_table(rows)
    assert "1 min fast: median 3.00× sequential over 3 run(s) (min 2.50×, max 3.50×)" in capsys.readouterr().out
