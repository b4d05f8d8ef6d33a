"""Flow-matching SDE/ODE sampling with log-probs and the GRPO trainer. Never imports
`idgrpo.reward`: the trainer receives a scoring callable."""
