"""Identity reward: preference data, synthetic distortions, BT/BTT losses, reward models,
training and scoring. Never imports `idgrpo.rl`.

- `data`: the pair file format (CSV/JSONL: video_a, video_b, refs | refs_a + refs_b, prompt, label
  A/B/same), validation with file:line errors, loading with uniform frame sampling and resizing;
- `distortions`: identity-breaking / label-preserving / box-free distortions and `idgrpo synth-pairs`;
- `losses`: `bt_loss`, `btt_loss` (Rao-Kupper, docs/models.md#preference-losses), `btt_probabilities`;
- `model`: `IdentityRewardModel` (compact ViT, presets tiny/small/base);
- `train`: `idgrpo train-reward` (on the engine) and `idgrpo score`.

The reward interface the GRPO trainer takes is any callable
`score(frames uint8 (B, T, H, W, 3), references: list (len B) of lists of uint8 (h, w, 3), prompts: list[str])
-> (B,) float tensor on frames.device`, e.g. `IdentityRewardModel.load(dir, device).score`.
"""
