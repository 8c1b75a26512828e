"""Rooted trees, for the order conditions of Runge-Kutta (test_tableaus.py) and Rosenbrock
(test_stiff.py) methods."""

from __future__ import annotations

import functools

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
