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

