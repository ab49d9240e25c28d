"""Symbolic side of sigprop: schemes and (later) their moment recurrences. No torch here."""

from theory.schemes import SCHEMES, Scheme, block_structure, get_scheme, register, scheme

__all__ = ["SCHEMES", "Scheme", "block_structure", "get_scheme", "register", "scheme"]
