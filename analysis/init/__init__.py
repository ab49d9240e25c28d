"""At initialization: depth sweeps measured with probes, theory at the same configuration, the
comparison, measured claims, and the derived formulas written beside them (theory.json)."""
