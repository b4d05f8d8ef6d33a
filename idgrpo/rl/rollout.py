"""The rollout phase of a GRPO epoch: this rank's samples drawn with the SDE sampler in batches, each finished batch
decoded and scored on the reward worker while the next one is sampled.

    rewards = RewardWorker(score, decode, device)
    rollout = roll_out(policy, conditioning, rows, assignment, plan, epoch=0, schedule=schedule, steps=steps,
                       latent_shape=(16, 11, 30, 52), batch_size=4, rewards=rewards)
    rollout.states, rollout.log_probs, rollout.rewards     # (n, K+1, C, F, H, W), (n, K), (n,)

The contracts of what users plug in, `RewardFn` and `DecodeFn`, are defined here; the policy's is
`idgrpo.rl.sampler.Policy`.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from idgrpo.prompts import PromptRow
from idgrpo.rl.config import BaselineFlags
from idgrpo.rl.data import EpochAssignment
from idgrpo.rl.sampler import Conditioning, Policy, StepPlan, StepSchedule, sample
from idgrpo.rl.schedules import FlowSchedule
from idgrpo.rl.timing import PhaseTimer, timed

RewardFn = Callable[[torch.Tensor, list[list[torch.Tensor]], list[str]], torch.Tensor]
"""`score(frames, references, prompts) -> rewards`, the reward GRPO maximises.

- frames: uint8 (B, T, H, W, 3) RGB video frames in [0, 255], on the training device (the trainer never copies them
  to the host);
- references: per sample, the reference images of its prompt row (uint8 (h, w, 3) tensors; [] when there are none);
- prompts: per sample, the prompt text of its row;
- returns (B,) floats (a tensor, or anything `torch.as_tensor` takes), higher is better, in any unit: advantages
  are normalised per group. A NaN/Inf reward gives its sample advantage 0 (not trained on, counted).

Threading: during training it is called on the reward worker's thread (with its own CUDA stream on GPU) while the
policy samples the next batch, so it must not issue collectives (an FSDP-sharded reward model would interleave its
all-gathers with the policy's): such a reward needs `GRPOConfig.overlap_reward=False`, which calls it inline on the
main thread. Evaluation always calls it on the main thread. A call that raises gives its batch NaN rewards, is logged
and counted. The run stops (`RewardError`) once more than `GRPOConfig.max_reward_failures` calls have raised, after an
epoch in which no sample got a finite reward, and at its end when no optimizer step was ever made
(docs/reliability.md)."""

DecodeFn = Callable[[torch.Tensor], torch.Tensor]
"""`decode(latents) -> frames`: fp32 latents (B, C, F, H, W) with the reference slots already dropped ->
uint8 frames (B, T, H, W, 3) on the same device (the Wan VAE's `decode_frames`). Runs wherever the `RewardFn` runs."""


class RewardError(RuntimeError):
    """The reward gave a GRPO run nothing to learn from: too many failed calls, an epoch without one finite reward, or
    a run whose every sample was dropped (the rules are in docs/reliability.md)."""


class RewardWorker:
    """Runs decode + score on one background thread (with its own CUDA stream on GPU).

        worker = RewardWorker(score, decode, torch.device("cpu"))
        future = worker.submit(latents, references, prompts)     # returns at once
        ...                                                      # sample the next batch meanwhile
        rewards = worker.result(future)                          # (B,) fp32 on the device
        worker.close()

    Note: the reward then runs concurrently with the policy's forwards. A reward model that issues collectives
    (e.g. FSDP-sharded) would interleave them with the policy's in a rank-dependent order and hang: such a reward
    needs `overlap=False` (config `overlap_reward`), which scores inline.

    A call that raises yields NaN rewards for its batch and is counted in `failures` (the traceback is printed the
    first time). Frames never leave the device.
    """

    def __init__(self, score: RewardFn, decode: DecodeFn, device: torch.device, *, overlap: bool = True):
        self.score, self.decode, self.device = score, decode, device
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward") if overlap else None
        self.stream = torch.cuda.Stream(device) if (device.type == "cuda" and overlap) else None
        self.failures = 0
        self._lock = threading.Lock()

    def submit(self, latents: torch.Tensor, references: list, prompts: list, *, synchronous: bool = False,
               via_files: bool = False, timer: PhaseTimer | None = None) -> Future:
        """Decode + score a batch, on the worker (or now, without overlap or with `synchronous`).
        via_files: round-trip the decoded frames through mp4 files first (`mp4_round_trip`; benchmark baseline).
        timer: add this call's wall time, synchronized on its stream, to `timer.reward_busy_s` (host syncs)."""
        if self.pool is None or synchronous:  # no overlap: score now, on this thread and stream
            future = Future()
            future.set_result(self._run(latents, references, prompts, None, via_files, timer, inline=True))
            return future
        ready = None
        if self.stream is not None:
            ready = torch.cuda.current_stream(self.device).record_event()
        return self.pool.submit(self._run, latents, references, prompts, ready, via_files, timer)

    def _run(self, latents, references, prompts, ready, via_files, timer, inline=False):
        batch = latents.shape[0]
        stream = None if inline else self.stream
        stream_ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        start = time.perf_counter()
        with torch.no_grad(), stream_ctx:
            if ready is not None:
                stream.wait_event(ready)
                # The main thread may drop its reference while this stream still reads the latents: tell the
                # caching allocator not to reuse their memory before this stream's pending work is done.
                latents.record_stream(stream)
            try:
                frames = self.decode(latents)
                if via_files:
                    frames = mp4_round_trip(frames)
                rewards = self.score(frames, references, prompts)
                rewards = torch.as_tensor(rewards, device=latents.device).float().reshape(-1)
                if rewards.shape != (batch,):
                    raise ValueError(f"reward returned shape {tuple(rewards.shape)}, expected ({batch},)")
            except Exception:  # noqa: BLE001 - a reward crash must not kill the run; counted and logged
                with self._lock:
                    self.failures += 1
                    first = self.failures == 1
                if first:
                    print(f"[train-grpo] reward call failed (its batch gets NaN rewards and is dropped):\n"
                          f"{traceback.format_exc()}", file=sys.stderr)
                rewards = torch.full((batch,), float("nan"), device=latents.device)
            done = stream.record_event() if stream is not None else None
            if timer is not None:
                if latents.is_cuda:
                    (stream or torch.cuda.current_stream(latents.device)).synchronize()
                timer.add_reward_busy(time.perf_counter() - start)
        return rewards, done

    def result(self, future: Future) -> torch.Tensor:
        rewards, done = future.result()
        if done is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(done)
            rewards.record_stream(main)  # allocated on the reward stream, consumed (and freed) on the main one
        return rewards

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def mp4_round_trip(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> the same frames after writing each sample to an mp4 file and reading it back, as a
    pipeline that scores saved videos does. Lossless RGB H.264 (libx264rgb, qp 0), so the frames come back exact:
    the round trip costs what the file path costs and changes nothing else."""
    import av

    from idgrpo.media import read_video

    out = torch.empty_like(frames)
    with tempfile.TemporaryDirectory(prefix="idgrpo-reward-") as folder:
        for i, video in enumerate(frames.cpu().numpy()):
            path = Path(folder) / f"sample{i}.mp4"
            with av.open(str(path), mode="w") as container:
                stream = container.add_stream("libx264rgb", rate=16)
                stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "rgb24"
                stream.options = {"qp": "0"}
                for frame in video:
                    for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
            out[i] = read_video(path).to(frames.device)
    return out


@dataclass
class EpochRollout:
    """This rank's share of one epoch, sampled and scored: what the advantage and update phases read.

        rollout = trainer.rollout(epoch)
        rollout.states[:, 0]                       # (n, C, F, H, W): each sample's latent before its first trained step
        rollout.rewards, rollout.assignment.local_rows       # (n,) rewards of this rank's samples, and their rows

    n = samples of this rank, K = len(plan.trained)."""

    epoch: int
    assignment: EpochAssignment
    conditioning: Conditioning
    """The guidance branches of the n samples, in sample order."""
    plan: StepPlan
    states: torch.Tensor
    """(n, K + 1, C, F, H, W) fp32: x before each trained step, then after the last one (NFT: (n, 1, ...), the clean
    latent of each sample)."""
    log_probs: torch.Tensor
    """(n, K) fp32: log-probability of each trained transition under the rollout policy."""
    ref_means: torch.Tensor | None
    """(n, K, C, F, H, W) fp32: the SDE mean under the reference policy (the KL anchor); None without a reference
    or when the update recomputes it (`BaselineFlags.kl_reference_at_train_time`)."""
    rewards: torch.Tensor
    """(n,) fp32, NaN where the reward was not finite or its call failed."""
    reward_failures: int
    """Reward calls of this rank that raised during this rollout."""


def roll_out(policy: Policy, conditioning: Conditioning, rows: Sequence[PromptRow], assignment: EpochAssignment,
             plan: StepPlan, *, epoch: int, schedule: FlowSchedule, steps: StepSchedule,
             latent_shape: Sequence[int], batch_size: int, rewards: RewardWorker, reference: Policy | None = None,
             baseline: BaselineFlags | None = None, timer: PhaseTimer | None = None,
             score_share: tuple[int, int] = (0, 1), solver: str = "sde", keep_states: bool = True) -> EpochRollout:
    """Sample this rank's rows (`assignment.local_*`, with their `conditioning`) in batches of `batch_size` and score
    every finished batch on `rewards` while the next one is sampled. With `reference`, the rollout keeps the SDE mean
    under it for the trained steps, so that the update runs no reference forward. `baseline`: the benchmark's
    switches (None: the default path); `timer`: per-phase wall times (benchmarks).

    score_share: (index, ranks) when `ranks` ranks roll out the same samples (a sequence-parallel group): this rank
    decodes and scores only its samples i with i % ranks == index, so each video is decoded and scored once; its
    other rewards are NaN here and taken from their owners by `idgrpo.rl.data.all_gather_owned`.

    solver: `sample`'s ("sde" for GRPO; "euler" / "unipc" / "sde" for NFT). keep_states False (NFT): only the clean
    latent is kept, `states` (n, 1, C, F, H, W) and `log_probs` (n, 0)."""
    baseline = baseline or BaselineFlags()
    device = rewards.device  # the training device
    index, share = score_share
    seeds, initial_seeds = assignment.local_seeds, assignment.local_initial_seeds
    failures_before = rewards.failures
    states, log_probs, ref_means, pending = [], [], [], []
    for start in range(0, len(rows), batch_size):
        part = slice(start, min(start + batch_size, len(rows)))
        cond = conditioning.select(part)
        with timed(timer, "rollout"):
            roll = sample(policy, cond, schedule, seeds[part], latent_shape, plan=plan, steps=steps,
                          reference=None if baseline.kl_reference_at_train_time else reference, device=device,
                          separate_branches=baseline.separate_cfg_forwards, solver=solver,
                          initial_seeds=initial_seeds[part] if initial_seeds is not None else None)
        if keep_states:
            states.append(roll.states)
            log_probs.append(roll.log_probs)
        else:
            states.append(roll.final[:, None])
            log_probs.append(roll.final.new_zeros(roll.final.shape[0], 0))
        if roll.ref_means is not None:
            ref_means.append(roll.ref_means)
        first = start + (index - start) % share  # this rank's first sample of the batch to score
        if first >= part.stop:
            continue
        owned = slice(first, part.stop, share)
        with timed(timer, "reward"):
            latents = cond.video_latents(roll.final)[first - start::share]
            pending.append((owned, rewards.submit(latents, [r.references for r in rows[owned]],
                                                  [r.prompt for r in rows[owned]],
                                                  synchronous=baseline.synchronous_reward,
                                                  via_files=baseline.reward_via_files, timer=timer)))
    scores = torch.full((len(rows),), float("nan"), device=device)  # (n,)
    with timed(timer, "reward"):  # with overlap: only the reward time the rollout did not hide
        for owned, p in pending:
            scores[owned] = rewards.result(p)
    return EpochRollout(epoch=epoch, assignment=assignment, conditioning=conditioning, plan=plan,
                        states=torch.cat(states), log_probs=torch.cat(log_probs),
                        ref_means=torch.cat(ref_means) if ref_means else None, rewards=scores,
                        reward_failures=rewards.failures - failures_before)
