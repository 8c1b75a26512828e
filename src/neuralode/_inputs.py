"""Validation and normalisation of a solve's inputs, done once at the entry.

After this, the loop sees one case: a single floating-point state tensor, a detached increasing time
grid in the time dtype, and a vector field that takes and returns that tensor.  Tuple states are
flattened, decreasing time is mirrored (``s = -t``, ``g(s, y) = -f(-s, y)``, per sample), and every
bad input raises a ``TypeError``/``ValueError`` that names the argument and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

import torch

from ._rows import per_row

Func = Callable[[torch.Tensor, Any], Any]


#: torchdiffeq's callbacks: attributes of ``func`` called with ``(t0, y0, dt)`` around steps.
CALLBACK_NAMES = ("callback_step", "callback_accept_step", "callback_reject_step")


class Callbacks(NamedTuple):
    """A solve's step callbacks in the loop's terms (internal time and flat state), each
    ``(t0, y0, dt) -> None`` or ``None``: before every attempted step, after an accepted one,
    after a rejected one (torchdiffeq's ``callback_step``, ``callback_accept_step``,
    ``callback_reject_step``)."""

    step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any] | None = None
    accept: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any] | None = None
    reject: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any] | None = None

    @property
    def any(self) -> bool:
        return any(cb is not None for cb in self)


@dataclass
class Problem:
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # internal time, flat state
    y0: torch.Tensor  # internal state (tuple states flattened)
    f0: torch.Tensor  # func at (t0, y0) in internal terms, already checked
    times: torch.Tensor  # internal (mirrored) output times, differentiable, [T] or [B, T]
    sign: torch.Tensor | float  # +1/-1 per sample (float when shared)
    batched: bool
    rtol: float | torch.Tensor
    atol: float | torch.Tensor
    unflatten: Callable[[torch.Tensor], Any]  # internal outputs -> user layout (tuples)
    jac: Callable[[torch.Tensor, torch.Tensor], Any] | None = None  # df/dy in internal terms
    callbacks: Callbacks = Callbacks()  # func's step callbacks, in internal terms


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element of ``x`` is finite (one host sync).

    The sum is finite whenever every element is, except when it overflows; only a non-finite
    sum pays for the exact elementwise check.  One reduction is cheaper than ``isfinite(x)``
    followed by ``all()`` (a temporary of the state's size), and a solve checks its state, its
    first evaluation and its outputs (docs/performance.md has the timing)."""
    x = x.detach()
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def _is_tensor_tuple(y0: object) -> bool:
    return isinstance(y0, (tuple, list))


def check_state(y0: Any, *, values: bool = True) -> tuple[torch.Tensor, ...]:
    """``y0`` as a tuple of floating tensors on one device with one dtype (and finite, unless
    ``values=False``: then the caller checks the values, as :func:`normalise` does in its one
    host synchronisation)."""
    parts = tuple(y0) if _is_tensor_tuple(y0) else (y0,)
    if not parts:
        raise ValueError("y0 must be a tensor or a non-empty tuple of tensors, got an empty tuple")
    for i, p in enumerate(parts):
        name = f"y0[{i}]" if _is_tensor_tuple(y0) else "y0"
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(p).__name__}")
        if not p.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point tensor, got dtype {p.dtype}; "
                f"convert it with .float() or .double()"
            )
        if p.dtype != parts[0].dtype or p.device != parts[0].device:
            raise TypeError(
                f"all tensors of y0 must share one dtype and device; y0[0] is {parts[0].dtype} on "
                f"{parts[0].device}, {name} is {p.dtype} on {p.device}"
            )
        if p.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(p.shape)}); the state needs elements")
        if values and not all_finite(p):
            _nonfinite_state(name)
    return parts


def _nonfinite_state(name: str) -> NoReturn:
    raise ValueError(f"{name} contains NaN or Inf; the initial state must be finite")


def check_times(
    t: object,
    *,
    allow_2d: bool,
    t_dtype: torch.dtype | None,
    device: torch.device,
    values: bool = True,
) -> torch.Tensor:
    """``t`` as a floating tensor on ``device``, checked for shape, finiteness and monotonicity
    (the last two unless ``values=False``: then the caller checks them, as :func:`normalise`
    does in its one host synchronisation)."""
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"t must be a 1-D tensor of times, got {type(t).__name__}") from err
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"t must be a real tensor of times, got dtype {t.dtype}")
    want = "1-D [T] or 2-D [batch, T]" if allow_2d else "1-D [T]"
    if t.ndim not in ((1, 2) if allow_2d else (1,)):
        raise ValueError(f"t must be {want}, got shape {tuple(t.shape)}")
    if t.shape[-1] == 0:
        raise ValueError("t must hold at least one time, got none")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t_dtype is not None:
        if not isinstance(t_dtype, torch.dtype) or not t_dtype.is_floating_point:
            raise TypeError(f"options['dtype'] (the time dtype) must be floating, got {t_dtype}")
        t = t.to(t_dtype)
    elif t.dtype in (torch.float16, torch.bfloat16, torch.float32):
        t = t.to(torch.float64)  # time stays float64 where the state is lower precision
    t = t.to(device)
    if values:
        tt = t.detach()
        if not all_finite(tt):
            _nonfinite_times()
        if t.shape[-1] > 1 and not bool(_monotonic(tt).all()):
            _not_monotonic(tt)
    return t


def _monotonic(tt: torch.Tensor) -> torch.Tensor:
    """Per row: whether the times are strictly increasing or strictly decreasing."""
    d = tt.diff(dim=-1)
    return (d > 0).all(dim=-1) | (d < 0).all(dim=-1)


def _nonfinite_times() -> NoReturn:
    raise ValueError("t contains NaN or Inf; output times must be finite")


def _not_monotonic(tt: torch.Tensor) -> NoReturn:
    where = "" if tt.ndim == 1 else f" (row {int((~_monotonic(tt)).nonzero()[0, 0])})"
    raise ValueError(
        f"t must be strictly increasing or strictly decreasing{where}; "
        f"found repeated or out-of-order times"
    )


def _check_values(
    parts: Sequence[torch.Tensor], is_tuple: bool, t: torch.Tensor, f0: torch.Tensor, t0: Any
) -> bool:
    """The value checks of a solve's inputs in one host synchronisation (a GPU's queue is
    drained once, not once per check): ``y0`` and ``t`` finite, ``t`` monotonic in each row,
    ``func(t0, y0)`` finite; the errors are raised in that order, each as its own check would.

    Returns:
        Whether any row's times decrease (those rows are then mirrored)."""
    tt = t.detach()
    # One sum of everything: a NaN or Inf anywhere makes it non-finite (so does an overflow,
    # which the elementwise checks below then clear); few operations, as each costs its
    # dispatch (microseconds) on every solve.
    total = tt.sum() + f0.detach().sum()
    for p in parts:
        total = total + p.detach().sum()
    flags = [torch.isfinite(total)]
    several = t.shape[-1] > 1
    if several:
        flags.append(_monotonic(tt).all())
        flags.append((tt[..., 1] < tt[..., 0]).any())
    ok = torch.stack(flags).tolist()
    if not ok[0]:  # which one, in order: y0, t, t's order, func's value
        for i, p in enumerate(parts):
            if not bool(torch.isfinite(p).all()):
                _nonfinite_state(f"y0[{i}]" if is_tuple else "y0")
        if not bool(torch.isfinite(tt).all()):
            _nonfinite_times()
    if several and not ok[1]:
        _not_monotonic(tt)
    if not ok[0] and not bool(torch.isfinite(f0).all()):
        raise ValueError(
            f"func returned NaN or Inf at the initial time t={_fmt_time(t0)} and y0; "
            f"the vector field must be finite at the initial state"
        )
    return several and bool(ok[2])


def check_tolerance(
    name: str, tol: Any, parts: Sequence[torch.Tensor], batched: bool, positive: bool
) -> float | torch.Tensor:
    """A scalar tolerance, or a per-component tensor that broadcasts against the internal state."""
    need = "positive" if positive else "non-negative"
    if isinstance(tol, (int, float)) and not isinstance(tol, bool):
        val = float(tol)
        if not math.isfinite(val) or val < 0 or (positive and val == 0):
            raise ValueError(f"{name} must be a finite {need} number, got {tol!r}")
        return val
    items = tuple(tol) if _is_tensor_tuple(tol) else (tol,)
    if len(items) != len(parts) or (len(parts) > 1 and not _is_tensor_tuple(tol)):
        raise ValueError(f"{name} must be a number or one tensor per tensor of y0 ({len(parts)})")
    flat = []
    for item, p in zip(items, parts):
        if isinstance(item, bool) or (
            isinstance(item, torch.Tensor) and (item.dtype == torch.bool or item.is_complex())
        ):
            raise TypeError(f"{name} must be a real number or tensor, got {item!r}")
        try:
            v = torch.as_tensor(item, dtype=p.dtype, device=p.device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"{name} must be a number or a tensor, got {type(item).__name__}"
            ) from err
        if not all_finite(v) or bool((v < 0).any()) or (positive and bool((v == 0).any())):
            raise ValueError(f"{name} must be finite and {need} in every component")
        try:
            # torch.broadcast_shapes has no annotations (torch 2.13).
            ok = torch.broadcast_shapes(v.shape, p.shape) == p.shape  # type: ignore[no-untyped-call]
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} of shape {tuple(v.shape)} does not broadcast to the state shape "
                f"{tuple(p.shape)}"
            )
        flat.append(v)
    if len(parts) == 1:
        return flat[0]
    lead = (parts[0].shape[0],) if batched else ()
    return torch.cat([v.expand(p.shape).reshape(lead + (-1,)) for v, p in zip(flat, parts)], dim=-1)


def _check_resolution(
    rtol: float | torch.Tensor, atol: float | torch.Tensor, dtype: torch.dtype
) -> None:
    """A relative tolerance below the state dtype's resolution, with no absolute tolerance,
    asks for an error no step can reach: refuse it here rather than let the step size shrink
    until it underflows."""
    eps = torch.finfo(dtype).eps
    rtol_max = rtol if isinstance(rtol, float) else float(rtol.max())
    atol_max = atol if isinstance(atol, float) else float(atol.max())
    if rtol_max < eps and atol_max == 0:
        raise ValueError(
            f"rtol={rtol_max:.3g} is below the resolution of {dtype} (eps {eps:.3g}) and atol "
            f"is 0: no step can meet it; use rtol >= {eps:.3g} (10 eps or more is practical) "
            f"or a positive atol"
        )


def _check_f_output(out: Any, parts: Sequence[torch.Tensor], is_tuple: bool) -> None:
    outs = tuple(out) if is_tuple and _is_tensor_tuple(out) else (out,)
    if is_tuple and len(outs) != len(parts):
        raise ValueError(
            f"func must return a tuple of {len(parts)} tensors matching y0, got "
            f"{type(out).__name__}"
            f" of length {len(outs) if _is_tensor_tuple(out) else 1}"
        )
    for i, (o, p) in enumerate(zip(outs, parts)):
        name = f"func(t, y)[{i}]" if is_tuple else "func(t, y)"
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"{name} must return a tensor, got {type(o).__name__}")
        if o.shape != p.shape:
            raise ValueError(
                f"{name} returned shape {tuple(o.shape)} but the state has shape {tuple(p.shape)}; "
                f"the vector field must return dy/dt with the shape of y"
            )


def normalise(
    func: Func,
    y0: Any,
    t: Any,
    *,
    rtol: Any,
    atol: Any,
    batched: bool | None,
    t_dtype: torch.dtype | None,
    jac: Callable[..., Any] | None = None,
    perturb: bool = False,
) -> Problem:
    """Check every input once and build the :class:`Problem` the loop solves (``jac``, the
    user's ``df/dy``, is carried to the stiff solvers in the loop's terms; ``perturb``: the
    check of ``func`` evaluates it one ulp inside the first interval, as every evaluation of a
    perturbed solve is)."""
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}")
    if jac is not None and not callable(jac):
        raise TypeError(f"jac must be callable as jac(t, y), got {type(jac).__name__}")
    # The values (finite, monotonic) are checked below, with func's first evaluation.
    parts = check_state(y0, values=False)
    is_tuple = _is_tensor_tuple(y0)
    device, dtype = parts[0].device, parts[0].dtype
    t = check_times(t, allow_2d=True, t_dtype=t_dtype, device=device, values=False)
    if batched is None:
        batched = t.ndim == 2
    if t.ndim == 2 and not batched:
        raise ValueError("t of shape [batch, T] (per-sample grids) needs batched=True")
    if batched:
        for i, p in enumerate(parts):
            name = f"y0[{i}]" if is_tuple else "y0"
            if p.ndim == 0:
                raise ValueError(
                    f"a batched solve needs {name} of shape [batch, ...], got a scalar"
                )
            if p.shape[0] != parts[0].shape[0]:
                raise ValueError(
                    f"{name} has batch size {p.shape[0]}, y0[0] has {parts[0].shape[0]}"
                )
        if t.ndim == 2 and t.shape[0] != parts[0].shape[0]:
            raise ValueError(
                f"t has {t.shape[0]} rows (per-sample grids) but y0 has batch size "
                f"{parts[0].shape[0]}; they must match"
            )

    # Flatten tuple states into one tensor (per sample when batched).
    if is_tuple:
        shapes = [p.shape[1:] if batched else p.shape for p in parts]
        sizes = [math.prod(sh) for sh in shapes]

        def unpack(y: torch.Tensor) -> tuple[torch.Tensor, ...]:
            lead = y.shape[:-1]
            return tuple(c.view(lead + sh) for c, sh in zip(torch.split(y, sizes, dim=-1), shapes))

        def pack(out: Sequence[torch.Tensor], lead: tuple[int, ...]) -> torch.Tensor:
            return torch.cat([o.reshape(lead + (-1,)) for o in out], dim=-1)

        lead0 = (parts[0].shape[0],) if batched else ()
        y_flat = pack(parts, lead0)

        def g(tt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return pack(func(tt, unpack(y)), y.shape[:-1])

        def unflatten(ys: torch.Tensor) -> Any:
            return unpack(ys)

        def jac_g(tt: torch.Tensor, y: torch.Tensor) -> Any:
            assert jac is not None
            out = jac(tt, unpack(y))
            if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], tuple):
                return out[0], pack(out[1], y.shape[:-1])  # df/dt given per part
            return out
    else:
        y_flat = parts[0]
        g = func  # type: ignore[assignment]
        jac_g = jac  # type: ignore[assignment]

        def pack(out: Sequence[torch.Tensor], lead: tuple[int, ...]) -> torch.Tensor:
            return out  # type: ignore[return-value]

        def unflatten(ys: torch.Tensor) -> Any:
            return ys

    # The first evaluation, in the user's own terms, checks what func returns.
    t0_user = t.detach()[..., 0].to(dtype)
    if perturb and t.shape[-1] > 1:
        t0_user = torch.nextafter(t0_user, t.detach()[..., 1].to(dtype))
    out0 = func(t0_user, y0 if not is_tuple else tuple(parts))
    _check_f_output(out0, parts, is_tuple)
    f0 = pack(out0, (parts[0].shape[0],) if batched else ())
    decreasing = _check_values(parts, is_tuple, t, f0, t0_user)
    rtol_v = check_tolerance("rtol", rtol, parts, batched, positive=True)
    atol_v = check_tolerance("atol", atol, parts, batched, positive=False)
    _check_resolution(rtol_v, atol_v, dtype)

    # Mirror decreasing rows into increasing ones: s = sign * t, g(s, y) = sign * f(sign * s, y).
    sign: torch.Tensor | float = 1.0
    s = t
    if decreasing:
        tt = t.detach()
        dec = tt[..., 1] < tt[..., 0]
        base, base_jac = g, jac_g
        # g(s, y) = sign f(sign s, y): dg/dy = sign df/dy, dg/ds = sign^2 df/dt = df/dt.
        if t.ndim == 1:
            sign = -1.0
            s = -t

            def g(tt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return -base(-tt, y)

            def jac_g(tt: torch.Tensor, y: torch.Tensor) -> Any:
                out = base_jac(-tt, y)
                return (-out[0], out[1]) if isinstance(out, tuple) else -out
        else:
            sign_t = torch.where(dec, -1.0, 1.0).to(t.dtype)
            sign = sign_t
            s = t * sign_t.unsqueeze(-1)
            sign_f = sign_t.to(dtype)
            sign_y = per_row(sign_f, y_flat.ndim)

            def g(tt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return base(tt * sign_f, y) * sign_y

            def jac_g(tt: torch.Tensor, y: torch.Tensor) -> Any:
                out = base_jac(tt * sign_f, y)
                sign_j = sign_f.view(-1, 1, 1)
                return (out[0] * sign_j, out[1]) if isinstance(out, tuple) else out * sign_j

        f0 = f0 * (sign if isinstance(sign, float) else sign_y)

    if batched and s.ndim == 1:  # one grid shared by every row: give each row its copy
        s = s.unsqueeze(0).expand(y_flat.shape[0], -1)

    # torchdiffeq's callbacks on func, called with the user's time and state layout.
    def user_callback(cb: Callable[..., Any]) -> Callable[..., Any]:
        def call(t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> Any:
            return cb(t0 * sign, unflatten(y0), dt)

        return call

    found = [getattr(func, name, None) for name in CALLBACK_NAMES]
    callbacks = Callbacks(*(None if cb is None else user_callback(cb) for cb in found))
    if callbacks.any and batched:
        raise ValueError(
            "func's step callbacks (callback_step, callback_accept_step, callback_reject_step) "
            "are called by unbatched solves only, as torchdiffeq's; this solve is batched"
        )
    return Problem(
        g,
        y_flat,
        f0,
        s,
        sign,
        batched,
        rtol_v,
        atol_v,
        unflatten,
        jac_g if jac else None,
        callbacks,
    )


def _fmt_time(t: torch.Tensor) -> str:
    v = t.reshape(-1)
    return f"{float(v[0]):.6g}" if v.numel() == 1 else f"{[round(float(x), 6) for x in v[:4]]}..."


def check_solver_options(
    solver: Any,
    *,
    step_size: Any,
    first_step: Any,
    max_num_steps: Any,
    safety: Any,
    beta: Any,
    ifactor: Any,
    dfactor: Any,
    min_step: Any = 0.0,
    max_step: Any = math.inf,
    prefix: str = "",
) -> None:
    """Check the stepping options against the method (``solver`` has ``adaptive`` and ``name``).

    ``prefix`` names the dict the options came from in messages (``adjoint_options``)."""

    def name(key: str) -> str:
        return f"{prefix}[{key!r}]" if prefix else key

    # step_size belongs to fixed-step methods, first_step to adaptive ones; each is a positive
    # finite number of time units.
    for key, value, wants_adaptive, other in (
        ("step_size", step_size, False, "first_step, or a fixed-step method such as 'rk4'"),
        ("first_step", first_step, True, "step_size"),
    ):
        if value is None:
            continue
        if solver.adaptive != wants_adaptive:
            kind = "adaptive" if solver.adaptive else "fixed-step"
            raise ValueError(
                f"{name(key)} applies to {'adaptive' if wants_adaptive else 'fixed-step'} methods; "
                f"{solver.name!r} is {kind} (use {other})"
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 < value < math.inf
        ):
            raise ValueError(f"{name(key)} must be a positive finite number, got {value!r}")
    for key, value in (
        ("safety", safety),
        ("beta", beta),
        ("ifactor", ifactor),
        ("dfactor", dfactor),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name(key)} must be a number, got {value!r}")
    if isinstance(max_num_steps, bool) or not isinstance(max_num_steps, int) or max_num_steps < 1:
        raise ValueError(
            f"{name('max_num_steps')} must be a positive integer, got {max_num_steps!r}"
        )
    if not 0 < safety <= 1:
        raise ValueError(f"{name('safety')} must be in (0, 1], got {safety!r}")
    if not 0 <= beta <= 0.2:
        raise ValueError(f"{name('beta')} (PI coefficient) must be in [0, 0.2], got {beta!r}")
    if not 1 <= ifactor < math.inf:
        raise ValueError(f"{name('ifactor')} must be a finite number >= 1, got {ifactor!r}")
    if not 0 < dfactor <= 1:
        raise ValueError(f"{name('dfactor')} must be in (0, 1], got {dfactor!r}")
    for key, value in (("min_step", min_step), ("max_step", max_step)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise TypeError(f"{name(key)} must be a number of time units, got {value!r}")
    if not 0 <= min_step < math.inf:
        raise ValueError(f"{name('min_step')} must be finite and >= 0, got {min_step!r}")
    if not (max_step > 0 and max_step >= min_step):
        raise ValueError(
            f"{name('max_step')} must be > 0 and >= min_step ({min_step!r}), got {max_step!r}"
        )
    if (min_step > 0 or max_step < math.inf) and not solver.adaptive:
        raise ValueError(
            f"{name('min_step')}/{name('max_step')} apply to adaptive methods; "
            f"{solver.name!r} is fixed-step (use step_size)"
        )
    if first_step is not None and not min_step <= first_step <= max_step:
        raise ValueError(
            f"{name('first_step')} ({first_step!r}) must lie in [min_step, max_step] = "
            f"[{min_step!r}, {max_step!r}]"
        )
