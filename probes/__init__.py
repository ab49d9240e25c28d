"""Measurement side of sigprop: probes for any nn.Module. Imports torch, never theory/."""

from probes.locate import PLACEMENTS, Layout, confirm_placement, locate
from probes.metrics import DEFAULT_METRICS, METRICS
from probes.probe import Probe, enable_hook_guards

__all__ = ["DEFAULT_METRICS", "METRICS", "PLACEMENTS", "Layout", "Probe", "confirm_placement", "enable_hook_guards", "locate"]
