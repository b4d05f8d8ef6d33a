"""Checkpoints: resharding 2 -> 1 ranks, exact resume, crash safety, clear errors, exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_engine_fsdp import TinyTransformer, add_lora, batch, local_slice, params_of, portable, run

from idgrpo.engine import FSDP, build_optimizer, clip_grad_norm_, init_distributed
from idgrpo.engine import checkpoint as ckpt_mod
from idgrpo.engine.checkpoint import Checkpointer, export_full_weights, export_lora


def make(**fsdp_kwargs):
    model = FSDP(TinyTransformer(), **fsdp_kwargs)
    return model, build_optimizer(model.trainable_parameters(), lr=1e-2, weight_decay=0.01)


def steps(model, opt, start, stop, rank, world_size):
    losses = []
    for step in range(start, stop):
        x, y = batch(step)
        loss = F.mse_loss(model(local_slice(x, rank, world_size)), local_slice(y, rank, world_size))
        loss.backward()
        clip_grad_norm_(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses)


def _train_and_save(rank, world_size, directory):
    init_distributed()
    straight, opt = make()
    straight_losses = steps(straight, opt, 0, 6, rank, world_size)
    model, opt = make()
    steps(model, opt, 0, 3, rank, world_size)
    Checkpointer(directory, config={"what": "test"}).save(3, model, opt, extra={"data_position": 3})
    torch.manual_seed(1234)  # state after the save must not matter to the resumed run
    return portable({"straight": params_of(straight), "straight_losses": straight_losses,
                     "at_3": params_of(model)})


def _resume(rank, world_size, directory):
    init_distributed()
    model, opt = make()
    step, extra = Checkpointer(directory).load_latest(model, opt)
    losses = steps(model, opt, step, 6, rank, world_size)
    return portable({"step": step, "extra": extra, "params": params_of(model), "losses": losses})


def _load_at(rank, world_size, directory):
    init_distributed()
    model, opt = make(replicate_trainable_below=10_000)  # a different grouping too: loads by name
    step, _ = Checkpointer(directory).load_latest(model, opt)
    loaded = params_of(model)
    steps(model, opt, step, 6, rank, world_size)  # optimizer state resharded too: continues the 2-rank run
    return portable({"step": step, "params": loaded, "continued": params_of(model)})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    results = run(_train_and_save, 2, str(directory))
    return directory, results


def test_save_two_ranks_load_one_rank_identical_and_training_continues(saved):
    directory, results = saved
    got = run(_load_at, 1, str(directory))[0]
    assert got["step"] == 3
    for k, v in results[0]["at_3"].items():
        assert torch.equal(got["params"][k], v), k
    for k, v in results[0]["straight"].items():
        err = (got["continued"][k] - v).norm() / v.norm()
        assert err < 1e-6, f"{k}: 1-rank continuation differs from the 2-rank run by {err:.3g}"
    index = json.loads((directory / "step_00000003" / "index.json").read_text())
    assert index["world_size"] == 2 and index["config"] == {"what": "test"}
    assert sorted(index["files"]) == ["rank_00000.safetensors", "rank_00001.safetensors"]
    assert {row["name"] for g in index["groups"].values() for row in g["params"]} == set(got["params"])


def test_resume_reproduces_the_straight_run(saved):
    directory, results = saved
    resumed = run(_resume, 2, str(directory))
    for r in range(2):
        assert resumed[r]["step"] == 3 and resumed[r]["extra"] == {"data_position": 3}
        torch.testing.assert_close(resumed[r]["losses"], results[r]["straight_losses"][3:], rtol=0, atol=0)
        for k, v in results[r]["straight"].items():
            assert torch.equal(resumed[r]["params"][k], v), k


class InjectedCrash(RuntimeError):
    pass


def _crash_and_errors(rank, world_size, directory):
    """One rank: crash safety, keep-K pruning, bad-checkpoint messages, exports."""
    init_distributed()
    directory = Path(directory)
    out = {}
    ck = Checkpointer(directory / "run", keep=2)
    model, opt = make()
    steps(model, opt, 0, 1, rank, world_size)
    ck.save(1, model, opt)
    at_1 = params_of(model)
    steps(model, opt, 1, 2, rank, world_size)
    real_save_file = ckpt_mod.save_file

    def crashing_save_file(tensors, path, metadata=None):
        real_save_file(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:  # the process dies half-way through the write
            f.truncate(Path(path).stat().st_size // 2)
        raise InjectedCrash("killed mid-write")

    ckpt_mod.save_file = crashing_save_file
    try:
        ck.save(2, model, opt)
        out["crash_raised"] = False
    except InjectedCrash:
        out["crash_raised"] = True
    finally:
        ckpt_mod.save_file = real_save_file
    out["after_crash"] = sorted(p.name for p in (directory / "run").iterdir())
    fresh, fresh_opt = make()
    out["loaded_step"] = ck.load_latest(fresh, fresh_opt)[0]
    out["loaded_equal"] = all(torch.equal(v, at_1[k]) for k, v in params_of(fresh).items())
    for s in (3, 4):
        ck.save(s, model, opt)
    out["after_prune"] = sorted(p.name for p in (directory / "run").iterdir())

    # bad checkpoints: each variant of step 4 gives one message
    good = directory / "run" / "step_00000004"
    rank_file = good / "rank_00000.safetensors"
    errors = {}

    def variant(name, edit, model_factory=make):
        bad = directory / name / "step_00000004"
        shutil.copytree(good, bad)
        edit(bad)
        m, o = model_factory()
        try:
            Checkpointer(directory / name).load_latest(m, o)
            errors[name] = None
        except ckpt_mod.CheckpointError as e:
            errors[name] = str(e)

    def rewrite(bad, change):
        tensors = load_file(bad / rank_file.name)
        with safe_open(str(bad / rank_file.name), "pt") as f:
            metadata = f.metadata()
        change(tensors)
        save_file(tensors, str(bad / rank_file.name), metadata=metadata)

    key = "blocks.1/trainable::master"
    variant("missing_tensor", lambda b: rewrite(b, lambda t: t.pop(key)))
    variant("wrong_dtype", lambda b: rewrite(b, lambda t: t.update({key: t[key].half()})))
    variant("wrong_tensor_shape", lambda b: rewrite(b, lambda t: t.update({key: t[key][:-1].clone()})))
    variant("truncated", lambda b: (b / rank_file.name).write_bytes(rank_file.read_bytes()[:1000]))
    variant("pickle", lambda b: torch.save({"x": torch.ones(2)}, b / rank_file.name))

    def edit_index_shape(b):
        index = json.loads((b / "index.json").read_text())
        index["groups"]["blocks.0/trainable"]["params"][0]["shape"] = [7, 7]
        (b / "index.json").write_text(json.dumps(index))

    variant("wrong_param_shape", edit_index_shape)
    variant("missing_param", lambda b: None, lambda: make_depth(4))
    variant("unexpected_param", lambda b: None, lambda: make_depth(2))
    out["errors"] = errors

    # exports: full weights and PEFT LoRA
    out["full_path"] = str(export_full_weights(model, directory / "export" / "model.safetensors"))
    out["full_expected"] = params_of(model)
    lora = FSDP(add_lora(TinyTransformer()), replicate_trainable_below=10_000)
    out["lora_dir"] = str(export_lora(lora, directory / "lora", adapter_config={
        "r": 2, "lora_alpha": 2, "target_modules": ["qkv", "fc2"]}))
    out["lora_expected"] = {k: v for k, v in params_of(lora).items() if "lora_" in k}
    return portable(out)


def make_depth(depth):
    model = FSDP(TinyTransformer(depth=depth))
    return model, build_optimizer(model.trainable_parameters(), lr=1e-2)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    directory = tmp_path_factory.mktemp("single")
    return run(_crash_and_errors, 1, str(directory))[0]


def test_crash_mid_write_leaves_the_previous_checkpoint_loadable(single):
    assert single["crash_raised"]
    assert single["after_crash"] == [".tmp_step_00000002", "step_00000001"]
    assert single["loaded_step"] == 1 and single["loaded_equal"]
    # the next save cleans the crashed temporary directory; keep=2 prunes the oldest
    assert single["after_prune"] == ["step_00000003", "step_00000004"]


@pytest.mark.parametrize("case, expected", [
    ("missing_tensor", r"rank_00000\.safetensors: missing key 'blocks\.1/trainable::master'"),
    ("wrong_dtype", r"rank_00000\.safetensors: key 'blocks\.1/trainable::master' has dtype torch\.float16, "
                    r"expected torch\.float32"),
    ("wrong_tensor_shape", r"rank_00000\.safetensors: key 'blocks\.1/trainable::master' has shape"),
    ("truncated", r"rank_00000\.safetensors: truncated"),
    ("pickle", r"rank_00000\.safetensors: this is a pickle"),
    ("wrong_param_shape", r"index\.json: key 'blocks\.0\.norm1\.weight' has shape \[7, 7\], the model expects \[24\]"),
    ("missing_param", r"index\.json: missing key 'blocks\.3\."),
    ("unexpected_param", r"index\.json: unexpected key 'blocks\.2\."),
])
def test_bad_checkpoints_name_the_file_and_key(single, case, expected):
    import re

    message = single["errors"][case]
    assert message is not None, f"{case}: loaded without error"
    assert re.search(expected, message), message


def test_exports_full_weights_and_peft_lora(single):
    full = load_file(single["full_path"])
    assert full.keys() == single["full_expected"].keys()
    for k, v in single["full_expected"].items():
        assert torch.equal(full[k], v)
    lora_dir = Path(single["lora_dir"])
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["target_modules"] == ["qkv", "fc2"]
    weights = load_file(lora_dir / "adapter_model.safetensors")
    want = {"base_model.model." + k + ".weight": v for k, v in single["lora_expected"].items()}
    assert weights.keys() == want.keys() and len(want) == 12
    assert "base_model.model.blocks.0.qkv.lora_A.weight" in weights
    for k, v in want.items():
        assert torch.equal(weights[k], v)


def test_header_length_with_a_pickle_like_first_byte_is_still_safetensors(tmp_path):
    # A header whose length has low byte 0x80 starts with the pickle opcode byte; it must load.
    for pad in range(300):
        path = tmp_path / f"rank-{pad}.safetensors"
        save_file({"x": torch.arange(3.0)}, str(path), metadata={"pad": "a" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding produced a header length with low byte 0x80")
    ckpt_mod.check_safetensors_file(path)
    pickled = tmp_path / "legacy.pt"
    torch.save({"x": torch.arange(3.0)}, pickled, _use_new_zipfile_serialization=False)
    with pytest.raises(ckpt_mod.CheckpointError, match="pickle"):
        ckpt_mod.check_safetensors_file(pickled)
