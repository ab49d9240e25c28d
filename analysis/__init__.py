"""Experiments, one subpackage per thing a user does.

testbed/   the model built from theory's schemes, the corpora, `schemes` and `model` inspection
init/      init sweeps, the theory-vs-measurement comparison, measured claims, `theory` output
training/  training runs and resumable grids with probes
diagnose/  loading arbitrary checkpoints safely, collapse diagnosis
bench/     speed and accuracy benchmarks (`bench`)
device.py  device names → torch devices, shared by all of them
"""
