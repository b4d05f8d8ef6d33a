"""idgrpo: Identity-GRPO (arXiv 2510.14256) on custom Triton kernels and a hand-rolled FSDP
engine. See README.md and docs/README.md."""

__version__ = "0.1.0"
