"""Beyond initialization: the first optimizer steps across width and depth (one-step theory
checks, the coordinate check, learning-rate sweeps)."""
