"""Experiments: the testbed model built from theory's schemes, corpora, and what runs on them."""
