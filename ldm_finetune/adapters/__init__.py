"""What trains, one module per kind (LoRA, full, Textual Inversion, pivotal), each owning its facts; the registry
maps `recipe:` to the adapter. A new kind: one module here plus one line in registry.py."""
