"""Butcher tableaus of the explicit Runge-Kutta methods, as validated data.

Every method is a :class:`ButcherTableau`: nodes ``c``, the strictly lower-triangular matrix ``a``,
the propagating weights ``b``, the error weights ``b_err = b - b_hat`` of the embedded pair, and a
:class:`DenseOutput` that gives the continuous extension

    y(t0 + theta h) = y0 + h * sum_j  B_j(theta) k_j,    B_j(theta) = sum_p P[j][p] theta^(p+1),

over the stages ``k_j`` followed by any extra stages of the interpolant (each extra stage is one
more ``f`` evaluation with its own node and ``a`` row over all earlier stages).

Coefficients are exact :class:`fractions.Fraction` where the method is rational; methods published
only as decimals (Tsit5, DOP853) are stored from their decimal strings and checked to a tolerance.
A new explicit method is one tableau and one registry entry: it then joins every parametrised test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

__all__ = [
    "ButcherTableau",
    "EsdirkTableau",
    "ESDIRK_TABLEAUS",
    "ImplicitTableau",
    "IMPLICIT_TABLEAUS",
    "RosenbrockTableau",
    "ROSENBROCK_TABLEAUS",
    "DenseOutput",
    "TABLEAUS",
    "get_tableau",
    "hermite_dense_output",
]

F = Fraction
Coeff = Fraction
Row = tuple[Coeff, ...]


def _check_close(name: str, tol: float, x: Fraction | int, y: Fraction, what: str) -> None:
    """A tableau's data check: ``x == y`` exactly (``tol == 0``) or to ``tol``."""
    if abs(float(x - y)) > tol or (tol == 0 and x != y):
        raise ValueError(f"tableau {name!r} fails its check {what}: {float(x)} vs {float(y)}")


def _frac(x: str | int | Fraction) -> Fraction:
    return Fraction(x)


def _row(*xs: str | int | Fraction) -> Row:
    return tuple(_frac(x) for x in xs)


def _poly(scale: str | int | Fraction, *factors: tuple[str | int | Fraction, ...]) -> Row:
    """``scale * prod(factors)`` as exact coefficients in ascending powers of theta.

    Each factor is its coefficients in ascending powers: ``("-1.2", 1)`` is ``theta - 1.2``.
    """
    out = [_frac(scale)]
    for factor in factors:
        f = [_frac(x) for x in factor]
        prod = [F(0)] * (len(out) + len(f) - 1)
        for i, x in enumerate(out):
            for j, y in enumerate(f):
                prod[i + j] += x * y
        out = prod
    return tuple(out)


def _theta_rows(*polys: Row) -> tuple[Row, ...]:
    """``DenseOutput.P`` from the ``B_j`` as ascending coefficient lists (constant term 0)."""
    degree = max(len(p) for p in polys) - 1
    if any(p[0] != 0 for p in polys):
        raise ValueError("dense output polynomials must vanish at theta = 0")
    return tuple(tuple(p[1:]) + (F(0),) * (degree + 1 - len(p)) for p in polys)


def _dop853_dense(b: Row, d: tuple[Row, ...]) -> tuple[Row, ...]:
    """``DenseOutput.P`` of DOP853's interpolant over its 12 stages, the FSAL stage and 3 extras.

    DOP853 (and scipy's ``Dop853DenseOutput``) evaluates, with ``x = theta``,
    ``y = y0 + x (F0 + (1-x) (F1 + x (F2 + (1-x) (F3 + x (F4 + (1-x) (F5 + x F6))))))``, where
    ``F0 = y1 - y0 = h sum_j b_j k_j``, ``F1 = h k_0 - F0``, ``F2 = 2 F0 - h (k_fsal + k_0)`` and
    ``F(3+i) = h sum_j d[i][j] k_j`` (``b`` ends with the FSAL stage's 0).  Each ``F_m`` is ``h``
    times a weight vector over the stages and enters ``y`` through the polynomial
    ``w_m = x, x(1-x), x^2(1-x), x^2(1-x)^2, ...``; expanding gives ``B_j = sum_m F_m[j] w_m``.
    """
    n = len(d[0])
    fsal = len(b) - 1
    f0 = [b[j] if j < len(b) else F(0) for j in range(n)]  # b padded to the n stages
    f1 = [(1 if j == 0 else 0) - x for j, x in enumerate(f0)]
    f2 = [2 * x - (1 if j in (0, fsal) else 0) for j, x in enumerate(f0)]
    weights = [f0, f1, f2, *d]
    w = _poly(1, (0, 1))
    polys = [[F(0)] * (len(weights) + 1) for _ in range(n)]
    for m, fm in enumerate(weights):
        for j in range(n):
            for p, coeff in enumerate(w):
                polys[j][p] += fm[j] * coeff
        w = _poly(1, w, (1, -1) if m % 2 == 0 else (0, 1))
    return _theta_rows(*(tuple(p) for p in polys))


@dataclass(frozen=True)
class DenseOutput:
    """Continuous extension of a Runge-Kutta step.

    Attributes:
        P: ``P[j][p]`` is the coefficient of ``theta^(p+1)`` in ``B_j(theta)``; one row per stage,
            then one row per extra stage.
        extra_c: nodes of the extra stages (empty for most methods).
        extra_a: ``a`` rows of the extra stages, each over all earlier stages (the method's stages,
            then earlier extra stages).
        order: order of the interpolant (its error is ``O(h^(order+1))`` locally).

    ``degree`` (a property) is the number of columns of ``P``, the polynomials' degree.  The
    rows are checked against their tableau when a :class:`ButcherTableau` is built with them.

    Examples:
        >>> import neuralode
        >>> dense = neuralode.get_tableau("dopri5").dense  # Hairer's quartic interpolant
        >>> dense.order, dense.degree, len(dense.P), dense.extra_c
        (4, 4, 7, ())
    """

    P: tuple[Row, ...]
    extra_c: Row = ()
    extra_a: tuple[Row, ...] = ()
    order: int = 3

    @property
    def degree(self) -> int:
        return len(self.P[0])


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta method.

    Attributes:
        name: registry name.
        order: order ``p`` of the propagated solution (global error ``O(h^p)``).
        c: nodes, length ``s``.
        a: rows ``a[i]`` of length ``i`` (strictly lower triangular), ``len(a) == s``.
        b: weights of the propagated solution, length ``s``.
        b_err: ``b - b_hat`` for the embedded lower-order solution, or ``None`` (fixed-step only).
        error_order: order of the embedded solution; the controller exponent is
            ``1 / (error_order + 1)``.
        b_err2: a second error estimator (DOP853's 3rd-order one), combined as in Hairer's DOP853.
        dense: continuous extension; ``None``: :class:`~neuralode.solvers.ExplicitRK` (and so
            ``method=``) uses cubic Hermite interpolation, :func:`hermite_dense_output`
            ``(b, order)``.
        tol: tolerance of the order-condition checks (0 for exact rational tableaus).
        fsal: computed, not passed: whether the last stage is ``f(t + h, y1)`` (node 1 and
            ``a[-1] + (0,) == b``), which the solver then carries into the next step.

    Coefficients are :class:`fractions.Fraction` or ``int`` (write a decimal as
    ``Fraction("0.1")``).  ``stages`` and ``adaptive`` (``b_err`` given) are properties.

    Raises:
        ValueError: the data fail a check: lengths (``c``, ``a``, ``b`` one entry per stage,
            ``a[i]`` of length ``i``), a row of ``a`` that does not sum to its node,
            ``sum(b) != 1``, ``sum(b_err) != 0``, ``b_err`` without ``error_order`` (or the
            reverse), or a dense output that does not end on ``b``.  The message names the
            tableau and the check.

    Examples:
        Heun's method with Euler's as the embedded pair, order 2(1), used as ``method=``:

        >>> from fractions import Fraction as F
        >>> import torch, neuralode
        >>> from neuralode.tableaus import hermite_dense_output
        >>> b = (F(1, 2), F(1, 2))
        >>> heun_euler = neuralode.ButcherTableau(
        ...     name="heun_euler", order=2, c=(F(0), F(1)), a=((), (F(1),)), b=b,
        ...     b_err=(F(-1, 2), F(1, 2)), error_order=1, dense=hermite_dense_output(b, 2))
        >>> sol = neuralode.solve(lambda t, y: -y, torch.ones(1, dtype=torch.float64),
        ...                       torch.tensor([0.0, 1.0], dtype=torch.float64),
        ...                       method=heun_euler, rtol=1e-4, atol=1e-6)
        >>> round(float(sol.ys[-1, 0]), 4), heun_euler.adaptive, heun_euler.fsal  # exp(-1)
        (0.3679, True, False)
    """

    name: str
    order: int
    c: Row
    a: tuple[Row, ...]
    b: Row
    b_err: Row | None = None
    error_order: int | None = None
    b_err2: Row | None = None
    dense: DenseOutput | None = None
    tol: float = 0.0
    fsal: bool = field(init=False)

    def __post_init__(self) -> None:
        s = len(self.c)
        name = self.name
        if len(self.a) != s or len(self.b) != s:
            raise ValueError(f"tableau {name!r}: c, a and b must have one entry per stage ({s})")
        for i, row in enumerate(self.a):
            if len(row) != i:
                raise ValueError(f"tableau {name!r}: a[{i}] must have {i} entries, has {len(row)}")
            self._close(sum(row), self.c[i], f"row {i} of a sums to c[{i}]")
        self._close(sum(self.b), F(1), "sum(b) == 1")
        for label, e in (("b_err", self.b_err), ("b_err2", self.b_err2)):
            if e is not None:
                if len(e) != s:
                    raise ValueError(f"tableau {name!r}: {label} must have {s} entries")
                self._close(sum(e), F(0), f"sum({label}) == 0")
        if (self.b_err is None) != (self.error_order is None):
            raise ValueError(f"tableau {name!r}: b_err and error_order go together")
        # FSAL: the last stage is f(t + h, y1), i.e. node 1 and row (a[-1], 0) == b.  c[0] is 0
        # (the first row of a is empty), so a one-stage tableau is never FSAL.
        last = (*self.a[-1], F(0))  # as long as b: the lengths are checked above
        fsal = self.c[-1] == 1 and all(abs(float(x - y)) <= self.tol for x, y in zip(last, self.b))
        object.__setattr__(self, "fsal", fsal)
        if self.dense is not None:
            d = self.dense
            n_k = s + len(d.extra_c)
            if len(d.P) != n_k or len({len(r) for r in d.P}) != 1:
                raise ValueError(f"tableau {name!r}: dense P must have {n_k} rows of equal length")
            for i, (ci, row) in enumerate(zip(d.extra_c, d.extra_a)):
                if len(row) != s + i:
                    raise ValueError(f"tableau {name!r}: extra stage {i} needs {s + i} a entries")
                self._close(sum(row), ci, f"extra stage {i} row sums to its node")
            # B_j(1) == b_j: the interpolant ends on the step's solution.
            for j in range(n_k):
                bj = self.b[j] if j < s else F(0)
                self._close(sum(d.P[j]), bj, f"dense output B_{j}(1) == b_{j}")

    def _close(self, x: Fraction | int, y: Fraction, what: str) -> None:
        _check_close(self.name, self.tol, x, y, what)

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return self.b_err is not None


def hermite_dense_output(b: Row, order: int) -> DenseOutput:
    """Cubic Hermite interpolation through (y0, f0) and (y1, f1) in the tableau's own terms.

    ``f1 = f(t0 + h, y1)`` is added as one extra stage (node 1, ``a`` row = ``b``), which the solver
    reuses as the first stage of the next step, so interpolation costs no extra evaluation except
    at the last step.  With ``y1 - y0 = h sum_j b_j k_j``:
    ``B_j = (3 theta^2 - 2 theta^3) b_j + [j=0] (theta - 2 theta^2 + theta^3)
    + [j=f1] (theta^3 - theta^2)``.

    Args:
        b: the tableau's weights (exact fractions), one per stage.
        order: the tableau's order; the interpolant's is ``min(order, 3)``.

    Returns:
        The interpolant, a :class:`DenseOutput` over the ``len(b)`` stages and the extra
            stage ``f1``.

    Examples:
        >>> from fractions import Fraction as F
        >>> from neuralode.tableaus import hermite_dense_output
        >>> dense = hermite_dense_output((F(1, 2), F(1, 2)), order=2)
        >>> dense.order, dense.degree, len(dense.P), dense.extra_c
        (2, 3, 3, (Fraction(1, 1),))
    """
    s = len(b)
    rows: list[Row] = []
    for j in range(s):
        rows.append(
            (
                F(1) if j == 0 else F(0),
                3 * b[j] - (2 if j == 0 else 0),
                -2 * b[j] + (1 if j == 0 else 0),
            )
        )
    rows.append((F(0), F(-1), F(1)))
    return DenseOutput(P=tuple(rows), extra_c=(F(1),), extra_a=(tuple(b),), order=min(order, 3))


def _fixed(name: str, order: int, c: Row, a: tuple[Row, ...], b: Row) -> ButcherTableau:
    return ButcherTableau(
        name=name, order=order, c=c, a=a, b=b, dense=hermite_dense_output(b, order)
    )


EULER = _fixed("euler", 1, _row(0), ((),), _row(1))

MIDPOINT = _fixed("midpoint", 2, _row(0, F(1, 2)), ((), _row(F(1, 2))), _row(0, 1))

# Heun's method (explicit trapezoidal rule), the 2-stage order-2 method with b = (1/2, 1/2).
HEUN = _fixed("heun", 2, _row(0, 1), ((), _row(1)), _row(F(1, 2), F(1, 2)))

RK4 = _fixed(
    "rk4",
    4,
    _row(0, F(1, 2), F(1, 2), 1),
    ((), _row(F(1, 2)), _row(0, F(1, 2)), _row(0, 0, 1)),
    _row(F(1, 6), F(1, 3), F(1, 3), F(1, 6)),
)

# Heun's third-order method (Heun 1900; Hairer, Norsett & Wanner, Solving ODEs I, II.1): nodes
# 0, 1/3, 2/3 and weights (1/4, 0, 3/4).  torchdiffeq's `heun3`.
HEUN3 = _fixed(
    "heun3",
    3,
    _row(0, F(1, 3), F(2, 3)),
    ((), _row(F(1, 3)), _row(0, F(2, 3))),
    _row(F(1, 4), 0, F(3, 4)),
)

# Kutta's 3/8 rule (Kutta 1901): fourth order like the classic `rk4`, with nodes 0, 1/3, 2/3, 1.
# torchdiffeq's `rk4` is this rule; ours is the classic one (nodes 0, 1/2, 1/2, 1).
RK38 = _fixed(
    "rk38",
    4,
    _row(0, F(1, 3), F(2, 3), 1),
    ((), _row(F(1, 3)), _row(F(-1, 3), 1), _row(1, -1, 1)),
    _row(F(1, 8), F(3, 8), F(3, 8), F(1, 8)),
)

# Heun-Euler 2(1): Heun's method propagated, Euler's step the embedded first-order solution
# (torchdiffeq's `adaptive_heun`).  Dense output: cubic Hermite.
ADAPTIVE_HEUN = ButcherTableau(
    name="adaptive_heun",
    order=2,
    c=_row(0, 1),
    a=((), _row(1)),
    b=_row(F(1, 2), F(1, 2)),
    b_err=_row(F(-1, 2), F(1, 2)),  # b - (1, 0)
    error_order=1,
    dense=hermite_dense_output(_row(F(1, 2), F(1, 2)), 2),
)

# Fehlberg (1969), "Low-order classical Runge-Kutta formulas with stepsize control", NASA TR R-315:
# the RK1(2) pair, here with local extrapolation (the second-order solution propagated, as in
# torchdiffeq's `fehlberg2`); the embedded first-order solution is (1/256, 255/256, 0).
_FEHLBERG2_B = _row(F(1, 512), F(255, 256), F(1, 512))
FEHLBERG2 = ButcherTableau(
    name="fehlberg2",
    order=2,
    c=_row(0, F(1, 2), 1),
    a=((), _row(F(1, 2)), _row(F(1, 256), F(255, 256))),
    b=_FEHLBERG2_B,
    b_err=tuple(x - y for x, y in zip(_FEHLBERG2_B, _row(F(1, 256), F(255, 256), 0))),
    error_order=1,
    dense=hermite_dense_output(_FEHLBERG2_B, 2),
)

# Bogacki & Shampine (1989), "A 3(2) pair of Runge-Kutta formulas", Appl. Math. Lett. 2(4).
# FSAL; the embedded solution is order 2.  Dense output: cubic Hermite on (y0, f0, y1, f1), which
# here uses the FSAL stage as f1 (the same interpolant as scipy's RK23).
_BOSH3_B = _row(F(2, 9), F(1, 3), F(4, 9), 0)
_BOSH3_BHAT = _row(F(7, 24), F(1, 4), F(1, 3), F(1, 8))
BOSH3 = ButcherTableau(
    name="bosh3",
    order=3,
    c=_row(0, F(1, 2), F(3, 4), 1),
    a=((), _row(F(1, 2)), _row(0, F(3, 4)), _row(F(2, 9), F(1, 3), F(4, 9))),
    b=_BOSH3_B,
    b_err=tuple(x - y for x, y in zip(_BOSH3_B, _BOSH3_BHAT)),
    error_order=2,
    dense=DenseOutput(
        P=(
            _row(1, F(-4, 3), F(5, 9)),
            _row(0, 1, F(-2, 3)),
            _row(0, F(4, 3), F(-8, 9)),
            _row(0, -1, 1),
        ),
        order=3,
    ),
)

# Dormand & Prince (1980), "A family of embedded Runge-Kutta formulae", J. Comp. Appl. Math. 6(1).
# FSAL, 5th-order solution, 4th-order embedded.  Dense output: Shampine's 4th-order continuous
# extension (Hairer, Norsett & Wanner, Solving ODEs I, II.6), as the theta-polynomial matrix.
_DOPRI5_B = _row(F(35, 384), 0, F(500, 1113), F(125, 192), F(-2187, 6784), F(11, 84), 0)
_DOPRI5_BHAT = _row(
    F(5179, 57600), 0, F(7571, 16695), F(393, 640), F(-92097, 339200), F(187, 2100), F(1, 40)
)
DOPRI5 = ButcherTableau(
    name="dopri5",
    order=5,
    c=_row(0, F(1, 5), F(3, 10), F(4, 5), F(8, 9), 1, 1),
    a=(
        (),
        _row(F(1, 5)),
        _row(F(3, 40), F(9, 40)),
        _row(F(44, 45), F(-56, 15), F(32, 9)),
        _row(F(19372, 6561), F(-25360, 2187), F(64448, 6561), F(-212, 729)),
        _row(F(9017, 3168), F(-355, 33), F(46732, 5247), F(49, 176), F(-5103, 18656)),
        _DOPRI5_B[:6],
    ),
    b=_DOPRI5_B,
    b_err=tuple(x - y for x, y in zip(_DOPRI5_B, _DOPRI5_BHAT)),
    error_order=4,
    dense=DenseOutput(
        P=(
            _row(
                1,
                F(-8048581381, 2820520608),
                F(8663915743, 2820520608),
                F(-12715105075, 11282082432),
            ),
            _row(0, 0, 0, 0),
            _row(
                0,
                F(131558114200, 32700410799),
                F(-68118460800, 10900136933),
                F(87487479700, 32700410799),
            ),
            _row(
                0,
                F(-1754552775, 470086768),
                F(14199869525, 1410260304),
                F(-10690763975, 1880347072),
            ),
            _row(
                0,
                F(127303824393, 49829197408),
                F(-318862633887, 49829197408),
                F(701980252875, 199316789632),
            ),
            _row(0, F(-282668133, 205662961), F(2019193451, 616988883), F(-1453857185, 822651844)),
            _row(0, F(40617522, 29380423), F(-110615467, 29380423), F(69997945, 29380423)),
        ),
        order=4,
    ),
)

# Tsitouras (2011), "Runge-Kutta pairs of order 5(4) satisfying only the first column simplifying
# assumption", Computers & Mathematics with Applications 62(2), 770-775.  FSAL, 5th-order solution,
# 4th-order embedded (whose weight on the FSAL stage is 1/66).  The paper prints ~16 digits; the
# values below are the same coefficients to ~85 digits (as tabulated in OrdinaryDiffEq.jl and
# torchdiffeq), which round to the paper's decimals and satisfy the order conditions to ~1e-76.
# Dense output: the paper's 4th-order b_j(theta), printed there in factored form with ~17-19
# digits and expanded here exactly; B_j(1) == b_j and its order conditions hold to ~5e-17: ``tol``.
_TSIT5_B = _row(
    "0.09646076681806522951816731316512876333711995238157997181903319145764851595234062815396",
    "0.01",
    "0.4798896504144995747752495322905965199130404621990332488332634944254542060153074523509",
    "1.379008574103741893192274821856872770756462643091360525934940067397245698027561293331",
    "-3.290069515436080679901047585711363850115683290894936158531296799594813811049925401677",
    "2.324710524099773982415355918398765796109060233222962411944060046314465391054716027841",
    0,
)
# b - b_hat, where b_hat are the embedded 4th-order weights (b_hat_6 = 1/66 on the FSAL stage).
_TSIT5_B_ERR = _row(
    "1.780011052225771443378550607539534775944678804333659557637450799792588061629796e-03",
    "8.164344596567469032236360633546862401862537590159047610940604670770447527463931e-04",
    "-7.880878010261996010314727672526304238628733777103128603258129604952959142646516e-03",
    "1.44711007173262907537165147972635116720922712343167677619514233896760819649515e-01",
    "-5.823571654525552250199376106520421794260781239567387797673045438803694038950012e-01",
    "4.580821059291869466616365188325542974428047279788398179474684434732070620889539e-01",
    F(-1, 66),
)
TSIT5 = ButcherTableau(
    name="tsit5",
    order=5,
    c=_row(
        0,
        "0.161",
        "0.327",
        "0.9",
        "0.9800255409045096857298102862870245954942137979563024768854764293221195950761080302604",
        1,
        1,
    ),
    a=(
        (),
        _row("0.161"),
        _row(
            "-0.008480655492356988544426874250230774675121177393430391537369234245294192976164141156943",
            "0.3354806554923569885444268742502307746751211773934303915373692342452941929761641411569",
        ),
        _row(
            "2.897153057105493432130432594192938764924887287701866490314866693455023795137503079289",
            "-6.359448489975074843148159912383825625952700647415626703305928850207288721235210244366",
            "4.362295432869581411017727318190886861027813359713760212991062156752264926097707165077",
        ),
        _row(
            "5.325864828439256604428877920840511317836476253097040101202360397727981648835607691791",
            "-11.74888356406282787774717033978577296188744178259862899288666928009020615663593781589",
            "7.495539342889836208304604784564358155658679161518186721010132816213648793440552049753",
            "-0.09249506636175524925650207933207191611349983406029535244034750452930469056411389539635",
        ),
        _row(
            "5.861455442946420028659251486982647890394337666164814434818157239052507339770711679748",
            "-12.92096931784710929170611868178335939541780751955743459166312250439928519268343184452",
            "8.159367898576158643180400794539253485181918321135053305748355423955009222648673734986",
            "-0.07158497328140099722453054252582973869127213147363544882721139659546372402303777878835",
            "-0.02826905039406838290900305721271224146717633626879770007617876201276764571291579142206",
        ),
        _TSIT5_B[:6],
    ),
    b=_TSIT5_B,
    b_err=_TSIT5_B_ERR,
    error_order=4,
    dense=DenseOutput(
        P=_theta_rows(
            # b1 = -1.0530884977290216 t (t - 1.3299890189751412)
            #      * (t^2 - 1.4364028541716351 t + 0.7139816917074209)
            _poly(
                "-1.0530884977290216",
                (0, 1),
                ("-1.3299890189751412", 1),
                ("0.7139816917074209", "-1.4364028541716351", 1),
            ),
            # b2 = 0.1017 t^2 (t^2 - 2.1966568338249754 t + 1.2949852507374631)
            _poly("0.1017", (0, 0, 1), ("1.2949852507374631", "-2.1966568338249754", 1)),
            # b3 = 2.490627285651252793 t^2 (t^2 - 2.38535645472061657 t + 1.57803468208092486)
            _poly(
                "2.490627285651252793",
                (0, 0, 1),
                ("1.57803468208092486", "-2.38535645472061657", 1),
            ),
            # b4 = -16.54810288924490272 (t - 1.21712927295533244) (t - 0.61620406037800089) t^2
            _poly(
                "-16.54810288924490272",
                ("-1.21712927295533244", 1),
                ("-0.61620406037800089", 1),
                (0, 0, 1),
            ),
            # b5 = 47.37952196281928122 (t - 1.203071208372362603) (t - 0.658047292653547382) t^2
            _poly(
                "47.37952196281928122",
                ("-1.203071208372362603", 1),
                ("-0.658047292653547382", 1),
                (0, 0, 1),
            ),
            # b6 = -34.87065786149660974 (t - 1.2) (t - 0.666666666666666667) t^2
            _poly("-34.87065786149660974", ("-1.2", 1), ("-0.666666666666666667", 1), (0, 0, 1)),
            # b7 = 2.5 (t - 1) (t - 0.6) t^2
            _poly("2.5", (-1, 1), ("-0.6", 1), (0, 0, 1)),
        ),
        order=4,
    ),
    tol=1e-16,
)


# Prince & Dormand (1981), "High order embedded Runge-Kutta formulae", J. Comp. Appl. Math. 7(1), in
# the 8(5,3) form of Hairer's DOP853 (Hairer, Norsett & Wanner, Solving Ordinary Differential
# Equations I, 2nd ed., Sec. II), with DOP853's 30-digit coefficients as in scipy's
# ``dop853_coefficients.py``.  Stages 0..11 are DOP853's; stage 12 (node 1, ``a`` row = b) is
# f(t + h, y1), which DOP853 evaluates every step and reuses as the next step's first stage, so the
# tableau is FSAL.  Two error estimators, ``b_err`` (5th-order, E5) and ``b_err2`` (3rd-order, E3),
# combined as err = err5^2 / sqrt(err5^2 + 0.01 err3^2), which behaves as O(h^8): hence
# ``error_order=7``.  Dense output: DOP853's 7th-order interpolant (three extra stages), expanded
# exactly into ``P`` by :func:`_dop853_dense`.  The decimals satisfy the checks and the order
# conditions (8 for b, 5 and 3 for the estimators, 7 for the interpolant) to ~3e-26: ``tol``.
_DOP853_C = _row(
    0,
    "0.526001519587677318785587544488e-01",
    "0.789002279381515978178381316732e-01",
    "0.118350341907227396726757197510",
    "0.281649658092772603273242802490",
    "0.333333333333333333333333333333",
    "0.25",
    "0.307692307692307692307692307692",
    "0.651282051282051282051282051282",
    "0.6",
    "0.857142857142857142857142857142",
    1,
    1,
)
_DOP853_B = _row(
    "5.42937341165687622380535766363e-2",
    0,
    0,
    0,
    0,
    "4.45031289275240888144113950566",
    "1.89151789931450038304281599044",
    "-5.8012039600105847814672114227",
    "3.1116436695781989440891606237e-1",
    "-1.52160949662516078556178806805e-1",
    "2.01365400804030348374776537501e-1",
    "4.47106157277725905176885569043e-2",
    0,
)
_DOP853_A = (
    (),
    _row("5.26001519587677318785587544488e-2"),
    _row("1.97250569845378994544595329183e-2", "5.91751709536136983633785987549e-2"),
    _row("2.95875854768068491816892993775e-2", 0, "8.87627564304205475450678981324e-2"),
    _row(
        "2.41365134159266685502369798665e-1",
        0,
        "-8.84549479328286085344864962717e-1",
        "9.24834003261792003115737966543e-1",
    ),
    _row(
        "3.7037037037037037037037037037e-2",
        0,
        0,
        "1.70828608729473871279604482173e-1",
        "1.25467687566822425016691814123e-1",
    ),
    _row(
        "3.7109375e-2",
        0,
        0,
        "1.70252211019544039314978060272e-1",
        "6.02165389804559606850219397283e-2",
        "-1.7578125e-2",
    ),
    _row(
        "3.70920001185047927108779319836e-2",
        0,
        0,
        "1.70383925712239993810214054705e-1",
        "1.07262030446373284651809199168e-1",
        "-1.53194377486244017527936158236e-2",
        "8.27378916381402288758473766002e-3",
    ),
    _row(
        "6.24110958716075717114429577812e-1",
        0,
        0,
        "-3.36089262944694129406857109825",
        "-8.68219346841726006818189891453e-1",
        "2.75920996994467083049415600797e1",
        "2.01540675504778934086186788979e1",
        "-4.34898841810699588477366255144e1",
    ),
    _row(
        "4.77662536438264365890433908527e-1",
        0,
        0,
        "-2.48811461997166764192642586468",
        "-5.90290826836842996371446475743e-1",
        "2.12300514481811942347288949897e1",
        "1.52792336328824235832596922938e1",
        "-3.32882109689848629194453265587e1",
        "-2.03312017085086261358222928593e-2",
    ),
    _row(
        "-9.3714243008598732571704021658e-1",
        0,
        0,
        "5.18637242884406370830023853209",
        "1.09143734899672957818500254654",
        "-8.14978701074692612513997267357",
        "-1.85200656599969598641566180701e1",
        "2.27394870993505042818970056734e1",
        "2.49360555267965238987089396762",
        "-3.0467644718982195003823669022",
    ),
    _row(
        "2.27331014751653820792359768449",
        0,
        0,
        "-1.05344954667372501984066689879e1",
        "-2.00087205822486249909675718444",
        "-1.79589318631187989172765950534e1",
        "2.79488845294199600508499808837e1",
        "-2.85899827713502369474065508674",
        "-8.87285693353062954433549289258",
        "1.23605671757943030647266201528e1",
        "6.43392746015763530355970484046e-1",
    ),
    _DOP853_B[:12],
)
# The 3rd-order embedded weights (at stages 0, 8 and 11); E3 = b - b_hat3.
_DOP853_BHAT3 = _row(
    "0.244094488188976377952755905512",
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    "0.733846688281611857341361741547",
    0,
    0,
    "0.220588235294117647058823529412e-1",
    0,
)
_DOP853_E5 = _row(
    "0.1312004499419488073250102996e-1",
    0,
    0,
    0,
    0,
    "-0.1225156446376204440720569753e+1",
    "-0.4957589496572501915214079952",
    "0.1664377182454986536961530415e+1",
    "-0.3503288487499736816886487290",
    "0.3341791187130174790297318841",
    "0.8192320648511571246570742613e-1",
    "-0.2235530786388629525884427845e-1",
    0,
)
# Interpolant coefficients d[i][j] over the 16 stages (DOP853's D, scipy's ``D``).
_DOP853_D = (
    _row(
        "-0.84289382761090128651353491142e+1",
        0,
        0,
        0,
        0,
        "0.56671495351937776962531783590",
        "-0.30689499459498916912797304727e+1",
        "0.23846676565120698287728149680e+1",
        "0.21170345824450282767155149946e+1",
        "-0.87139158377797299206789907490",
        "0.22404374302607882758541771650e+1",
        "0.63157877876946881815570249290",
        "-0.88990336451333310820698117400e-1",
        "0.18148505520854727256656404962e+2",
        "-0.91946323924783554000451984436e+1",
        "-0.44360363875948939664310572000e+1",
    ),
    _row(
        "0.10427508642579134603413151009e+2",
        0,
        0,
        0,
        0,
        "0.24228349177525818288430175319e+3",
        "0.16520045171727028198505394887e+3",
        "-0.37454675472269020279518312152e+3",
        "-0.22113666853125306036270938578e+2",
        "0.77334326684722638389603898808e+1",
        "-0.30674084731089398182061213626e+2",
        "-0.93321305264302278729567221706e+1",
        "0.15697238121770843886131091075e+2",
        "-0.31139403219565177677282850411e+2",
        "-0.93529243588444783865713862664e+1",
        "0.35816841486394083752465898540e+2",
    ),
    _row(
        "0.19985053242002433820987653617e+2",
        0,
        0,
        0,
        0,
        "-0.38703730874935176555105901742e+3",
        "-0.18917813819516756882830838328e+3",
        "0.52780815920542364900561016686e+3",
        "-0.11573902539959630126141871134e+2",
        "0.68812326946963000169666922661e+1",
        "-0.10006050966910838403183860980e+1",
        "0.77771377980534432092869265740",
        "-0.27782057523535084065932004339e+1",
        "-0.60196695231264120758267380846e+2",
        "0.84320405506677161018159903784e+2",
        "0.11992291136182789328035130030e+2",
    ),
    _row(
        "-0.25693933462703749003312586129e+2",
        0,
        0,
        0,
        0,
        "-0.15418974869023643374053993627e+3",
        "-0.23152937917604549567536039109e+3",
        "0.35763911791061412378285349910e+3",
        "0.93405324183624310003907691704e+2",
        "-0.37458323136451633156875139351e+2",
        "0.10409964950896230045147246184e+3",
        "0.29840293426660503123344363579e+2",
        "-0.43533456590011143754432175058e+2",
        "0.96324553959188282948394950600e+2",
        "-0.39177261675615439165231486172e+2",
        "-0.14972683625798562581422125276e+3",
    ),
)
# The interpolant's three extra stages (nodes 0.1, 0.2, 7/9), over the 13 stages and earlier extras.
_DOP853_EXTRA_A = (
    _row(
        "5.61675022830479523392909219681e-2",
        0,
        0,
        0,
        0,
        0,
        "2.53500210216624811088794765333e-1",
        "-2.46239037470802489917441475441e-1",
        "-1.24191423263816360469010140626e-1",
        "1.5329179827876569731206322685e-1",
        "8.20105229563468988491666602057e-3",
        "7.56789766054569976138603589584e-3",
        "-8.298e-3",
    ),
    _row(
        "3.18346481635021405060768473261e-2",
        0,
        0,
        0,
        0,
        "2.83009096723667755288322961402e-2",
        "5.35419883074385676223797384372e-2",
        "-5.49237485713909884646569340306e-2",
        0,
        0,
        "-1.08347328697249322858509316994e-4",
        "3.82571090835658412954920192323e-4",
        "-3.40465008687404560802977114492e-4",
        "1.41312443674632500278074618366e-1",
    ),
    _row(
        "-4.28896301583791923408573538692e-1",
        0,
        0,
        0,
        0,
        "-4.69762141536116384314449447206",
        "7.68342119606259904184240953878",
        "4.06898981839711007970213554331",
        "3.56727187455281109270669543021e-1",
        0,
        0,
        0,
        "-1.39902416515901462129418009734e-3",
        "2.9475147891527723389556272149",
        "-9.15095847217987001081870187138",
    ),
)
DOPRI8 = ButcherTableau(
    name="dopri8",
    order=8,
    c=_DOP853_C,
    a=_DOP853_A,
    b=_DOP853_B,
    b_err=_DOP853_E5,
    error_order=7,
    b_err2=tuple(x - y for x, y in zip(_DOP853_B, _DOP853_BHAT3, strict=True)),
    dense=DenseOutput(
        P=_dop853_dense(_DOP853_B, _DOP853_D),
        extra_c=_row("0.1", "0.2", "0.777777777777777777777777777778"),
        extra_a=_DOP853_EXTRA_A,
        order=7,
    ),
    tol=1e-25,
)

TABLEAUS: dict[str, ButcherTableau] = {
    t.name: t
    for t in (
        EULER,
        MIDPOINT,
        HEUN,
        HEUN3,
        RK4,
        RK38,
        ADAPTIVE_HEUN,
        FEHLBERG2,
        BOSH3,
        DOPRI5,
        TSIT5,
        DOPRI8,
    )
}

#: Other names of registered methods (torchdiffeq's spellings).
ALIASES: dict[str, str] = {"heun2": "heun"}


def get_tableau(method: str) -> ButcherTableau:
    """The explicit Runge-Kutta tableau registered as ``method``.

    Args:
        method: a name in :data:`TABLEAUS` (``"dopri5"``, ``"tsit5"``, ``"rk4"``, ...) or an
            alias (``"heun2"``).

    Returns:
        The registered :class:`ButcherTableau` (frozen, so shared by every caller).

    Raises:
        ValueError: ``method`` is no explicit tableau: the message lists the known ones, or
            says where a stiff or multistep method's coefficients are (``rodas5p``:
            ``ROSENBROCK_TABLEAUS``; ``kvaerno5``: ``ESDIRK_TABLEAUS``).

    Examples:
        >>> import neuralode
        >>> tableau = neuralode.get_tableau("dopri5")
        >>> tableau.order, tableau.error_order, tableau.stages, tableau.fsal
        (5, 4, 7, True)
        >>> neuralode.get_tableau("heun2").name  # torchdiffeq's spelling
        'heun'
    """
    try:
        return TABLEAUS[ALIASES.get(method, method)]
    except (KeyError, TypeError):
        if method in ROSENBROCK_TABLEAUS:
            raise ValueError(
                f"{method!r} is a Rosenbrock method, not an explicit Runge-Kutta tableau: its "
                f"coefficients are neuralode.solvers.ROSENBROCK_TABLEAUS[{method!r}]"
            ) from None
        if method in ESDIRK_TABLEAUS:
            raise ValueError(
                f"{method!r} is an implicit (ESDIRK) method, not an explicit Runge-Kutta tableau: "
                f"its coefficients are neuralode.solvers.ESDIRK_TABLEAUS[{method!r}]"
            ) from None
        if method == "rosenbrock23":
            raise ValueError(
                "'rosenbrock23' is a Rosenbrock method with no tableau of its own "
                "(neuralode.solvers.Rosenbrock23)"
            ) from None
        if method in ("explicit_adams", "implicit_adams", "fixed_adams"):
            raise ValueError(
                f"{method!r} is a multistep (Adams) method with no Butcher tableau "
                f"(neuralode.solvers.AdamsBashforth, AdamsBashforthMoulton)"
            ) from None
        known = ", ".join(sorted([*TABLEAUS, *ALIASES]))
        raise ValueError(f"unknown method {method!r}; known methods are: {known}") from None


# -- Rosenbrock methods ----------------------------------------------------------------------------


def _lower_inverse(L: list[list[Fraction]]) -> list[list[Fraction]]:
    """The inverse of a lower-triangular matrix, exactly (forward substitution)."""
    n = len(L)
    inv = [[F(0)] * n for _ in range(n)]
    for j in range(n):
        inv[j][j] = 1 / L[j][j]
        for i in range(j + 1, n):
            inv[i][j] = -sum((L[i][k] * inv[k][j] for k in range(j, i)), F(0)) / L[i][i]
    return inv


@dataclass(frozen=True)
class RosenbrockTableau:
    """A Rosenbrock method in Hairer and Wanner's transformed form (Solving ODEs II, IV.7, eq.
    7.4'), which needs no product with the Jacobian beyond the one matrix ``I - h gamma J``.

    With ``K_i`` the stage vectors (in units of ``f``) and ``J = df/dy``, ``f_t = df/dt`` at the
    step's start, each stage solves

        (I - h gamma J) K_i = gamma * (f(t + c_i h, y + h sum_j a[i][j] K_j)
                                       + sum_j C[i][j] K_j + h d_i f_t),

    and ``y1 = y + h sum_j m_j K_j``; the error estimate is ``h sum_j m_err_j K_j`` (``y1`` minus
    the embedded solution).  The dense output is Hairer's

        y(t + theta h) = (1 - theta) y0 + theta (y1 + (1 - theta)(D_1 + theta D_2 + ...)),
        D_r = h sum_j H[r][j] K_j.

    Attributes:
        name: registry name.
        order, error_order, dense_order: orders of the solution, the embedded solution, the
            interpolant.
        gamma: the diagonal coefficient.
        a, C: strictly lower-triangular rows (``a[i]`` and ``C[i]`` have ``i`` entries).
        c: nodes; checked against the row sums of Hairer's ``alpha = a Gamma``.
        d: time-derivative coefficients ``gamma_i``; checked against the row sums of ``Gamma``,
            where ``Gamma = (I / gamma - C)^-1`` is the method's full lower-triangular matrix.
        m, m_err: solution and error weights (``m_err = m - m_hat``).
        H: the dense output's rows ``H[r]`` over the stages.
        tol: tolerance of the checks (the published coefficients are 16-digit decimals).

    Raises:
        ValueError: the data fail a check (the lengths above, ``c`` or ``d`` against
            ``Gamma``); the message names the tableau and the check.

    Examples:
        >>> from neuralode.solvers import ROSENBROCK_TABLEAUS, Rosenbrock
        >>> tableau = ROSENBROCK_TABLEAUS["rodas4"]
        >>> tableau.order, tableau.error_order, tableau.dense_order, tableau.stages
        (4, 3, 3, 6)
        >>> Rosenbrock(tableau)  # the solver; method="rodas4" is this one
        Rosenbrock('rodas4')
    """

    name: str
    order: int
    error_order: int
    dense_order: int
    gamma: Coeff
    a: tuple[Row, ...]
    C: tuple[Row, ...]
    c: Row
    d: Row
    m: Row
    m_err: Row
    H: tuple[Row, ...]
    tol: float = 1e-14

    def __post_init__(self) -> None:
        s, name = len(self.m), self.name
        for label, rows in (("a", self.a), ("C", self.C)):
            if len(rows) != s or any(len(r) != i for i, r in enumerate(rows)):
                raise ValueError(f"tableau {name!r}: {label} must be strictly lower ({s} stages)")
        for label, v in (("c", self.c), ("d", self.d), ("m_err", self.m_err)):
            if len(v) != s:
                raise ValueError(f"tableau {name!r}: {label} must have {s} entries")
        if any(len(r) != s for r in self.H):
            raise ValueError(f"tableau {name!r}: each dense row H[r] must have {s} entries")
        G, alpha = self.Gamma, self.alpha
        for i in range(s):
            self._close(sum(alpha[i]), self.c[i], f"c[{i}] == row {i} of alpha = a Gamma")
            self._close(sum(G[i]), self.d[i], f"d[{i}] == row {i} of Gamma")

    def _close(self, x: Fraction | int, y: Fraction, what: str) -> None:
        _check_close(self.name, self.tol, x, y, what)

    @property
    def stages(self) -> int:
        return len(self.m)

    @property
    def Gamma(self) -> list[list[Fraction]]:
        """Hairer's ``Gamma = (I / gamma - C)^-1`` (lower triangular, ``gamma`` on the diagonal)."""
        s = self.stages
        L = [
            [(1 / self.gamma if i == j else -self.C[i][j]) if j <= i else F(0) for j in range(s)]
            for i in range(s)
        ]
        return _lower_inverse(L)

    @property
    def alpha(self) -> list[list[Fraction]]:
        """Hairer's ``alpha = a Gamma`` (strictly lower triangular)."""
        G, s = self.Gamma, self.stages
        return [
            [sum((self.a[i][k] * G[k][j] for k in range(j, i)), F(0)) for j in range(s)]
            for i in range(s)
        ]

    @property
    def b(self) -> list[Fraction]:
        """Hairer's weights ``b = m Gamma`` of the untransformed method."""
        G, s = self.Gamma, self.stages
        return [sum((self.m[k] * G[k][j] for k in range(j, s)), F(0)) for j in range(s)]

    @property
    def P(self) -> tuple[Row, ...]:
        """The dense output as :class:`DenseOutput` coefficients over the stages:
        ``B_j(theta) = theta m_j + (theta - theta^2)(H_1j + theta H_2j + theta^2 H_3j ...)``."""
        R = len(self.H)
        rows = []
        for j in range(self.stages):
            # Ascending powers theta^1..theta^(R+1).
            coeffs = [self.m[j]] + [F(0)] * R
            for r in range(R):
                coeffs[r] += self.H[r][j]
                coeffs[r + 1] -= self.H[r][j]
            rows.append(tuple(coeffs))
        return tuple(rows)


def _rows(*rows: tuple[str, ...]) -> tuple[Row, ...]:
    return tuple(_row(*r) for r in rows)


def _stiffly_accurate(last: tuple[str, ...], extra: int) -> tuple[tuple[Row, ...], Row]:
    """The ``a`` rows of a Rodas method's last ``extra`` stages and its weights ``m``: each of
    those stages is evaluated at ``t + h`` from the previous one's solution (``a`` row of the
    last regular stage, then ones), and ``y1`` adds the last stage as well."""
    base = _row(*last)
    rows = tuple(base + (F(1),) * k for k in range(1, extra + 1))
    return rows[:-1], base + (F(1),) * extra


# Rodas4 (Hairer and Wanner, Solving ODEs II, IV.7; the RODAS code's coefficients): order 4(3),
# stiffly accurate, L-stable, with a dense output of order 3.
_RODAS4_A5 = ("1.221224509226641", "6.019134481288629", "12.53708332932087", "-0.6878860361058950")
_RODAS4_LAST, _RODAS4_M = _stiffly_accurate(_RODAS4_A5, 2)
RODAS4 = RosenbrockTableau(
    name="rodas4",
    order=4,
    error_order=3,
    dense_order=3,
    gamma=F(1, 4),
    a=(
        (),
        _row("1.544"),
        _row("0.9466785280815826", "0.2557011698983284"),
        _row("3.314825187068521", "2.896124015972201", "0.9986419139977817"),
        _row(*_RODAS4_A5),
        *_RODAS4_LAST,
    ),
    C=_rows(
        (),
        ("-5.6688",),
        ("-2.430093356833875", "-0.2063599157091915"),
        ("-0.1073529058151375", "-9.594562251023355", "-20.47028614809616"),
        ("7.496443313967647", "-10.24680431464352", "-33.99990352819905", "11.70890893206160"),
        (
            "8.083246795921522",
            "-7.981132988064893",
            "-31.52159432874371",
            "16.31930543123136",
            "-6.058818238834054",
        ),
    ),
    c=_row(0, "0.386", "0.21", "0.63", 1, 1),
    d=_row("0.25", "-0.1043", "0.1035", "-0.0362", 0, 0),
    m=_RODAS4_M,
    m_err=_row(0, 0, 0, 0, 0, 1),
    H=_rows(
        (
            "10.12623508344586",
            "-7.487995877610167",
            "-34.80091861555747",
            "-7.992771707568823",
            "1.025137723295662",
            "0",
        ),
        (
            "-0.6762803392801253",
            "6.087714651680015",
            "16.43084320892478",
            "24.76722511418386",
            "-6.594389125716872",
            "0",
        ),
    ),
)

# Rodas5P (Steinebach 2023, "Construction of Rosenbrock-Wanner method Rodas5P and numerical
# benchmarks within the Julia Differential Equations package", BIT 63:27): order 5(4), stiffly
# accurate, with a dense output of order 4.
_RODAS5P_A6 = (
    "-7.502846399306121",
    "2.561846144803919",
    "-11.627539656261098",
    "-0.18268767659942256",
    "0.030198172008377946",
)
_RODAS5P_LAST, _RODAS5P_M = _stiffly_accurate(_RODAS5P_A6, 3)
RODAS5P = RosenbrockTableau(
    name="rodas5p",
    order=5,
    error_order=4,
    dense_order=4,
    gamma=_frac("0.21193756319429014"),
    a=(
        (),
        _row("3.0"),
        _row("2.849394379747939", "0.45842242204463923"),
        _row("-6.954028509809101", "2.489845061869568", "-10.358996098473584"),
        _row(
            "2.8029986275628964",
            "0.5072464736228206",
            "-0.3988312541770524",
            "-0.04721187230404641",
        ),
        _row(*_RODAS5P_A6),
        *_RODAS5P_LAST,
    ),
    C=_rows(
        (),
        ("-14.155112264123755",),
        ("-17.97296035885952", "-2.859693295451294"),
        ("147.12150275711716", "-1.41221402718213", "71.68940251302358"),
        ("165.43517024871676", "-0.4592823456491126", "42.90938336958603", "-5.961986721573306"),
        (
            "24.854864614690072",
            "-3.0009227002832186",
            "47.4931110020768",
            "5.5814197821558125",
            "-0.6610691825249471",
        ),
        (
            "30.91273214028599",
            "-3.1208243349937974",
            "77.79954646070892",
            "34.28646028294783",
            "-19.097331116725623",
            "-28.087943162872662",
        ),
        (
            "37.80277123390563",
            "-3.2571969029072276",
            "112.26918849496327",
            "66.9347231244047",
            "-40.06618937091002",
            "-54.66780262877968",
            "-9.48861652309627",
        ),
    ),
    c=_row(
        0,
        "0.6358126895828704",
        "0.4095798393397535",
        "0.9769306725060716",
        "0.4288403609558664",
        1,
        1,
        1,
    ),
    d=_row(
        "0.21193756319429014",
        "-0.42387512638858027",
        "-0.3384627126235924",
        "1.8046452872882734",
        "2.325825639765069",
        0,
        0,
        0,
    ),
    m=_RODAS5P_M,
    m_err=_row(0, 0, 0, 0, 0, 0, 0, 1),
    H=_rows(
        (
            "25.948786856663858",
            "-2.5579724845846235",
            "10.433815404888879",
            "-2.3679251022685204",
            "0.524948541321073",
            "1.1241088310450404",
            "0.4272876194431874",
            "-0.17202221070155493",
        ),
        (
            "-9.91568850695171",
            "-0.9689944594115154",
            "3.0438037242978453",
            "-24.495224566215796",
            "20.176138334709044",
            "15.98066361424651",
            "-6.789040303419874",
            "-6.710236069923372",
        ),
        (
            "11.419903575922262",
            "2.8879645146136994",
            "72.92137995996029",
            "80.12511834622643",
            "-52.072871366152654",
            "-59.78993625266729",
            "-0.15582684282751913",
            "4.883087185713722",
        ),
    ),
)

#: The Rosenbrock methods given by a :class:`RosenbrockTableau` (``rosenbrock23`` has a form of
#: its own: :class:`neuralode.solvers.rosenbrock.Rosenbrock23`).
ROSENBROCK_TABLEAUS: dict[str, RosenbrockTableau] = {t.name: t for t in (RODAS4, RODAS5P)}


@dataclass(frozen=True)
class EsdirkTableau:
    """A stiffly accurate ESDIRK method: singly diagonally implicit Runge-Kutta with an explicit
    first stage (Kvaerno, "Singly diagonally implicit Runge-Kutta methods with an explicit first
    stage", BIT 44, 2004).

    With ``k_0 = f(t, y)`` and, for ``i >= 1``, ``z_i`` the solution of

        z_i = y + h sum_{j<i} a[i][j] k_j + h gamma f(t + c_i h, z_i),   k_i = f(t + c_i h, z_i),

    the step is ``y1 = z_{s-1}`` (stiffly accurate: the last row of the full matrix is ``b``) and
    its error estimate ``h sum_j b_err_j k_j``.  Newton's iteration for ``z_i`` starts from
    ``y + h sum_j a[i][j] k_j + h gamma sum_j pred[i][j] k_j``: the stage's slope predicted from
    the earlier ones (each row of ``pred`` sums to 1).

    Attributes:
        name: registry name.
        order, error_order: orders of the solution and of the embedded solution.
        gamma: the diagonal coefficient (``a[i][i]`` for ``i >= 1``; the first stage is explicit).
        a: strictly lower rows (``a[i]`` has ``i`` entries; ``a[0]`` is empty).
        b: solution weights (checked: the last row of the full matrix, ``(*a[-1], gamma)``).
        b_err: ``b - b_hat``.
        c: nodes (checked: ``c[0] == 0``, ``c[i] == sum(a[i]) + gamma``, and ``c[-1] == 1``,
            which with the rows gives ``sum(b) == 1``, the consistency condition).
        pred: predictor rows, ``pred[i]`` over the ``i`` earlier stages (``pred[0]`` empty).
        tol: tolerance of the checks (Kvaerno's order-5 pair is published as 17-digit decimals).

    Raises:
        ValueError: the data fail a check (the lengths and the checks above, each ``pred[i]``
            summing to 1, ``sum(b_err) == 0``); the message names the tableau and the check.

    Examples:
        >>> from neuralode.solvers import ESDIRK_TABLEAUS
        >>> tableau = ESDIRK_TABLEAUS["kvaerno5"]
        >>> tableau.order, tableau.error_order, tableau.stages, float(tableau.gamma)
        (5, 4, 7, 0.26)
        >>> tableau.A[-1] == list(tableau.b)  # stiffly accurate
        True
    """

    name: str
    order: int
    error_order: int
    gamma: Coeff
    a: tuple[Row, ...]
    b: Row
    b_err: Row
    c: Row
    pred: tuple[Row, ...]
    tol: float = 1e-15

    def __post_init__(self) -> None:
        s, name = len(self.b), self.name
        for label, rows in (("a", self.a), ("pred", self.pred)):
            if len(rows) != s or any(len(r) != i for i, r in enumerate(rows)):
                raise ValueError(f"tableau {name!r}: {label} must be strictly lower ({s} stages)")
        for label, v in (("c", self.c), ("b_err", self.b_err)):
            if len(v) != s:
                raise ValueError(f"tableau {name!r}: {label} must have {s} entries")
        self._close(self.c[0], F(0), "c[0] == 0 (an explicit first stage)")
        for i in range(1, s):
            self._close(sum(self.a[i]) + self.gamma, self.c[i], f"c[{i}] == sum(a[{i}]) + gamma")
            self._close(sum(self.pred[i]), F(1), f"pred[{i}] sums to 1")
        last = (*self.a[-1], self.gamma)
        for j in range(s):
            self._close(self.b[j], last[j], f"b[{j}] == the last row's (stiffly accurate)")
        self._close(sum(self.b_err), F(0), "sum(b_err) == 0")
        # The step ends at the last stage, so that stage must sit at t + h: then sum(b) == 1.
        self._close(self.c[-1], F(1), "c[-1] == 1 (the last stage is the step's end)")

    def _close(self, x: Fraction | int, y: Fraction, what: str) -> None:
        _check_close(self.name, self.tol, x, y, what)

    @property
    def stages(self) -> int:
        return len(self.b)

    @property
    def A(self) -> list[list[Fraction]]:
        """The full lower-triangular matrix, diagonal included (``A[0][0] = 0``)."""
        s = self.stages
        return [
            [*self.a[i], *([self.gamma] if i else [F(0)]), *([F(0)] * (s - i - 1))]
            for i in range(s)
        ]


def _kvaerno3() -> EsdirkTableau:
    """Kvaerno's order 3(2) pair: 4 stages, L-stable, its coefficients functions of gamma, the
    root of ``6 g^3 - 18 g^2 + 9 g - 1`` near 0.4359 (30 digits here: its rational stand-in
    keeps every order condition, which hold for any gamma, exact)."""
    g = _frac("0.435866521508458999416019451194")
    a31 = (-4 * g * g + 6 * g - 1) / (4 * g)
    a32 = (1 - 2 * g) / (4 * g)
    last = (
        (6 * g - 1) / (12 * g),
        -1 / ((24 * g - 12) * g),
        (-6 * g * g + 6 * g - 1) / (6 * g - 3),
    )
    theta = 1 / (2 * g)
    return EsdirkTableau(
        name="kvaerno3",
        order=3,
        error_order=2,
        gamma=g,
        a=((), (g,), (a31, a32), last),
        b=(*last, g),
        b_err=(last[0] - a31, last[1] - a32, last[2] - g, g),
        c=(F(0), 2 * g, F(1), F(1)),
        # Stage 2 from stage 1's slope; stage 3 extrapolates the slope linearly in time through
        # stages 1 and 2; stage 4 (node 1 like stage 3) takes stage 3's weights.
        pred=((), (F(1),), (1 - theta, theta), (a31, a32, g)),
        tol=0.0,
    )


KVAERNO3 = _kvaerno3()

# Kvaerno's order 5(4) pair (7 stages, L-stable, stiffly accurate; gamma = 0.26).  The
# predictors of stages 3-6 are those of OrdinaryDiffEq.jl's Kvaerno5 (as diffrax uses them, with
# stage 2 starting from stage 1's slope); stage 7 (node 1 like stage 6) takes stage 6's weights.
_KV5_A6 = (
    "0.13855640231268224",
    "0",
    "-0.04245337201752043",
    "0.02446657898003141",
    "0.61943039072480676",
)
_KV5_A7 = (
    "0.13659751177640291",
    "0",
    "-0.05496908796538376",
    "-0.04118626728321046",
    "0.62993304899016403",
    "0.06962479448202728",
)
KVAERNO5 = EsdirkTableau(
    name="kvaerno5",
    order=5,
    error_order=4,
    gamma=_frac("0.26"),
    a=(
        (),
        _row("0.26"),
        _row("0.13", "0.84033320996790809"),
        _row("0.22371961478320505", "0.47675532319799699", "-0.06470895363112615"),
        _row(
            "0.16648564323248321",
            "0.10450018841591720",
            "0.03631482272098715",
            "-0.13090704451073998",
        ),
        _row(*_KV5_A6),
        _row(*_KV5_A7),
    ),
    b=_row(*_KV5_A7, "0.26"),
    b_err=_row(
        *(F(x) - F(y) for x, y in zip(_KV5_A7, _KV5_A6)), F(_KV5_A7[-1]) - F("0.26"), "0.26"
    ),
    c=_row(0, "0.52", "1.230333209967908", "0.8957659843500759", "0.43639360985864756", 1, 1),
    pred=(
        (),
        _row(1),
        _row("-1.366025403784441", "2.3660254037844357"),
        _row("-0.19650552613122207", "0.8113579546496623", "0.38514757148155954"),
        _row("0.10375304369958693", "0.937994698066431", "-0.04174774176601781", 0),
        _row("-0.17281112873898072", "0.6235784481025847", "0.5492326806363959", 0, 0),
        _row(*_KV5_A6, "0.26"),
    ),
    tol=1e-14,
)

#: The ESDIRK methods (chord Newton per stage, gradients by the implicit function theorem).
ESDIRK_TABLEAUS: dict[str, EsdirkTableau] = {t.name: t for t in (KVAERNO3, KVAERNO5)}


@dataclass(frozen=True)
class ImplicitTableau:
    """A fixed-step implicit Runge-Kutta method, fully or diagonally implicit (torchdiffeq's
    ``implicit_euler``, ``implicit_midpoint``, ``trapezoid``, ``radauIIA3``, ``radauIIA5``,
    ``gl4``, ``gl6``, ``sdirk2``, ``trbdf2``).

    With ``z_i = y + h sum_j A[i][j] f(t + c_j h, z_j)`` for every stage at once, the step is
    ``y1 = y + h sum_j b_j f(t + c_j h, z_j)``.  A first stage whose row of ``A`` is zero is
    explicit (``z_0 = y``); the other stages' block of ``A`` must be invertible.

    Attributes:
        name: registry name.
        order: classical order of the step (checked: the quadrature conditions
            ``sum_j b_j c_j^(k-1) = 1/k`` for ``k <= order``).
        c: nodes (checked: ``c[i] == sum(A[i])``).
        A: the full ``s x s`` matrix.
        b: weights (checked: they sum to 1).
        tol: tolerance of the checks (coefficients with square roots are stored to 40 digits).

    Raises:
        ValueError: the data fail a check (``A`` not ``s x s``, ``c`` of another length, or a
            check above); the message names the tableau and the check.

    Examples:
        The implicit midpoint rule, written out and run by :class:`~neuralode.solvers.ImplicitRK`
        (``method="implicit_midpoint"`` is the same method):

        >>> from fractions import Fraction as F
        >>> import torch, neuralode
        >>> from neuralode.solvers import ImplicitRK, ImplicitTableau
        >>> midpoint = ImplicitTableau("my_midpoint", 2, c=(F(1, 2),), A=((F(1, 2),),), b=(F(1),))
        >>> t = torch.linspace(0, 1, 11, dtype=torch.float64)
        >>> ys = neuralode.odeint(lambda t, y: -y, torch.ones(1, dtype=torch.float64), t,
        ...                       method=ImplicitRK(midpoint))
        >>> round(float(ys[-1, 0]), 4)  # (0.95 / 1.05) ** 10; exp(-1) = 0.3679
        0.3676
    """

    name: str
    order: int
    c: Row
    A: tuple[Row, ...]
    b: Row
    tol: float = 0.0

    def __post_init__(self) -> None:
        s = len(self.b)
        if len(self.c) != s or len(self.A) != s or any(len(r) != s for r in self.A):
            raise ValueError(f"tableau {self.name!r}: A must be {s} x {s} and c have {s} entries")
        for i in range(s):
            self._close(sum(self.A[i]), self.c[i], f"c[{i}] == sum(A[{i}])")
        for k in range(1, self.order + 1):
            quad = sum(bj * cj ** (k - 1) for bj, cj in zip(self.b, self.c))
            self._close(quad, F(1, k), f"sum_j b_j c_j^{k - 1} == 1/{k} (order {self.order})")

    def _close(self, x: Fraction | int, y: Fraction, what: str) -> None:
        _check_close(self.name, self.tol, x, y, what)

    @property
    def stages(self) -> int:
        return len(self.b)

    @property
    def explicit_first(self) -> bool:
        """Whether the first stage is explicit (its row of ``A`` is zero: ``z_0 = y``)."""
        return all(x == 0 for x in self.A[0])


def _surd(n: int) -> Fraction:
    """``sqrt(n)`` to 40 significant digits (the Gauss and Radau nodes' square roots)."""
    import decimal

    with decimal.localcontext() as ctx:
        ctx.prec = 40
        return Fraction(decimal.Decimal(n).sqrt())


def _implicit_tableaus() -> tuple[ImplicitTableau, ...]:
    r2, r3, r6, r15 = _surd(2), _surd(3), _surd(6), _surd(15)
    tol = 1e-30
    half = F(1, 2)
    # Alexander's two-stage SDIRK (L-stable, order 2) and Bank et al.'s TR-BDF2 (a trapezoidal
    # stage to 2 gamma, then BDF2), as torchdiffeq's repository head gives them.
    g = 1 - r2 / 2
    w = r2 / 4
    d = 1 - r2 / 2  # TR-BDF2's diagonal: gamma / 2 with gamma = 2 - sqrt 2
    return (
        ImplicitTableau("implicit_euler", 1, (F(1),), ((F(1),),), (F(1),)),
        ImplicitTableau("implicit_midpoint", 2, (half,), ((half,),), (F(1),)),
        ImplicitTableau("trapezoid", 2, (F(0), F(1)), ((F(0), F(0)), (half, half)), (half, half)),
        ImplicitTableau(
            "radauIIA3",
            3,
            (F(1, 3), F(1)),
            ((F(5, 12), F(-1, 12)), (F(3, 4), F(1, 4))),
            (F(3, 4), F(1, 4)),
        ),
        ImplicitTableau(
            "radauIIA5",
            5,
            ((4 - r6) / 10, (4 + r6) / 10, F(1)),
            (
                ((88 - 7 * r6) / 360, (296 - 169 * r6) / 1800, (-2 + 3 * r6) / 225),
                ((296 + 169 * r6) / 1800, (88 + 7 * r6) / 360, (-2 - 3 * r6) / 225),
                ((16 - r6) / 36, (16 + r6) / 36, F(1, 9)),
            ),
            ((16 - r6) / 36, (16 + r6) / 36, F(1, 9)),
            tol,
        ),
        ImplicitTableau(
            "gl4",
            4,
            (half - r3 / 6, half + r3 / 6),
            ((F(1, 4), F(1, 4) - r3 / 6), (F(1, 4) + r3 / 6, F(1, 4))),
            (half, half),
            tol,
        ),
        ImplicitTableau(
            "gl6",
            6,
            (half - r15 / 10, half, half + r15 / 10),
            (
                (F(5, 36), F(2, 9) - r15 / 15, F(5, 36) - r15 / 30),
                (F(5, 36) + r15 / 24, F(2, 9), F(5, 36) - r15 / 24),
                (F(5, 36) + r15 / 30, F(2, 9) + r15 / 15, F(5, 36)),
            ),
            (F(5, 18), F(4, 9), F(5, 18)),
            tol,
        ),
        ImplicitTableau("sdirk2", 2, (g, F(1)), ((g, F(0)), (1 - g, g)), (1 - g, g), tol),
        ImplicitTableau(
            "trbdf2",
            2,
            (F(0), 2 * d, F(1)),
            ((F(0), F(0), F(0)), (d, d, F(0)), (w, w, d)),
            (w, w, d),
            tol,
        ),
    )


#: The fixed-step implicit Runge-Kutta methods (all stages by one Newton iteration).
IMPLICIT_TABLEAUS: dict[str, ImplicitTableau] = {t.name: t for t in _implicit_tableaus()}
