"""Benchmarks behind `run_analysis.py bench`: each module has ``run(args)`` and prints figures."""
