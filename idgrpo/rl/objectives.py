"""Training objectives as pure functions of tensors: tests and benchmarks call them without a model.

- `nft_loss`: the DiffusionNFT loss (docs/objectives.md). Negative-aware fine-tuning on the
  forward (noising) process: a sample's advantage, clipped to ±adv_clip_max, becomes an
  optimality probability r = clip(A)/adv_clip_max/2 + 1/2; the trained velocity v_new and the
  sampling policy's v_old define an implicit positive policy β·v_new + (1 − β)·v_old and an
  implicit negative one (1 + β)·v_old − β·v_new, and the loss pulls the positive policy's x0
  prediction x_t − σ·v towards the clean latent with weight r and the negative's with weight
  1 − r, each squared error divided by its detached mean absolute error (floored at 1e-5).
  Conventions: x_t = (1 − σ)·x0 + σ·noise with σ in [0, 1] per sample; gradients reach v_new
  only. It dispatches like every kernel op (Triton on CUDA, the PyTorch reference elsewhere;
  `backend=` or IDGRPO_KERNELS).

GRPO's clipped-ratio loss needs the SDE step's log-probability and lives beside it in
`idgrpo.kernels.grpo_loss`.
"""

from idgrpo.kernels.nft_loss import nft_loss

__all__ = ["nft_loss"]
