"""The tape both moment interpreters record: values as sums of sources, nodes, the backward walk.

theory/interpreter.py (sympy moments averaged over the sequence) and theory/positional.py (numeric
token-by-token covariances) run the same scheme functions over different algebras; what a value
is, what a node records and how gradients walk back through the tape is shared, here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


class SourceValue:
    """A value as interpreters see it: {source: coefficient} and the tape node that made it.

    ``v + w``, ``c * v`` and ``v / c`` become ``ctx.combine([(value, coefficient), ...])``;
    ``coerce`` turns a scheme's constant into the interpreter's number type (sympy, float).
    """

    __slots__ = ("ctx", "terms", "node")

    def __init__(self, ctx: Any, terms: dict, node: int):
        self.ctx, self.terms, self.node = ctx, terms, node

    @staticmethod
    def coerce(c: Any) -> Any:
        """The interpreter's form of a scheme constant."""
        return c

    def __add__(self, other: "SourceValue") -> "SourceValue":
        if not isinstance(other, SourceValue):
            raise TypeError("a scheme may add values only to values (use c * v for scaling)")
        one = self.coerce(1)
        return self.ctx.combine([(self, one), (other, one)])

    def __mul__(self, c: Any) -> "SourceValue":
        if isinstance(c, SourceValue):
            raise TypeError("a scheme may multiply a value only by a constant")
        return self.ctx.combine([(self, self.coerce(c))])

    __rmul__ = __mul__

    def __truediv__(self, c: Any) -> "SourceValue":
        return self.ctx.combine([(self, 1 / self.coerce(c))])


@dataclass
class Node:
    """One tape entry: kind input | lin | norm | attn | ffn, its parents with their amplitude
    factors (lin, norm), and what a sublayer needs for its backward map."""

    kind: str
    parents: list[tuple[int, Any]]
    sub: dict[str, Any] = field(default_factory=dict)


def walk_backward(nodes: list[Node], out_node: int, one: Any,
                  power: Callable[[dict[int, Any]], Any],
                  sublayer: Callable[[Node, Any], int], projected: bool = True) -> Any:
    """Gradient power at the block input (node 0), for the gradient source 0 at ``out_node``.

    Amplitudes add along deterministic paths (sums, scalings, norms); a random sublayer turns the
    power arriving at its output into a fresh, independent gradient source (gradient independence,
    Yang 2019): ``sublayer(node, power)`` registers it and returns its index. ``power(amps)`` is
    the power of {source: amplitude}. A norm's projection (node.sub["proj"], the k/d term of
    components.norm_backward_factor) removes k/d of the power of a gradient *fresh* from a
    sublayer; a gradient that already passed a norm lies orthogonal to that norm's (nearly
    parallel) direction and loses ~nothing more, so it is applied once per source and path
    (entries carry a flag). The block output's gradient arrives projected (``projected``): it
    passed the norms of the block above. The LM head's does not (``projected=False``: the top
    block of a stack without a final norm).
    """
    grads: dict[int, dict[tuple[int, bool], Any]] = {out_node: {(0, projected): one}}

    def amps(gr: dict[tuple[int, bool], Any]) -> dict[int, Any]:
        out: dict[int, Any] = {}
        for (j, _), a in gr.items():  # the same source adds coherently whatever its flag
            out[j] = out[j] + a if j in out else a
        return out

    def push(node: int, gr: dict, factor: Any, proj: Any = None) -> None:
        dst = grads.setdefault(node, {})
        for (j, done), a in gr.items():
            key, f = (j, done), factor
            if proj is not None and not done:
                key, f = (j, True), factor * proj
            dst[key] = dst[key] + f * a if key in dst else f * a

    for n in range(len(nodes) - 1, 0, -1):
        gr = grads.pop(n, None)
        if not gr:
            continue
        node = nodes[n]
        if node.kind == "lin":
            for parent, amp in node.parents:
                push(parent, gr, amp)
        elif node.kind == "norm":
            parent, scale = node.parents[0]
            push(parent, gr, scale, node.sub["proj"])
        else:
            j = sublayer(node, power(amps(gr)))
            push(node.parents[0][0], {(j, False): one}, 1)
    return power(amps(grads.get(0, {})))
