"""Training: one run (AdamW, warmup + cosine, divergence as an outcome, atomic checkpoints) and
resumable grids of runs with probes at init, middle and end."""
