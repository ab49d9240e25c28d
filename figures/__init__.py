"""Figures and reports, drawn from DataFrames only."""
