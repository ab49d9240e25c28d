"""Measurement side of sigprop: probes for any nn.Module. Imports torch, never theory/."""

from probes.locate import PLACEMENTS, SITES, Layout, confirm_placement, locate, point_name
from probes.metrics import DEFAULT_METRICS, METRICS
from probes.probe import Probe, enable_hook_guards

__all__ = ["DEFAULT_METRICS", "METRICS", "PLACEMENTS", "SITES", "Layout", "Probe", "confirm_placement",
           "enable_hook_guards", "locate", "point_name"]
