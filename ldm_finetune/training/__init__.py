"""Training: the recipe config, `fit(run, task)` (the one run every recipe goes through), the step loop,
checkpoints, and the tasks (Stable Diffusion with an adapter and objective, the pixel DDPM)."""
