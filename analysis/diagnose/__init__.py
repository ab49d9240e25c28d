"""Diagnosis of arbitrary checkpoints (loaded by ``analysis.checkpoints``): the collapse diagnosis
with findings and a verdict, the atlas and the calibration."""
