"""The models: Stable Diffusion components (load, build, tiny / mini presets, the pipeline builder), LoRA modules,
EMA, noise and loss math, the pixel DDPM UNet, schedules and samplers."""
