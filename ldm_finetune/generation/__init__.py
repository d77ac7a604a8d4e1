"""Using trained models: images from prompts (base model + LoRAs + embeddings), and slices from a pixel DDPM or
the training-free local-score baseline."""
