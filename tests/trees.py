"""Rooted trees, for the order conditions of Runge-Kutta (test_tableaus.py) and Rosenbrock
(test_stiff.py) methods."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from fractions import Fraction

Tree = tuple  # a rooted tree: the sorted tuple of its children's subtrees; () is the single node


# -- rooted trees ------------------------------------------------------------------------------
def _canon(children: tuple[Tree, ...]) -> Tree:
    return tuple(sorted(children))


def _graft(tree: Tree) -> set[Tree]:
    """All trees obtained from ``tree`` by attaching one new leaf to one of its nodes."""
    out = {_canon(tree + ((),))}
    for i, child in enumerate(tree):
        for g in _graft(child):
            out.add(_canon(tree[:i] + (g,) + tree[i + 1 :]))
    return out


@functools.cache
def trees_of_order(n: int) -> tuple[Tree, ...]:
    if n == 1:
        return ((),)
    out: set[Tree] = set()
    for t in trees_of_order(n - 1):
        out |= _graft(t)
    return tuple(sorted(out))


def order(t: Tree) -> int:
    return 1 + sum(order(c) for c in t)


def gamma(t: Tree) -> int:
    g = order(t)
    for c in t:
        g *= gamma(c)
    return g


def residuals(
    b: Sequence[Fraction], phi: Callable[[Tree], Sequence[Fraction]], order: int
) -> dict[int, float]:
    """Largest ``|sum_i b_i Phi_i(t) - 1/gamma(t)|`` over the trees of each order up to
    ``order``, in exact arithmetic: the order conditions of a method with weights ``b`` and
    elementary weights ``phi``."""
    return {
        n: max(
            abs(float(sum((x * y for x, y in zip(b, phi(t))), Fraction(0)) - Fraction(1, gamma(t))))
            for t in trees_of_order(n)
        )
        for n in range(1, order + 1)
    }


def assert_sharp_orders(
    name: str,
    residuals_of: Callable[[Sequence[Fraction], int], dict[int, float]],
    cases: Sequence[tuple[str, Sequence[Fraction], int]],
    tol: float,
) -> None:
    """For each ``(label, weights, p)``: the order conditions hold to ``tol`` up to order ``p``
    and fail at ``p + 1`` (the stated order is the exact one)."""
    for label, weights, p in cases:
        res = residuals_of(weights, p + 1)
        print(name, label, {n: f"{r:.1e}" for n, r in res.items()})
        assert all(res[n] < tol for n in range(1, p + 1)), (name, label, res)
        assert res[p + 1] > 1e-4, f"{name} {label}: order {p + 1} holds too; say so"
