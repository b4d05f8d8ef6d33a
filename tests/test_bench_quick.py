"""`python -m bench --quick <name>` in-process: the benchmark runs, writes its JSON with the environment
record, and its rows say what they measured (both attention implementations, same rewards). Timings
are not checked: speed claims live in bench/ output only."""

import json

import pytest
import torch

import bench.__main__ as bench_main


def test_reward_benchmark_quick_runs_both_attention_implementations(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IDGRPO_BENCH_DIR", str(tmp_path))
    assert bench_main.main(["--quick", "reward"]) == 0
    printed = capsys.readouterr().out
    files = list(tmp_path.glob("reward-*.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    assert result["benchmark"] == "reward" and result["environment"]["torch"] == torch.__version__
    rows = result["rows"]
    models = {row["model"] for row in rows}
    assert {"qwen2.5-vl-tiny", "compact-tiny"} <= models
    for model in models:
        pair = [row for row in rows if row["model"] == model]
        assert [row["impl"] for row in pair] == ["idgrpo", "sdpa"]
        for row in pair:
            assert row["status"] == "ok" and row["videos_per_s"] > 0 and row["ms_per_batch"] > 0
            assert row["videos_per_s"] * row["ms_per_batch"] / 1e3 == pytest.approx(row["batch"], rel=1e-6)
        ours, sdpa = pair
        assert ours["speedup_vs_sdpa"] > 0
        # fp32 on CPU: the baseline attention computes the same rewards.
        assert sdpa["score_diff"] < 1e-4
    vlm = next(row for row in rows if row["model"] == "qwen2.5-vl-tiny")
    assert 0 < vlm["vision_tokens"] < vlm["tokens"] and vlm["forward_ms"] > 0
    if not torch.cuda.is_available():
        assert "no GPU here" in printed and "caveat" in result



def test_e2e_benchmark_quick_times_both_modes_on_the_same_epoch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IDGRPO_BENCH_DIR", str(tmp_path))
    assert bench_main.main(["--quick", "e2e"]) == 0
    printed = capsys.readouterr().out
    files = list(tmp_path.glob("e2e-*.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    assert result["environment"]["torch"] == torch.__version__ and "flop_convention" in result
    assert result["modes"]["baseline"] == {name: True for name in result["modes"]["baseline"]}
    assert not any(result["modes"]["idgrpo"].values())
    rows = result["rows"]
    models = {row["reward_model"] for row in rows}
    assert "compact-tiny" in models
    for model in models:
        mine = [row for row in rows if row["reward_model"] == model]
        assert [(row["mode"], row["rep"]) for row in mine] == [("idgrpo", 0), ("baseline", 0), ("idgrpo", 1),
                                                               ("baseline", 1)]
        for row in mine:
            phases = row["rollout_s"] + row["reward_s"] + row["advantage_s"] + row["update_s"]
            assert 0 < phases <= row["epoch_s"] and row["trained_samples"] == row["samples"] == 4
            assert row["samples_per_s"] * row["epoch_s"] == pytest.approx(row["samples"], rel=1e-6)
            assert row["update_tflops"] > 0 and row["spread"] >= 0
        for ours, baseline in zip(mine[::2], mine[1::2]):
            assert ours["speedup_vs_baseline"] == pytest.approx(baseline["epoch_s"] / ours["epoch_s"])
            # fp32 on CPU: the baseline trains the same epoch from the same weights, to float rounding.
            assert baseline["reward_diff"] < 1e-5
            assert baseline["loss"] == pytest.approx(ours["loss"], rel=1e-3, abs=1e-6)
    if not torch.cuda.is_available():
        assert "no GPU here" in printed and "caveat" in result
