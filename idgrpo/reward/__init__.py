"""Identity reward: preference data, synthetic distortions, BT/BTT losses, reward models,
training and scoring. Never imports `idgrpo.rl`."""
