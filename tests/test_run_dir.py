"""A run directory holds one run: settings recorded and checked on resume, used directories refused unless
overwritten (moved aside, never mixed), logs truncated to the resumed checkpoint, damaged checkpoints skipped with
a warning, atomic writes."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from idgrpo.cli import main
from idgrpo.engine import (
    FSDP,
    Checkpointer,
    Metrics,
    RunDirError,
    RunSettingsError,
    build_optimizer,
    open_run,
    truncate_jsonl,
    write_atomic,
)
from idgrpo.engine import checkpoint as ckpt_mod
from idgrpo.engine.checkpoint import CheckpointDamaged, _write_atomic_file
from idgrpo.engine.faults import FAULT_ENV
from idgrpo.testing import randn

SETTINGS = {"lr": 1e-3, "epochs": 2, "data": Path("pairs.jsonl"), "model": {"dim": 16, "heads": 2}}


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


# ---------------------------------------------------------------------------------------------- open_run


def test_first_start_records_the_settings(tmp_path):
    run = open_run(tmp_path / "run", SETTINGS)
    assert not run.resuming and run.changed == {}
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["format"] == "idgrpo-run"
    assert record["settings"] == {"lr": 1e-3, "epochs": 2, "data": str(Path("pairs.jsonl").resolve()),
                                  "model": {"dim": 16, "heads": 2}}


def test_resume_applies_and_logs_mutable_changes_and_refuses_the_others(tmp_path):
    path = tmp_path / "run"
    open_run(path, SETTINGS)
    (path / "metrics.jsonl").write_text("")
    same = open_run(path, SETTINGS, mutable={"epochs"})
    assert same.resuming and same.changed == {}

    notes = []
    more = open_run(path, {**SETTINGS, "epochs": 5}, mutable={"epochs"}, label=flag, log=notes.append)
    assert more.resuming and more.changed == {"epochs": (2, 5)}
    assert notes == ["resuming with a changed setting: --epochs 2 -> 5"]
    record = json.loads((path / "run.json").read_text())
    assert record["settings"]["epochs"] == 5 and record["changes"][0]["changed"] == {"epochs": [2, 5]}

    changed = {**SETTINGS, "epochs": 5, "lr": 1e-2, "model": {"dim": 32, "heads": 2}}
    with pytest.raises(RunSettingsError) as err:
        open_run(path, changed, mutable={"epochs"}, label=flag)
    message = str(err.value)
    assert "--lr: 0.001 -> 0.01" in message and "--model.dim: 16 -> 32" in message
    assert "epochs" not in message and str(path / "run.json") in message
    assert json.loads((path / "run.json").read_text())["settings"]["lr"] == 1e-3  # nothing changed


def test_used_directory_is_refused_without_resume_and_moved_aside_with_overwrite(tmp_path):
    path = tmp_path / "run"
    open_run(path, SETTINGS)
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunDirError, match="already holds a run.*--overwrite"):
        open_run(path, SETTINGS, resume=False)
    notes = []
    run = open_run(path, {**SETTINGS, "lr": 5.0}, resume=False, overwrite=True, log=notes.append)
    assert not run.resuming and run.moved_to.parent == tmp_path and run.moved_to.name.startswith("run.replaced-")
    assert sorted(p.name for p in path.iterdir()) == ["run.json"]  # nothing of the old run is mixed in
    assert (run.moved_to / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert json.loads((run.moved_to / "run.json").read_text())["settings"]["lr"] == 1e-3
    assert notes == [f"--overwrite: the previous contents of {path} were moved to {run.moved_to}"]


def test_legacy_directory_without_a_record_resumes_with_a_warning(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    notes = []
    run = open_run(tmp_path, SETTINGS, log=notes.append)
    assert run.resuming and "has no run.json" in notes[0]
    assert (tmp_path / "run.json").is_file()
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(RunDirError, match="run.json: cannot be read"):
        open_run(tmp_path, SETTINGS)


# ---------------------------------------------------------------------------------------------- train-reward

TINY = ["--model.image-size", "16", "--model.patch-size", "8", "--model.dim", "16", "--model.depth", "1",
        "--model.heads", "2", "--model.parts", "2"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    main(["synth-pairs", "--out", str(out), "--num-videos", "6", "--pairs-per-video", "4", "--num-frames", "9",
          "--seed", "3"])
    return out


def _args(pairs, out, *extra):
    return ["train-reward", "--data", str(pairs / "pairs.jsonl"), "--out", str(out), "--held-out-fraction", "0.34",
            "--batch-size", "8", "--threads", "1", "--epochs", "1", *TINY, *extra]


def _refused(argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("idgrpo train-reward: error: ")
    return lines[0]


def test_train_reward_one_run_per_directory(pairs, tmp_path, capsys):
    out = tmp_path / "run"
    main(_args(pairs, out))

    line = _refused(_args(pairs, out, "--loss", "bt", "--model.heads", "4"), capsys)
    assert "--loss: 'btt' -> 'bt'" in line and "--model.heads: 2 -> 4" in line

    line = _refused(_args(pairs, out, "--no-resume"), capsys)
    assert "already holds a run" in line and "--overwrite" in line

    line = _refused(["train-reward", "--data", str(out / "pairs.jsonl"), "--out", str(out), "--overwrite"], capsys)
    assert re.search(r"--overwrite would move --data .* away with the old run", line)

    main(_args(pairs, out, "--epochs", "2", "--max-minutes", "30"))  # mutable: applied and logged
    printed = capsys.readouterr().out
    assert "resuming with a changed setting: --epochs 1 -> 2" in printed
    assert "resuming with a changed setting: --max-minutes 0.0 -> 30.0" in printed
    assert [json.loads(x)["epoch"] for x in (out / "eval.jsonl").read_text().splitlines()] == [1, 2]

    old_final = load_file(out / "final" / "reward_model.safetensors")
    main(_args(pairs, out, "--no-resume", "--overwrite", "--lr", "0.01"))  # a new run, the old one moved aside
    aside = next(tmp_path.glob("run.replaced-*"))
    assert [json.loads(x)["epoch"] for x in (aside / "eval.jsonl").read_text().splitlines()] == [1, 2]
    assert [json.loads(x)["epoch"] for x in (out / "eval.jsonl").read_text().splitlines()] == [1]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]
    assert json.loads((out / "run.json").read_text())["settings"]["lr"] == 0.01
    moved = load_file(aside / "final" / "reward_model.safetensors")
    assert all(torch.equal(moved[k], v) for k, v in old_final.items())
    new_final = load_file(out / "final" / "reward_model.safetensors")
    assert not torch.equal(new_final["score_head.1.weight"], old_final["score_head.1.weight"])


def test_train_reward_falls_back_from_a_damaged_checkpoint(pairs, tmp_path, capsys):
    out = tmp_path / "run"
    main(_args(pairs, out, "--epochs", "2"))
    newest = out / "checkpoints" / "step_00000004" / "rank_00000.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])  # cut short after it was published
    capsys.readouterr()
    main(_args(pairs, out, "--epochs", "3"))
    printed = capsys.readouterr().out
    assert re.search(r"warning: checkpoint .*step_00000004 is damaged \(.*truncated file.*\); resumed from "
                     r".*step_00000002 instead", printed)
    assert "resumed after epoch 1 (step 2)" in printed
    assert [json.loads(x)["epoch"] for x in (out / "eval.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]


# ---------------------------------------------------------------------------------------------- logs


def test_truncate_jsonl_drops_later_steps_and_a_cut_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.5}\n{"step": 6, "loss": 0.2}\n{"step": 8, "lo')
    assert truncate_jsonl(log, 4) == 2
    assert log.read_text() == '{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.5}\n'
    before = log.stat().st_mtime_ns
    assert truncate_jsonl(log, 10) == 0 and log.stat().st_mtime_ns == before  # nothing to drop: left alone
    assert truncate_jsonl(tmp_path / "absent.jsonl", 0) == 0

    with Metrics(tmp_path, rank=0, tensorboard=False, truncate_after=2) as metrics:
        metrics.add("loss", 0.25)
        metrics.flush(4)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [2, 4]


# ---------------------------------------------------------------------------------------------- checkpoints


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(3, 2)


def _model():
    torch.manual_seed(0)
    model = FSDP(Tiny())
    return model, build_optimizer(model.trainable_parameters(), lr=1e-2)


def test_pruning_keeps_intact_checkpoints_and_loading_falls_back(tmp_path):
    model, opt = _model()
    notes = []
    ck = Checkpointer(tmp_path, keep=2, log=notes.append)
    for step in (1, 2):
        with torch.no_grad():
            model.groups[0].master.add_(1.0)
        ck.save(step, model, opt, extra={"at": step})
    (tmp_path / "step_00000002" / "index.json").write_text('{"format": ')  # damaged after it was published
    ck.save(3, model, opt, extra={"at": 3})
    # step 2 looks damaged, so it does not count: steps 1 and 3 are the two intact ones kept
    assert [p.name for _, p in ck.checkpoints()] == ["step_00000001", "step_00000002", "step_00000003"]
    rank_file = tmp_path / "step_00000003" / "rank_00000.safetensors"
    rank_file.write_bytes(rank_file.read_bytes()[:-8])
    fresh, fresh_opt = _model()
    assert ck.load_latest(fresh, fresh_opt) == (1, {"at": 1}) and ck.loaded == tmp_path / "step_00000001"
    assert len(notes) == 2
    assert re.search(r"checkpoint .*step_00000003 is damaged \(.*rank_00000\.safetensors: truncated", notes[0])
    assert re.search(r"step_00000002 is damaged \(.*index\.json: not valid JSON.*resumed from .*step_00000001",
                     notes[1])
    shutil.rmtree(tmp_path / "step_00000001")
    with pytest.raises(CheckpointDamaged, match=r"step_00000003.*truncated.*no checkpoint in .* loads \(nor do the "
                                                r"1 older ones\)"):
        ck.load_latest(fresh, fresh_opt)
    with pytest.raises(ValueError, match="keep must be >= 2"):
        Checkpointer(tmp_path, keep=1)


def test_write_atomic_keeps_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    target = tmp_path / "ema.safetensors"
    write_atomic(target, b"old")
    monkeypatch.setenv(FAULT_ENV, "write/ema.safetensors:enospc")
    with pytest.raises(OSError) as err:
        write_atomic(target, b"new and longer")
    assert err.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["ema.safetensors"]
    monkeypatch.delenv(FAULT_ENV)
    _write_atomic_file(target, lambda p: p.write_text("via the old name"))
    assert target.read_text() == "via the old name"
    ckpt_mod.save_safetensors_atomic({"x": randn(3, seed=0)}, tmp_path / "x.safetensors")
    assert torch.equal(load_file(tmp_path / "x.safetensors")["x"], randn(3, seed=0))
