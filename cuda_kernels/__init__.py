"""Fast kernels (front door added below)."""
