"""Measurement side of sigprop: probes for any nn.Module. Imports torch, never theory/."""
