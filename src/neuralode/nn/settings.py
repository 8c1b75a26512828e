"""How a model solves its ODE: one settings type for every model family.

:class:`ODEBlock`, :class:`CNF`, :class:`LatentODE` and :class:`ODERNNEncoder` take the same
solver keywords (``method``, ``rtol``, ``atol``, ``step_size``, ``gradient`` and
``solve_options`` for any other keyword of :func:`neuralode.solve`), check them once at
construction, and keep them as ``model.solver``, a :class:`SolveSettings`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..gradients import GRADIENTS
from ..solvers import get_solver

__all__ = ["SolveSettings"]

#: Keywords a model sets itself: the problem, and the settings that have their own argument.
_OWN = frozenset({"func", "y0", "t", "batched", "method", "rtol", "atol", "step_size", "gradient"})


@dataclass(frozen=True)
class SolveSettings:
    """The :func:`neuralode.solve` arguments a model passes on every forward.

    Attributes:
        method: a name of :data:`neuralode.METHODS` (or what :func:`neuralode.get_solver`
            accepts).
        rtol, atol: tolerances of the adaptive methods (ignored by the fixed-step ones).
        step_size: the step of the fixed-step methods (``None``: one step per output interval).
        gradient: ``"backprop"``, ``"adjoint"`` or ``"checkpoint"``.
        options: any other keyword of :func:`neuralode.solve` (``adjoint_options``,
            ``max_num_steps``, ``adjoint_params``, ...), copied into a plain ``dict``.

    Raises:
        ValueError: for an unknown method or gradient (naming the known ones), the checkpoint
            gradient with a multistep method, a negative or NaN tolerance, or an option that has
            its own argument (``options={"rtol": ...}``).

    Examples:
        >>> from neuralode.nn import SolveSettings
        >>> settings = SolveSettings("rk4", step_size=0.1)
        >>> settings.kwargs()
        {'method': 'rk4', 'rtol': 0.001, 'atol': 0.001, 'step_size': 0.1, 'gradient': 'backprop'}
        >>> settings.replace(method="dopri5", step_size=None, rtol=1e-6)
        method='dopri5', rtol=1e-06, atol=0.001, gradient='backprop'
        >>> SolveSettings(gradient="magic")
        Traceback (most recent call last):
            ...
        ValueError: gradient must be one of ['backprop', 'adjoint', 'checkpoint'], got 'magic'
    """

    method: str = "dopri5"
    rtol: float = 1e-3
    atol: float = 1e-3
    step_size: float | None = None
    gradient: str = "backprop"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        solver = get_solver(self.method)  # unknown methods fail here, naming the known ones
        if self.gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {list(GRADIENTS)}, got {self.gradient!r}")
        if self.gradient == "checkpoint" and solver.multistep:  # as solve() would, at forward
            raise ValueError(
                f"gradient='checkpoint' cannot serve the multistep method {solver.name!r} (a "
                f"step's replay misses its dependence on earlier steps); use gradient='backprop' "
                f"or 'adjoint'"
            )
        for name in ("rtol", "atol"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        clash = sorted(set(self.options) & _OWN)
        if clash:
            raise ValueError(
                f"solve_options {clash} have their own arguments (method, rtol, atol, step_size, "
                "gradient) or are set by the model itself (batched: ODEBlock's own argument; "
                "the other models decide it from their data)"
            )
        object.__setattr__(self, "options", dict(self.options))

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`neuralode.solve` these settings stand for.

        Returns:
            A new ``dict``: ``method``, ``rtol``, ``atol``, ``step_size`` and ``gradient``, then
            the entries of ``options``.
        """
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**{k: v for k, v in own.items() if k != "options"}, **self.options}

    def replace(self, **changes: Any) -> SolveSettings:
        """A copy with ``changes`` (checked again).

        Args:
            **changes: new values of fields (``method``, ``rtol``, ``atol``, ``step_size``,
                ``gradient``, ``options``).

        Returns:
            A new :class:`SolveSettings`; this one is unchanged (it is frozen).

        Raises:
            TypeError: for a name that is not a field.
            ValueError: for a new value the constructor rejects.
        """
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        step = f", step_size={self.step_size}" if self.step_size is not None else ""
        extra = f", options={dict(self.options)}" if self.options else ""
        return (
            f"method={self.method!r}, rtol={self.rtol}, atol={self.atol}, "
            f"gradient={self.gradient!r}{step}{extra}"
        )
