"""data_prep: 3D tomography volumes -> captioned 2D slices that `datasets` loads (and a synthetic phantom)."""
