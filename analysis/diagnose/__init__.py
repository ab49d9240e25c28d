"""Diagnosis of arbitrary checkpoints: safe loading (sigprop runs, Hugging Face folders,
state_dicts) and the collapse diagnosis with findings and a verdict."""
