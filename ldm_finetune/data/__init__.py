"""Training data: records read from a prep output (or any captioned image folder), the datasets that turn them
into tensors, and the caches that skip frozen encoders."""
