"""train-grpo refuses bad input before any work (every numeric flag, `--group-size 1`, a reward factory that gives no
score), stops a run whose reward gives it nothing to learn from, refuses NaN/Inf weights where a reward model or a
LoRA is loaded, and takes --collective-timeout (docs/reliability.md). The README's reliability figures are counted
here from the tests themselves."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from idgrpo.cli import main
from idgrpo.errors import UsageError
from idgrpo.models.weights import CheckpointError
from idgrpo.rl import GRPOConfig, GRPOTrainer, PromptRow, RecipeConfig
from idgrpo.rl.recipe import load_reward
from idgrpo.rl.rollout import RewardError
from idgrpo.rl.toy import ToyFlowPolicy, brightness_score, toy_conditioning, toy_decode

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# (arguments after `train-grpo tiny`, the flag the message must name)
GRPO_BAD_FLAGS = [
    (["--width", "0"], "--width"),
    (["--height", "-16"], "--height"),  # a multiple of 16, but no video
    (["--height", "24"], "--height"),
    (["--num-frames", "0"], "--num-frames"),
    (["--num-frames", "-3"], "--num-frames"),  # 4k+1, but no video
    (["--num-frames", "6"], "--num-frames"),
    (["--model", "tiny", "--eval-height", "8"], "--eval-height"),
    (["--model", "tiny", "--eval-width", "0"], "--eval-width"),
    (["--model", "tiny", "--eval-num-frames", "-3"], "--eval-num-frames"),
    (["--group-size", "1"], "--group-size"),  # zero variance: nothing ever trained, and exit 0 before
    (["--group-size", "0"], "--group-size"),
    (["--prompts-per-epoch", "0"], "--prompts-per-epoch"),
    (["--rollout-batch-size", "0"], "--rollout-batch-size"),
    (["--train-batch-size", "0"], "--train-batch-size"),
    (["--inner-epochs", "0"], "--inner-epochs"),
    (["--updates-per-epoch", "0"], "--updates-per-epoch"),
    (["--num-steps", "0"], "--num-steps"),
    (["--epochs", "0"], "--epochs"),
    (["--eval-steps", "0"], "--eval-steps"),
    (["--save-every", "0"], "--save-every"),
    (["--ema-every", "0"], "--ema-every"),
    (["--ema-repeats", "0"], "--ema-repeats"),
    (["--sde-window-stride", "0"], "--sde-window-stride"),
    (["--sde-window-size", "-1"], "--sde-window-size"),
    (["--sde-window-start", "-1"], "--sde-window-start"),
    (["--sde-window-start", "7", "--sde-window-size", "2"], "--sde-window-start"),  # past the 8 steps
    (["--num-steps", "1", "--timestep-fraction", "0.5"], "--timestep-fraction"),  # no trained step
    (["--sde-window-slide-every", "-1"], "--sde-window-slide-every"),
    (["--max-undone-steps", "-1"], "--max-undone-steps"),
    (["--max-reward-failures", "-1"], "--max-reward-failures"),  # stopped every run after epoch 0 before
    (["--eval-every", "-1"], "--eval-every"),
    (["--eval-videos", "-1"], "--eval-videos"),
    (["--seed", "-1"], "--seed"),  # trained before
    (["--seed", "2147483648"], "--seed"),
    (["--shift", "0"], "--shift"),
    (["--noise-level", "0"], "--noise-level"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--adam-eps", "0"], "--adam-eps"),
    (["--max-grad-norm", "-1"], "--max-grad-norm"),
    (["--clip-range", "0"], "--clip-range"),
    (["--adv-clip", "inf"], "--adv-clip"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--kl-beta", "-0.1"], "--kl-beta"),
    (["--kl-beta", "nan"], "--kl-beta"),
    (["--timestep-fraction", "0"], "--timestep-fraction"),
    (["--timestep-fraction", "1.5"], "--timestep-fraction"),
    (["--ema-decay", "1"], "--ema-decay"),
    (["--ema-decay", "nan"], "--ema-decay"),
    (["--betas", "0.9", "1.0"], "--betas"),
    (["--betas", "nan", "0.999"], "--betas"),
    (["--compute-dtype", "int8"], "--compute-dtype"),
    (["--vae-dtype", "float16"], "--vae-dtype"),
    (["--model", "huge"], "--model"),
    (["--grid", "linear"], "--grid"),
    (["--noise-schedule", "cosine"], "--noise-schedule"),
    (["--adv-std", "batch"], "--adv-std"),
    (["--reference", "ema"], "--reference"),
    (["--grad-accumulation", "both"], "--grad-accumulation"),
    (["--eval-solver", "dpm"], "--eval-solver"),
    (["--ema-schedule", "weekly"], "--ema-schedule"),
    (["--lora-rank", "-1"], "--lora-rank"),
    (["--lora-alpha", "0"], "--lora-alpha"),
    (["--lora-alpha", "nan"], "--lora-alpha"),
    (["--guidance", "-1"], "--guidance"),
    (["--guidance", "nan"], "--guidance"),
    (["--guidance-image", "inf"], "--guidance-image"),
    (["--collective-timeout", "0"], "--collective-timeout"),
    (["--collective-timeout", "nan"], "--collective-timeout"),
    (["--reward", "brightness"], "--reward"),  # no module:function
    (["--reward", "idgrpo.rl.toy:no_such_factory"], "--reward"),
    (["--reward", "no_such_module_for_idgrpo:build"], "--reward"),
    (["--reward", "test_grpo_reliability:number_factory"], "--reward"),  # returns a float, not a score callable
]


def number_factory(config, device):
    """A reward factory that returns no callable (refused at start)."""
    return 0.5


def nan_factory(config, device):
    """A reward factory whose score is NaN for every sample."""
    return lambda frames, references, prompts: torch.full((frames.shape[0],), float("nan"))


def refused(argv: list[str], capsys) -> str:
    """Run `idgrpo <argv>`: exit status 2 and one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"idgrpo {argv[0]}: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("args, flag", GRPO_BAD_FLAGS, ids=[" ".join(a) for a, _ in GRPO_BAD_FLAGS])
def test_a_bad_train_grpo_flag_is_refused_in_one_line_before_any_work(args, flag, tmp_path, capsys):
    line = refused(["train-grpo", "tiny", *args, "--run-dir", str(tmp_path / "run")], capsys)
    assert flag in line, line
    assert list(tmp_path.iterdir()) == []  # no run directory made


def test_the_validation_runs_for_python_callers_too():
    with pytest.raises(UsageError, match="--group-size must be >= 2, got 1"):
        GRPOConfig(group_size=1)
    with pytest.raises(UsageError, match="--height must be >= 16, got 0"):
        RecipeConfig.from_name("tiny", height=0)
    with pytest.raises(UsageError, match="--collective-timeout must be > 0"):
        RecipeConfig.from_name("tiny", collective_timeout=-1.0)
    for name in ("tiny", "vace-1.3b", "phantom-1.3b"):
        RecipeConfig.from_name(name)  # every preset is valid as shipped


# ---------------------------------------------------------------------------------------------- the reward factory


def test_a_factory_that_returns_no_score_is_refused_naming_it():
    with pytest.raises(UsageError, match=r"--reward test_grpo_reliability:number_factory: the factory returned "
                                         r"float, not a callable"):
        load_reward("test_grpo_reliability:number_factory", None, torch.device("cpu"))
    with pytest.raises(UsageError, match="module 'idgrpo.rl.toy' has no function 'nope'"):
        load_reward("idgrpo.rl.toy:nope", None, torch.device("cpu"))
    with pytest.raises(UsageError, match="no module 'no_such_module_for_idgrpo'"):
        load_reward("no_such_module_for_idgrpo:f", None, torch.device("cpu"))


def test_a_missing_dependency_of_the_reward_module_is_not_hidden(tmp_path, monkeypatch):
    (tmp_path / "reward_with_a_missing_dependency.py").write_text("import no_such_dependency_for_idgrpo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_for_idgrpo"):
        load_reward("reward_with_a_missing_dependency:build", None, torch.device("cpu"))


def test_the_factories_missing_settings_are_usage_errors():
    from idgrpo.reward import factories

    with pytest.raises(UsageError, match="--extra reward_checkpoint"):
        factories.compact(SimpleNamespace(extra={}), "cpu")
    with pytest.raises(UsageError, match="--extra reward_dtype 'int8'"):
        factories.vlm(SimpleNamespace(extra={"reward_dtype": "int8"}), "cpu")


# ---------------------------------------------------------------------------------- rewards that teach nothing

SHAPE = (4, 2, 8, 8)


def toy_trainer(tmp_path, score, **overrides) -> GRPOTrainer:
    settings = dict(run_dir=str(tmp_path), resume=False, epochs=2, eval_every=0, save_every=1000,
                    prompts_per_epoch=2, group_size=4, rollout_batch_size=4, train_batch_size=2)
    config = GRPOConfig.from_name("tiny", **{**settings, **overrides})
    rows = [PromptRow(f"prompt {i}") for i in range(4)]
    return GRPOTrainer(config, ToyFlowPolicy(SHAPE, seed=1), score=score, decode=toy_decode,
                       build_conditioning=lambda rs: toy_conditioning([r.prompt for r in rs]), latent_shape=SHAPE,
                       train_rows=rows, log=lambda message: None)


def failing(frames, references, prompts):
    raise RuntimeError("reward server unavailable")


def nan_score(frames, references, prompts):
    return torch.full((frames.shape[0],), float("nan"))


def constant(frames, references, prompts):
    return torch.ones(frames.shape[0])


@pytest.mark.parametrize("score, raised", [(failing, 2), (nan_score, 0)])
def test_an_epoch_without_one_finite_reward_stops_the_run(tmp_path, capsys, score, raised):
    trainer = toy_trainer(tmp_path, score, max_reward_failures=100)  # the failure count alone would go on
    with pytest.raises(RewardError, match=rf"epoch 0: none of the 8 samples got a finite reward \({raised} reward "
                                          r"calls raised"):
        trainer.train()
    assert trainer.optimizer_steps == 0
    capsys.readouterr()


def test_too_many_failed_reward_calls_stop_the_run_naming_the_flag(tmp_path, capsys):
    calls = {"n": 0}

    def every_other_call_fails(frames, references, prompts):
        calls["n"] += 1
        if calls["n"] % 2:
            raise RuntimeError("reward server unavailable")
        return brightness_score(frames)

    trainer = toy_trainer(tmp_path, every_other_call_fails, rollout_batch_size=2, max_reward_failures=2)
    trainer.train_epoch(0)  # 2 failures of 4 calls: the finite half is trained on
    with pytest.raises(RewardError, match="failed 4 times, more than --max-reward-failures 2"):
        trainer.train_epoch(1)
    assert "reward server unavailable" in capsys.readouterr().err


def test_a_run_that_never_kept_a_sample_ends_with_an_error_after_logging_and_saving(tmp_path):
    trainer = toy_trainer(tmp_path, constant)
    with pytest.raises(RewardError, match=r"no optimizer step in 2 epochs: all 16 samples were dropped \(0 with a "
                                          r"NaN/Inf reward"):
        trainer.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["dropped"] for r in records] == [8, 8] and [r["zero_std_fraction"] for r in records] == [1, 1]
    assert (tmp_path / "checkpoints").is_dir()  # the run is saved: its record is complete


def test_a_run_with_one_learning_epoch_is_fine(tmp_path):
    calls = {"n": 0}

    def constant_then_brightness(frames, references, prompts):
        calls["n"] += 1
        return torch.ones(frames.shape[0]) if calls["n"] == 1 else brightness_score(frames)

    history = toy_trainer(tmp_path, constant_then_brightness, rollout_batch_size=8).train()  # a call an epoch
    assert [h["trained_samples"] for h in history] == [0, 8]


def test_the_command_exits_non_zero_with_the_reason(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    done = subprocess.run([sys.executable, "-m", "idgrpo", "train-grpo", "tiny", "--epochs", "2", "--eval-every", "0",
                           "--reward", "test_grpo_reliability:nan_factory", "--run-dir", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        "idgrpo.rl.rollout.RewardError: epoch 0: none of the 8 samples got a finite reward"), done.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- NaN/Inf weights


def poison_file(file: Path, key: str) -> None:
    """Rewrite a safetensors file with one NaN in tensor `key` (its header metadata kept)."""
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(file), metadata=metadata)


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """A LoRA of the tiny Wan DiT in PEFT's and in diffusers' format."""
    from idgrpo.models.lora import apply_lora, save_diffusers_lora, save_peft
    from idgrpo.models.wan_dit import WanConfig, WanDiT

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    module = WanDiT(WanConfig.from_name("tiny")).init_weights()
    apply_lora(module, 4, 4.0)
    save_peft(module, root / "peft")
    save_diffusers_lora(module, root / "diffusers")
    return root


LORA_CASES = {  # how it is loaded -> (file, tensor poisoned)
    "load_peft": ("peft/adapter_model.safetensors", "base_model.model.blocks.0.attn1.to_q.lora_B.weight"),
    "load_diffusers_lora": ("diffusers/pytorch_lora_weights.safetensors",
                            "transformer.blocks.1.attn2.to_out.0.lora_A.weight"),
    "train-grpo --init-lora": ("peft/adapter_model.safetensors", "base_model.model.blocks.1.attn1.to_v.lora_A.weight"),
}


@pytest.mark.parametrize("how", LORA_CASES)
def test_a_lora_with_nan_weights_is_refused_naming_the_file_and_tensor(lora_files, tmp_path, how):
    import shutil

    from idgrpo.models.lora import load_diffusers_lora, load_peft
    from idgrpo.models.wan_dit import WanConfig, WanDiT

    shutil.copytree(lora_files, tmp_path / "lora")
    file, key = LORA_CASES[how]
    poison_file(tmp_path / "lora" / file, key)
    expected = rf"lora/{re.escape(file)}: tensor '{re.escape(key)}' holds non-finite values \(1 NaN of \d+ values\)"
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match=expected):
        if how == "load_peft":
            load_peft(WanDiT(WanConfig.from_name("tiny")), tmp_path / "lora" / "peft")
        elif how == "load_diffusers_lora":
            load_diffusers_lora(WanDiT(WanConfig.from_name("tiny")), tmp_path / "lora" / "diffusers")
        else:
            main(["train-grpo", "tiny", "--model", "tiny", "--lora-rank", "4", "--init-lora",
                  str(tmp_path / "lora" / "peft"), "--run-dir", str(run)])
    assert not run.exists()  # train-grpo refuses it while building the trainer, before the run directory is opened


@pytest.fixture(scope="module")
def vlm_reward_files(tmp_path_factory):
    """A tiny Qwen2.5-VL base model directory and a reward checkpoint (LoRA adapters + rm_head) trained from it."""
    pytest.importorskip("tokenizers")
    from test_qwen_processor import tiny_model_config, tiny_tokenizer

    from idgrpo.models.qwen2_5_vl import Qwen2_5_VL, save_qwen2_5_vl
    from idgrpo.models.qwen_processor import QwenProcessor
    from idgrpo.reward.vlm import VLMRewardConfig, build_vlm_reward_for_training

    root = tmp_path_factory.mktemp("vlm")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    save_qwen2_5_vl(Qwen2_5_VL(tiny_model_config(QwenProcessor(tokenizer))), root / "base")
    tokenizer.save(str(root / "base" / "tokenizer.json"))
    build_vlm_reward_for_training(root / "base", VLMRewardConfig(lora_rank=2), seed=0).save(root / "reward")
    return root


VLM_CASES = {  # the file with a NaN -> the tensor
    "base/model.safetensors": "model.norm.weight",
    "reward/non_lora_state_dict.safetensors": "base_model.model.rm_head.weight",
    "reward/adapter_model.safetensors": None,  # its first adapter tensor
}


@pytest.mark.parametrize("file", VLM_CASES)
def test_the_vlm_reward_factory_refuses_nan_weights_naming_the_file_and_tensor(vlm_reward_files, tmp_path, file):
    import shutil

    from idgrpo.reward import factories

    root = tmp_path / "vlm"
    shutil.copytree(vlm_reward_files, root)
    extra = {"reward_base": str(root / "base"), "reward_checkpoint": str(root / "reward")}
    key = VLM_CASES[file]
    if key is None:
        with safe_open(str(root / file), framework="pt") as f:
            key = sorted(f.keys())[0]
    poison_file(root / file, key)
    with pytest.raises(CheckpointError, match=rf"vlm/{re.escape(file)}: tensor '{re.escape(key)}' holds non-finite"):
        factories.vlm(SimpleNamespace(extra=extra), "cpu")


def test_the_vlm_reward_factory_loads_clean_weights(vlm_reward_files):
    from idgrpo.reward import factories

    extra = {"reward_base": str(vlm_reward_files / "base"), "reward_checkpoint": str(vlm_reward_files / "reward")}
    score = factories.vlm(SimpleNamespace(extra=extra), "cpu")
    frames = torch.randint(0, 256, (1, 5, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rewards = score(frames, [[]], ["two people talk"])
    assert rewards.shape == (1,) and torch.isfinite(rewards).all()


# ---------------------------------------------------------------------------------------------- collective timeout


def test_the_collective_timeout_may_change_when_a_run_resumes(tmp_path, capsys):
    args = ["train-grpo", "tiny", "--eval-every", "0", "--run-dir", str(tmp_path / "run")]
    main([*args, "--epochs", "1"])
    main([*args, "--epochs", "2", "--collective-timeout", "30"])
    printed = capsys.readouterr().out
    assert "--collective-timeout" in printed and "resumed from" in printed
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["settings"]["collective_timeout"] == 30.0


# ---------------------------------------------------------------------------------------------- the README's figures


def _cases(test) -> int:
    """How many cases a test function runs: the product of its parametrize lists."""
    count = 1
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize":
            count *= len(mark.args[1])
    return count


def reliability_figures() -> str:
    """The README's "Reliability" table, counted from the tests that check each line."""
    import test_cli_validation as validation
    import test_fault_injection as faults

    bad = [(command, flag) for command, _, flag in validation.BAD_FLAGS]
    bad += [("train-grpo", flag) for _, flag in GRPO_BAD_FLAGS]
    commands = sorted({command for command, _ in bad})
    stops = {
        ("train-reward", 1): [faults.test_stop_anywhere_then_resume_equals_the_uninterrupted_run,
                              faults.test_full_disk_during_a_save_keeps_the_previous_checkpoint,
                              faults.test_killed_process_then_resume_equals_the_uninterrupted_run],
        ("train-reward", 2): [faults.test_two_processes_stopped_then_resumed_equal_the_uninterrupted_run,
                              faults.test_torchrun_rank_killed_mid_write_then_resumed],
        ("train-grpo", 1): [faults.test_grpo_stopped_anywhere_then_resumed_equals_the_uninterrupted_run,
                            faults.test_grpo_killed_process_then_resume_equals_the_uninterrupted_run],
        ("train-grpo", 2): [faults.test_grpo_two_processes_stopped_then_resumed_equal_the_uninterrupted_run,
                            faults.test_grpo_torchrun_rank_killed_mid_write_then_resumed],
    }
    lines = ["| what the tests do | cases | exit status |", "| --- | --- | --- |",
             f"| a bad flag value (out of range, NaN/Inf, not an allowed value) refused in one line before any work | "
             f"{len(bad)} over {len(set(bad))} flags of {len(commands)} commands ({', '.join(commands)}) | 2 |"]
    for (command, processes), tests in stops.items():
        lines.append(f"| `{command}` on {processes} process{'es' if processes > 1 else ''} stopped at a named point "
                     f"(`IDGRPO_FAULT`), then resumed: equal bit for bit to a run never stopped | "
                     f"{sum(_cases(t) for t in tests)} | 86 if killed, else 1; the resumed run 0 |")
    lines.append(f"| a `train-grpo` peer killed or stopped: the other process ends within `--collective-timeout` | "
                 f"{_cases(faults.test_grpo_peer_killed_or_stopped_ends_the_others_within_the_collective_timeout)} "
                 f"| 1 |")
    reward_rules = [test_an_epoch_without_one_finite_reward_stops_the_run,
                    test_too_many_failed_reward_calls_stop_the_run_naming_the_flag,
                    test_a_run_that_never_kept_a_sample_ends_with_an_error_after_logging_and_saving,
                    test_the_command_exits_non_zero_with_the_reason]
    lines.append(f"| a `train-grpo` reward that teaches nothing (every call failed, every reward NaN, too many "
                 f"failures, no sample ever kept) stops the run | {sum(_cases(t) for t in reward_rules)} | 1 |")
    nan_weights = (_cases(test_a_lora_with_nan_weights_is_refused_naming_the_file_and_tensor)
                   + _cases(test_the_vlm_reward_factory_refuses_nan_weights_naming_the_file_and_tensor))
    lines.append(f"| weights with a NaN/Inf refused where they are loaded, naming the file and tensor (a LoRA in "
                 f"either format, `--init-lora`, the VLM reward's base model, adapters and head) | {nan_weights} | 1 |")
    return "\n".join(lines)


def test_the_readme_reliability_figures_are_those_of_the_tests():
    table = reliability_figures()
    assert table in (REPO / "README.md").read_text(), f"README.md's Reliability section should hold:\n{table}"
