"""Model definitions in plain PyTorch on top of `idgrpo.kernels`: Wan2.1 DiT (T2V, VACE,
Phantom), Wan VAE, umT5, Qwen2.5-VL, LoRA, weight-format conversion. Knows nothing of
training."""
