"""2-D toy densities for flow experiments, after FFJORD's ``lib/toy_data.py``
(Grathwohl et al. 2019, https://github.com/rtqichen/ffjord, function ``inf_train_gen``).

Every generator is ``gen(n, rng) -> np.ndarray`` of shape ``[n, 2]`` and dtype ``float32``,
drawing only from the given ``numpy.random.Generator`` (FFJORD's code mixes the global
``np.random`` state in for some of them; here a seed fixes every draw).  Departures from the
reference recipes, all so that ``n`` points come back for any ``n`` and a seed fixes them:

* ``pinwheel``: the 5 arms get ``n`` points round-robin (FFJORD: ``5 * (n // 5)`` points);
* ``2spirals``: ``ceil(n / 2)`` points per arm, trimmed to ``n`` and shuffled (FFJORD returns
  the two arms in order);
* the sklearn recipes get an integer seed drawn from ``rng``.

Closed-form densities (:func:`true_log_density`) exist for ``8gaussians`` (exact),
``checkerboard`` (exact: uniform on 8 squares), and ``rings`` and ``circles`` (the limit of
many points: these recipes space the angles evenly on each circle, so a finite draw is a
stratified sample of the density with uniform angles; the ring weights are exact when ``n`` is
divisible by 4, respectively 2).  The others (``2spirals``, ``pinwheel``, ``swissroll``,
``moons``) have none here.

For reverse-KL fitting (Chen et al. 2018, Figure 4; Rezende & Mohamed 2015, Figure 3) the
unnormalised potentials ``U1``-``U4`` of Rezende & Mohamed 2015 (Table 1) are in
:data:`POTENTIALS`, and :func:`unnormalised_log_density` evaluates them (and the closed-form
densities) on torch tensors, differentiably.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "DENSITIES",
    "POTENTIALS",
    "sample",
    "true_log_density",
    "unnormalised_log_density",
    "eight_gaussians",
    "checkerboard",
    "two_spirals",
    "pinwheel",
    "rings",
    "swissroll",
    "moons",
    "circles",
]

Generator = Callable[[int, np.random.Generator], np.ndarray]
_T = TypeVar("_T")


def _sklearn_datasets() -> Any:
    try:
        import sklearn.datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'swissroll', 'moons' and 'circles' datasets need scikit-learn: "
            "pip install scikit-learn"
        ) from err
    return sklearn.datasets


def _seed(rng: np.random.Generator) -> int:
    """An integer seed for sklearn (which takes ``int`` or ``RandomState``), drawn from rng."""
    return int(rng.integers(2**31 - 1))


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


#: The 8 unit directions of ``8gaussians``: the axes, then the diagonals.
_DIRS_8 = np.array(
    [(1, 0), (-1, 0), (0, 1), (0, -1)]
    + [(sx / math.sqrt(2), sy / math.sqrt(2)) for sx, sy in ((1, 1), (1, -1), (-1, 1), (-1, -1))]
)
_SCALE_8, _NOISE_8, _SHRINK_8 = 4.0, 0.5, 1.414


def eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    """``8gaussians`` (FFJORD ``inf_train_gen``): ``(4 c_k + 0.5 N(0, I)) / 1.414`` with
    ``c_k`` one of 8 unit directions (axes and diagonals) chosen uniformly.

    Args:
        n: number of points (not checked here; :func:`sample` checks it).
        rng: the only source of randomness, advanced in place.

    Returns:
        ``float32`` ``[n, 2]``.

    Examples:
        >>> import numpy as np
        >>> from neuralode.data.toy2d import eight_gaussians
        >>> x = eight_gaussians(1000, np.random.default_rng(0))
        >>> x.shape, x.dtype
        ((1000, 2), dtype('float32'))
    """
    idx = rng.integers(0, 8, size=n)
    pts = _DIRS_8[idx] * _SCALE_8 + rng.standard_normal((n, 2)) * _NOISE_8
    return _f32(pts / _SHRINK_8)


def checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    """``checkerboard`` (FFJORD ``inf_train_gen``): uniform on the 8 dark squares (side 2) of a
    4x4 board over ``[-4, 4)^2``.

    Args:
        n: number of points (not checked here; :func:`sample` checks it).
        rng: the only source of randomness, advanced in place.

    Returns:
        ``float32`` ``[n, 2]``.

    Examples:
        >>> import numpy as np
        >>> from neuralode.data.toy2d import checkerboard
        >>> x = checkerboard(1000, np.random.default_rng(0))
        >>> x.shape, x.dtype, bool((np.abs(x) <= 4).all())
        ((1000, 2), dtype('float32'), True)
    """
    x1 = rng.random(n) * 4 - 2
    x2 = rng.random(n) - rng.integers(0, 2, size=n) * 2 + np.floor(x1) % 2
    return _f32(np.stack([x1, x2], 1) * 2)


def two_spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    """``2spirals`` (FFJORD ``inf_train_gen``): two opposite arms of 1.5 turns,
    ``r = theta``, with ``U(0, 0.5)`` jitter, scaled by 1/3, plus ``0.1 N(0, I)``.

    Args:
        n: number of points (not checked here; :func:`sample` checks it).
        rng: the only source of randomness, advanced in place.

    Returns:
        ``float32`` ``[n, 2]``.

    Examples:
        >>> import numpy as np
        >>> from neuralode.data.toy2d import two_spirals
        >>> x = two_spirals(1000, np.random.default_rng(0))
        >>> x.shape, x.dtype
        ((1000, 2), dtype('float32'))
    """
    m = (n + 1) // 2
    theta = np.sqrt(rng.random((m, 1))) * 540 * (2 * np.pi) / 360
    d1x = -np.cos(theta) * theta + rng.random((m, 1)) * 0.5
    d1y = np.sin(theta) * theta + rng.random((m, 1)) * 0.5
    x = np.vstack((np.hstack((d1x, d1y)), np.hstack((-d1x, -d1y)))) / 3
    x = x + rng.standard_normal(x.shape) * 0.1
    return _f32(x[rng.permutation(2 * m)[:n]])


def pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    """``pinwheel`` (FFJORD ``inf_train_gen``, after Johnson et al. 2016): 5 arms; radial
    ``N(1, 0.3^2)``, tangential ``N(0, 0.1^2)``, each point rotated by
    ``2 pi k / 5 + 0.25 exp(radial)``, scaled by 2.

    Args:
        n: number of points (not checked here; :func:`sample` checks it).
        rng: the only source of randomness, advanced in place.

    Returns:
        ``float32`` ``[n, 2]``.

    Examples:
        >>> import numpy as np
        >>> from neuralode.data.toy2d import pinwheel
        >>> x = pinwheel(1000, np.random.default_rng(0))
        >>> x.shape, x.dtype
        ((1000, 2), dtype('float32'))
    """
    radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
    rads = np.linspace(0, 2 * np.pi, num_classes, endpoint=False)
    feats = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std])
    feats[:, 0] += 1.0
    labels = np.arange(n) % num_classes
    angles = rads[labels] + rate * np.exp(feats[:, 0])
    c, s = np.cos(angles), np.sin(angles)
    rot = np.stack([c, -s, s, c], 1).reshape(-1, 2, 2)
    return _f32(2 * rng.permutation(np.einsum("ti,tij->tj", feats, rot)))


_RING_RADII = 3.0 * np.array([1.0, 0.75, 0.5, 0.25])
_RING_NOISE = 0.08


def _ring_sizes(n: int) -> list[int]:
    k = n // 4
    return [k, k, k, n - 3 * k]  # FFJORD: the innermost ring takes the remainder


def rings(n: int, rng: np.random.Generator) -> np.ndarray:
    """``rings`` (FFJORD ``inf_train_gen``): 4 concentric circles of radii 3, 2.25, 1.5, 0.75
    with ``n // 4`` evenly spaced angles each (the innermost takes the remainder), shuffled,
    plus ``0.08 N(0, I)``.

    Args:
        n: number of points (not checked here; :func:`sample` checks it).
        rng: the only source of randomness, advanced in place.

    Returns:
        ``float32`` ``[n, 2]``.

    Examples:
        >>> import numpy as np
        >>> from neuralode.data.toy2d import rings
        >>> x = rings(8, np.random.default_rng(0))  # 2 points per ring
        >>> x.shape, x.dtype
        ((8, 2), dtype('float32'))
        >>> np.sort(np.linalg.norm(x, axis=1)).round(1)
        array([0.7, 0.7, 1.6, 1.7, 2.2, 2.3, 2.9, 3. ], dtype=float32)
    """
    parts = []
    for radius, size in zip(_RING_RADII, _ring_sizes(n)):
        ang = np.linspace(0, 2 * np.pi, size, endpoint=False)
        parts.append(radius * np.stack([np.cos(ang), np.sin(ang)], 1))
    x = np.concatenate(parts)[rng.permutation(n)]
    return _f32(x + rng.normal(scale=_RING_NOISE, size=x.shape))


def swissroll(n: int, rng: np.random.Generator) -> np.ndarray:
    """``swissroll`` (FFJORD ``inf_train_gen``): sklearn ``make_swiss_roll(noise=1.0)``,
    coordinates 0 and 2, divided by 5.

    Args:
        n: number of points (not checked here; :func:`sample` checks it).
        rng: the only source of randomness, advanced in place.

    Returns:
        ``float32`` ``[n, 2]``.

    Raises:
        ImportError: scikit-learn is not installed.

    Examples:
        >>> import numpy as np
        >>> from neuralode.data.toy2d import swissroll
        >>> x = swissroll(1000, np.random.default_rng(0))
        >>> x.shape, x.dtype
        ((1000, 2), dtype('float32'))
    """
    data = _sklearn_datasets().make_swiss_roll(n_samples=n, noise=1.0, random_state=_seed(rng))
    return _f32(data[0][:, [0, 2]] / 5)


def moons(n: int, rng: np.random.Generator) -> np.ndarray:
    """``moons`` (FFJORD ``inf_train_gen``): sklearn ``make_moons(noise=0.1)``, times 2, plus
    ``(-1, -0.2)``.

    Args:
        n: number of points (not checked here; :func:`sample` checks it).
        rng: the only source of randomness, advanced in place.

    Returns:
        ``float32`` ``[n, 2]``.

    Raises:
        ImportError: scikit-learn is not installed.

    Examples:
        >>> import numpy as np
        >>> from neuralode.data.toy2d import moons
        >>> x = moons(1000, np.random.default_rng(0))
        >>> x.shape, x.dtype
        ((1000, 2), dtype('float32'))
    """
    data = _sklearn_datasets().make_moons(n_samples=n, noise=0.1, random_state=_seed(rng))
    return _f32(data[0] * 2 + np.array([-1.0, -0.2]))


_CIRCLE_RADII = np.array([3.0, 1.5])
_CIRCLE_NOISE = 0.08 * 3


def circles(n: int, rng: np.random.Generator) -> np.ndarray:
    """``circles`` (FFJORD ``inf_train_gen``): sklearn ``make_circles(factor=0.5,
    noise=0.08)`` times 3: circles of radii 3 and 1.5 (``n // 2`` outer points), noise std
    0.24.

    Args:
        n: number of points (not checked here; :func:`sample` checks it).
        rng: the only source of randomness, advanced in place.

    Returns:
        ``float32`` ``[n, 2]``.

    Raises:
        ImportError: scikit-learn is not installed.

    Examples:
        >>> import numpy as np
        >>> from neuralode.data.toy2d import circles
        >>> x = circles(1000, np.random.default_rng(0))
        >>> x.shape, x.dtype
        ((1000, 2), dtype('float32'))
    """
    data = _sklearn_datasets().make_circles(
        n_samples=n, factor=0.5, noise=0.08, random_state=_seed(rng)
    )
    return _f32(data[0] * 3)


DATASETS: dict[str, Generator] = {
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "2spirals": two_spirals,
    "pinwheel": pinwheel,
    "rings": rings,
    "swissroll": swissroll,
    "moons": moons,
    "circles": circles,
}
"""Name -> generator ``gen(n, rng) -> float32 [n, 2]``."""


def _lookup(table: dict[str, _T], name: str, what: str) -> _T:
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; known ones are {sorted(table)}")
    return table[name]


def sample(name: str, n: int, seed: int | np.random.Generator | None = None) -> np.ndarray:
    """Draw ``n`` points of a toy dataset.

    Args:
        name: one of :data:`DATASETS`.
        n: number of points (positive).
        seed: an integer seed or a ``numpy.random.Generator`` (``None``: fresh entropy).

    Returns:
        ``np.ndarray`` ``[n, 2]``, ``float32`` (``torch.from_numpy`` makes it a tensor).

    Raises:
        ValueError: an unknown ``name`` (the message lists the known ones) or ``n`` not a
            positive integer.
        ImportError: ``swissroll``, ``moons`` or ``circles`` without scikit-learn.

    Examples:
        >>> import torch
        >>> from neuralode.data.toy2d import sample
        >>> x = torch.from_numpy(sample("8gaussians", 512, seed=0))
        >>> x.shape, x.dtype
        (torch.Size([512, 2]), torch.float32)
    """
    gen = _lookup(DATASETS, name, "dataset")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    out: np.ndarray = gen(int(n), rng)
    return out


# ------------------------------------------------------------------------------- densities

_LOG_2PI = math.log(2 * math.pi)


def _as_points(x: Any) -> torch.Tensor:
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if t.ndim != 2 or t.shape[1] != 2:
        raise ValueError(f"x must have shape [N, 2], got {tuple(t.shape)}")
    return t


def _log_gauss_mixture(x: torch.Tensor, centres: torch.Tensor, std: float) -> torch.Tensor:
    d2 = (x.unsqueeze(1) - centres).pow(2).sum(-1)  # [N, K]
    comp = -0.5 * d2 / std**2 - math.log(2 * math.pi * std**2)
    return torch.logsumexp(comp, 1) - math.log(centres.shape[0])


def _log_ring(x: torch.Tensor, radius: float, std: float) -> torch.Tensor:
    """Density of ``R (cos U, sin U) + std N(0, I)``, ``U ~ U(0, 2 pi)``:
    ``exp(-(r - R)^2 / (2 std^2)) I0e(r R / std^2) / (2 pi std^2)`` (a Rice law over 2 pi r)."""
    r: torch.Tensor = x.norm(dim=1)
    arg = r * radius / std**2
    return (
        -0.5 * (r - radius).pow(2) / std**2
        + torch.log(torch.special.i0e(arg))
        - math.log(2 * math.pi * std**2)
    )


def _log_rings_mixture(
    x: torch.Tensor, radii: np.ndarray, weights: np.ndarray, std: float
) -> torch.Tensor:
    comps = [_log_ring(x, float(r), std) + math.log(w) for r, w in zip(radii, weights)]
    return torch.logsumexp(torch.stack(comps, 1), 1)


def _density_8gaussians(x: torch.Tensor) -> torch.Tensor:
    centres = torch.as_tensor(_DIRS_8 * _SCALE_8 / _SHRINK_8, dtype=x.dtype, device=x.device)
    return _log_gauss_mixture(x, centres, _NOISE_8 / _SHRINK_8)


def _density_checkerboard(x: torch.Tensor) -> torch.Tensor:
    c = torch.floor(x / 2)
    inside = ((c >= -2) & (c <= 1)).all(1) & ((c[:, 0] + c[:, 1]) % 2 == 0)
    return torch.where(inside, math.log(1 / 32), -math.inf).to(x.dtype)


def _density_rings(x: torch.Tensor) -> torch.Tensor:
    return _log_rings_mixture(x, _RING_RADII, np.full(4, 0.25), _RING_NOISE)


def _density_circles(x: torch.Tensor) -> torch.Tensor:
    return _log_rings_mixture(x, _CIRCLE_RADII, np.full(2, 0.5), _CIRCLE_NOISE)


DENSITIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "8gaussians": _density_8gaussians,
    "checkerboard": _density_checkerboard,
    "rings": _density_rings,
    "circles": _density_circles,
}
"""Name -> closed-form ``log p(x)`` (torch, ``[N, 2] -> [N]``)."""


def true_log_density(name: str, x: Any) -> torch.Tensor:
    """The normalised log-density of a toy dataset, where it has a closed form.

    Args:
        name: one of :data:`DENSITIES` (``8gaussians``, ``checkerboard``, ``rings``,
            ``circles``; see the module docstring for what "true" means for the last two).
        x: ``[N, 2]`` points (tensor or array).

    Returns:
        ``[N]`` torch tensor of ``log p(x)`` in nats (``-inf`` off the checkerboard),
        differentiable in ``x``; the dtype of ``x`` if floating, else the default dtype.

    Raises:
        ValueError: ``name`` has no closed-form density (or is unknown), or ``x`` is not
            ``[N, 2]``.

    Examples:
        >>> from neuralode.data.toy2d import true_log_density
        >>> true_log_density("checkerboard", [[1.0, 1.0], [1.0, -1.0]])  # log(1/32), off-board
        tensor([-3.4657,    -inf])
    """
    if name in DATASETS and name not in DENSITIES:
        raise ValueError(
            f"dataset {name!r} has no closed-form density here; those that do are "
            f"{sorted(DENSITIES)}"
        )
    return _lookup(DENSITIES, name, "density")(_as_points(x))


def _w1(z: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * math.pi * z[:, 0] / 4)


def _u1(z: torch.Tensor) -> torch.Tensor:
    r: torch.Tensor = z.norm(dim=1)
    ring = 0.5 * ((r - 2) / 0.4) ** 2
    modes = torch.stack([-0.5 * ((z[:, 0] - 2) / 0.6) ** 2, -0.5 * ((z[:, 0] + 2) / 0.6) ** 2], 1)
    return ring - torch.logsumexp(modes, 1)


def _u2(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((z[:, 1] - _w1(z)) / 0.4) ** 2


def _u3(z: torch.Tensor) -> torch.Tensor:
    w2 = 3 * torch.exp(-0.5 * ((z[:, 0] - 1) / 0.6) ** 2)
    a = -0.5 * ((z[:, 1] - _w1(z)) / 0.35) ** 2
    b = -0.5 * ((z[:, 1] - _w1(z) + w2) / 0.35) ** 2
    return -torch.logsumexp(torch.stack([a, b], 1), 1)


def _u4(z: torch.Tensor) -> torch.Tensor:
    w3 = 3 * torch.sigmoid((z[:, 0] - 1) / 0.3)
    a = -0.5 * ((z[:, 1] - _w1(z)) / 0.4) ** 2
    b = -0.5 * ((z[:, 1] - _w1(z) + w3) / 0.35) ** 2
    return -torch.logsumexp(torch.stack([a, b], 1), 1)


POTENTIALS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "U1": _u1,
    "U2": _u2,
    "U3": _u3,
    "U4": _u4,
}
"""Rezende & Mohamed 2015, Table 1: potentials ``U(z)`` with ``p(z) ∝ exp(-U(z))``."""


def unnormalised_log_density(name: str, x: Any) -> torch.Tensor:
    """A reverse-KL target: ``-U(x)`` for a potential of :data:`POTENTIALS`, or the normalised
    :func:`true_log_density` of a dataset of :data:`DENSITIES`.

    Args:
        name: a key of :data:`POTENTIALS` or :data:`DENSITIES`.
        x: ``[N, 2]``.

    Returns:
        ``[N]`` torch tensor (nats, up to an additive constant for the potentials),
        differentiable in ``x``.

    Raises:
        ValueError: an unknown ``name`` (the message lists the known ones), or ``x`` is not
            ``[N, 2]``.

    Examples:
        >>> import torch
        >>> from neuralode.data.toy2d import unnormalised_log_density
        >>> z = torch.tensor([[1.0, 0.0]], requires_grad=True)
        >>> logp = unnormalised_log_density("U2", z)  # -U2(z) = -(z2 - sin(pi z1 / 2))^2 / 0.32
        >>> logp.detach(), logp.requires_grad
        (tensor([-3.1250]), True)
    """
    if name in POTENTIALS:
        return -POTENTIALS[name](_as_points(x))
    if name in DENSITIES:
        return true_log_density(name, x)
    known = sorted(POTENTIALS) + sorted(DENSITIES)
    raise ValueError(f"unknown target {name!r}; known ones are {known}")
