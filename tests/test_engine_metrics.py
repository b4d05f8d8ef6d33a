"""Metrics: device-side accumulation, one read per flush, JSON lines on rank 0."""

import json

import torch

from idgrpo.engine.metrics import Metrics, progress


def test_metrics_means_since_last_flush_and_jsonl(tmp_path):
    with Metrics(tmp_path, rank=0, tensorboard=False) as m:
        m.add("loss", torch.tensor(1.0))
        m.add("loss", torch.tensor(3.0))
        m.add("reward", torch.tensor([1.0, 2.0, 3.0, 6.0]))  # a batch: its mean
        m.add("lr", 0.5)
        assert m.flush(10) == {"loss": 2.0, "lr": 0.5, "reward": 3.0}
        m.add("loss", torch.tensor(7.0))
        assert m.flush(20) == {"loss": 7.0}
        assert m.flush(30) == {}
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20, 30]
    assert lines[0]["loss"] == 2.0 and lines[1]["loss"] == 7.0 and "time_s" in lines[0]


def test_metrics_other_ranks_write_nothing(tmp_path):
    m = Metrics(tmp_path / "r1", rank=1)
    m.add("loss", torch.tensor(2.0))
    assert m.flush(1) == {"loss": 2.0}
    m.close()
    assert not (tmp_path / "r1").exists()


def test_progress_is_a_bar_on_rank_zero_only():
    assert list(progress(range(3), rank=1)) == [0, 1, 2]
    bar = progress(range(3), rank=0, disable=True)
    assert list(bar) == [0, 1, 2]
    progress(total=5, rank=1).update()
