"""The files others load: LoRA (diffusers / kohya), Textual Inversion embeddings (diffusers / A1111), the metadata
header and the model card. Written at the end of training, read by generation."""
