"""GRPO ops: the SDE step with its log-prob, the GRPO loss and the DiffusionNFT loss (forward, and
forward+backward to the velocity), and group advantages.

Latents are Wan-1.3B's 16x21x60x104 (81x480x832) and Identity-GRPO's 16x9x30x52 (33x240x416),
batch = one group of 8, fp32 as the sampler keeps them
(docs/models.md#sde-step-and-log-probability). For each op: the Triton
path and the eager reference (the same `*_reference` functions the tests trust), the ideal
bytes moved (every latent-sized input read once, every output written once), the achieved
GB/s, and that as a fraction of a device-to-device copy of one latent measured in the same
run. Group advantages: 8,192 rewards in groups of 8, one kernel launch, `num_groups` given so
that no host read happens; time only (a few tens of KB move).

Usage:
    python -m bench grpo_ops            # GPU, full sizes
    python -m bench grpo_ops --quick    # CPU: tiny sizes through the Triton interpreter (fp32)
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.common import report, time_fn  # noqa: E402
from idgrpo.kernels.backend import interpreting  # noqa: E402
from idgrpo.kernels.group_advantage import group_advantage  # noqa: E402
from idgrpo.kernels.grpo_loss import grpo_loss, grpo_step, sde_noise_std  # noqa: E402
from idgrpo.kernels.nft_loss import nft_loss  # noqa: E402


def _copy_bandwidth(like: torch.Tensor, warmup: int, iters: int) -> float:
    """GB/s of dst.copy_(src) (read + write) on a tensor shaped and typed like `like`."""
    src = torch.randn_like(like)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup=warmup, iters=iters)
    return 2 * src.numel() * src.element_size() / (t["ms_median"] * 1e-3) / 1e9


def _latent_cases(shape, device):
    """name -> (run(backend) -> tensor to compare, latent-sized tensors moved)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*s):
        return torch.randn(*s, generator=g).to(device)

    B = shape[0]
    x, v, noise = rand(*shape), rand(*shape), rand(*shape)
    sigma = torch.full((B,), 0.9, device=device)
    sigma_next = torch.full((B,), 0.85, device=device)
    std = sde_noise_std(sigma, sigma_next, 0.98632, schedule="identity_grpo")
    x_next, log_prob, mean = grpo_step(x, v, sigma, sigma_next, std, noise, backend="reference")
    ref_mean = mean + 0.01 * rand(*shape)
    advantages = rand(B)
    v_new = (v + 0.01 * rand(*shape)).requires_grad_()
    # DiffusionNFT: clean latents noised at σ, velocities near noise − x0 (docs/objectives.md)
    x0 = rand(*shape)
    s = sigma.view(-1, *[1] * (len(shape) - 1))
    x_t = (1 - s) * x0 + s * noise
    v_old = noise - x0 + 0.1 * rand(*shape)
    v_ref = v_old + 0.01 * rand(*shape)
    v_nft = (v_old + 0.01 * rand(*shape)).requires_grad_()
    nft_kwargs = dict(beta=0.1, adv_clip_max=5.0, kl_beta=1e-4)

    def step(bk):
        return grpo_step(x, v, sigma, sigma_next, std, noise, backend=bk)[1]

    def loss_fwd(bk):
        with torch.no_grad():
            return grpo_loss(x, x_next, v_new, log_prob, advantages, sigma, sigma_next, std, ref_mean=ref_mean,
                             backend=bk)[1]["log_prob"]

    def loss_fwd_bwd(bk):
        loss, _ = grpo_loss(x, x_next, v_new, log_prob, advantages, sigma, sigma_next, std, ref_mean=ref_mean,
                            backend=bk)
        return torch.autograd.grad(loss, v_new)[0]

    def nft_fwd(bk):
        with torch.no_grad():
            return nft_loss(v_nft, v_old, v_ref, x_t, x0, sigma, advantages, backend=bk, **nft_kwargs)

    def nft_fwd_bwd(bk):
        loss = nft_loss(v_nft, v_old, v_ref, x_t, x0, sigma, advantages, backend=bk, **nft_kwargs)
        return torch.autograd.grad(loss, v_nft)[0]

    return x, {
        "grpo_step": (step, 5),  # reads x, v, noise; writes x_next, mean
        "grpo_loss fwd": (loss_fwd, 4),  # reads x, x_next, v, ref_mean
        "grpo_loss fwd+bwd": (loss_fwd_bwd, 9),  # fwd 4 reads; bwd 4 reads + grad_v write
        "nft_loss fwd": (nft_fwd, 5),  # reads v_new, v_old, v_ref, x_t, x0
        "nft_loss fwd+bwd": (nft_fwd_bwd, 11),  # fwd 5 reads; bwd 5 reads + grad_v write
    }


def main(quick: bool = False) -> list[dict]:
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    if not on_gpu and not interpreting():
        raise RuntimeError("no GPU and triton was imported before TRITON_INTERPRET=1 could be set: "
                           "run `TRITON_INTERPRET=1 python -m bench grpo_ops --quick`")
    if quick or not on_gpu:
        shapes = [(2, 4, 3, 6, 10), (2, 4, 2, 5, 7)]
        num_samples, warmup, iters = 64, 1, 3
    else:
        shapes = [(8, 16, 21, 60, 104), (8, 16, 9, 30, 52)]
        num_samples, warmup, iters = 8192, 10, 50
    rows = []
    for shape in shapes:
        like, cases = _latent_cases(shape, device)
        copy_gbs = _copy_bandwidth(like, warmup, max(iters, 20))
        nbytes_latent = like.numel() * like.element_size()
        for name, (run, tensors_moved) in cases.items():
            max_err = (run("triton").double() - run("reference").double()).abs().max().item()
            ms = {bk: time_fn(lambda run=run, bk=bk: run(bk), warmup=warmup, iters=iters)["ms_median"]
                  for bk in ("triton", "reference")}
            gbs = tensors_moved * nbytes_latent / (ms["triton"] * 1e-3) / 1e9
            rows.append({"op": name, "shape": "x".join(map(str, shape)), "triton_ms": ms["triton"],
                         "reference_ms": ms["reference"], "speedup": ms["reference"] / ms["triton"],
                         "GB/s": gbs, "copy_GB/s": copy_gbs, "of_copy": gbs / copy_gbs, "max_abs_err": max_err})

    group_size = 8
    g = torch.Generator(device="cpu").manual_seed(1)
    rewards = torch.randn(num_samples, generator=g).to(device)
    # a shuffled, non-contiguous id per group, as the trainer's prompt rows would give
    ids = (torch.arange(num_samples) // group_size * 7 + 3)[torch.randperm(num_samples, generator=g)].to(device)
    num_groups = num_samples // group_size
    outs, ms = {}, {}
    for bk in ("triton", "reference"):
        outs[bk] = group_advantage(rewards, ids, num_groups=num_groups, backend=bk).advantages
        ms[bk] = time_fn(lambda bk=bk: group_advantage(rewards, ids, num_groups=num_groups, backend=bk),
                         warmup=warmup, iters=iters)["ms_median"]
    rows.append({"op": "group_advantage", "shape": f"{num_samples} in groups of {group_size}",
                 "triton_ms": ms["triton"], "reference_ms": ms["reference"],
                 "speedup": ms["reference"] / ms["triton"],
                 "max_abs_err": (outs["triton"].double() - outs["reference"].double()).abs().max().item()})

    columns = ["op", "shape", "triton_ms", "reference_ms", "speedup", "GB/s", "copy_GB/s", "of_copy", "max_abs_err"]
    report("grpo_ops", rows, columns, extra={"quick": quick, "dtype": "float32"})
    return rows


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
