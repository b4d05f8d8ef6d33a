"""Distributed runtime: process group, FSDP, precision, optimizer, checkpoints, metrics.

Knows nothing of video or RL; imports only `idgrpo.kernels`.
"""
