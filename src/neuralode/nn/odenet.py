"""The MNIST classifiers of Chen et al. 2018 (Neural ODEs, section 3 and table 1).

All four models take ``float`` images ``[B, 1, 28, 28]`` (normalising them is the data module's
job, see :mod:`neuralode.data.mnist`) and return logits ``[B, 10]``:

* ``"odenet"``: downsampling, one :class:`ODEBlock` (the vector field :class:`ODEFunc`
  integrated over ``[0, 1]`` by an adaptive solver, gradients by the adjoint), head.
* ``"resnet"``: the same with six residual blocks in place of the ODE block.
* ``"rknet"``: the ODE-Net solved with a fixed-step Runge-Kutta method, differentiated by
  backpropagation through the solver's operations.
* ``"mlp"``: the one-hidden-layer (300 units) perceptron baseline.

The layer structure follows the paper's public reference code (torchdiffeq's
``examples/odenet_mnist.py``): GroupNorm with ``min(32, dim)`` groups, time fed to the
convolutions as an extra constant channel, and the ``"conv"`` downsampling
``Conv(1,64,3,1)-GN-ReLU-Conv(64,64,4,2,1)-GN-ReLU-Conv(64,64,4,2,1)`` to ``64x6x6``.
With it the parameter counts are ODE-Net/RK-Net 208,266, ResNet 576,778 and MLP 238,510
(paper: 0.22M, 0.60M, 0.24M); the residual ``"res"`` downsampling gives 232,970 and 601,482.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..solution import Solution
from ..solve import solve
from .settings import SolveSettings

__all__ = [
    "ConcatConv2d",
    "ODEFunc",
    "ODEBlock",
    "ResBlock",
    "norm",
    "downsampling_layers",
    "head",
    "odenet",
    "resnet",
    "rknet",
    "mlp",
    "MODELS",
    "build_model",
    "count_parameters",
    "model_nfe",
    "reset_nfe",
]


def norm(dim: int) -> nn.GroupNorm:
    """GroupNorm with ``min(32, dim)`` groups over ``dim`` channels (as the reference code).

    Args:
        dim: the number of channels ``C`` of its ``[B, C, H, W]`` input.

    Returns:
        A new :class:`torch.nn.GroupNorm` (affine, shape-preserving).

    Examples:
        >>> from neuralode.nn.odenet import norm
        >>> norm(64).num_groups, norm(8).num_groups
        (32, 8)
    """
    return nn.GroupNorm(min(32, dim), dim)


class ConcatConv2d(nn.Module):
    """A 2-D convolution that sees the time ``t`` as an extra constant input channel.

    ``forward(t, x)`` convolves ``cat([t * ones(B, 1, H, W), x], dim=1)`` (float ``x``; the
    time channel takes ``x``'s dtype and device).

    Args:
        dim_in, dim_out: channels of ``x`` and of the output.
        ksize, stride, padding, dilation, groups, bias: as :class:`torch.nn.Conv2d` (its
            ``kernel_size`` is ``ksize``; the defaults give a shape-preserving 3x3 convolution).
        transpose: use :class:`torch.nn.ConvTranspose2d` instead.

    Examples:
        >>> import torch
        >>> from neuralode.nn import ConcatConv2d
        >>> conv = ConcatConv2d(3, 4)
        >>> conv(0.5, torch.zeros(2, 3, 8, 8)).shape
        torch.Size([2, 4, 8, 8])
        >>> conv(torch.tensor([0.0, 1.0]), torch.zeros(2, 3, 8, 8)).shape  # a time per sample
        torch.Size([2, 4, 8, 8])
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        ksize: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        transpose: bool = False,
    ) -> None:
        super().__init__()
        module = nn.ConvTranspose2d if transpose else nn.Conv2d
        self.layer = module(
            dim_in + 1,
            dim_out,
            kernel_size=ksize,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
        )

    def forward(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` with the time channel prepended.

        Args:
            t: the time: a float or 0-dim tensor shared by the batch, or ``[B]`` (per sample,
                as a batched solve passes it).
            x: ``[B, dim_in, H, W]``, floating point.

        Returns:
            ``[B, dim_out, H', W']`` (``H' = H``, ``W' = W`` with the default 3x3, stride 1,
            padding 1), in ``x``'s dtype.

        Raises:
            ValueError: if ``t`` is neither 0-dim nor of shape ``[B]``.
        """
        b, _, h, w = x.shape
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if tt.ndim == 0:
            tt = tt.reshape(1, 1, 1, 1).expand(b, 1, h, w)
        elif tt.shape == (b,):
            tt = tt.reshape(b, 1, 1, 1).expand(b, 1, h, w)
        else:
            raise ValueError(f"t must be 0-dim or [batch] = [{b}], got shape {tuple(tt.shape)}")
        out: torch.Tensor = self.layer(torch.cat([tt, x], dim=1))
        return out


class ODEFunc(nn.Module):
    """The image vector field ``f(t, h)``: GN-ReLU-ConcatConv3x3-GN-ReLU-ConcatConv3x3-GN.

    The ODE-Net's field (Chen et al. 2018, section 3; torchdiffeq's ``ODEfunc``): it keeps the
    shape ``[B, dim, H, W]`` of the state, and sees ``t`` through :class:`ConcatConv2d`.

    Args:
        dim: channels of the state ``h`` (``[B, dim, H, W]``); the GroupNorms use
            ``min(32, dim)`` groups, so ``dim`` must be a multiple of 32 when above 32.

    Attributes:
        nfe: number of calls since construction or :meth:`reset_nfe` (forward and, with the
            adjoint, backward calls alike).

    Examples:
        >>> import torch
        >>> from neuralode.nn import ODEFunc
        >>> f = ODEFunc(dim=4)
        >>> f(torch.tensor(0.0), torch.zeros(2, 4, 5, 5)).shape
        torch.Size([2, 4, 5, 5])
        >>> f.nfe
        1
    """

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.norm1 = norm(dim)
        self.conv1 = ConcatConv2d(dim, dim, 3, 1, 1)
        self.norm2 = norm(dim)
        self.conv2 = ConcatConv2d(dim, dim, 3, 1, 1)
        self.norm3 = norm(dim)
        self.nfe = 0

    def reset_nfe(self) -> None:
        """Set the call counter :attr:`nfe` to zero."""
        self.nfe = 0

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The vector field; counts the call in :attr:`nfe`.

        Args:
            t: the time, 0-dim or ``[B]`` (a batched solve's per-sample times).
            h: the state ``[B, dim, H, W]``.

        Returns:
            ``dh/dt``, shaped as ``h``.
        """
        self.nfe += 1
        out = self.conv1(t, torch.relu(self.norm1(h)))
        out = self.conv2(t, torch.relu(self.norm2(out)))
        dh: torch.Tensor = self.norm3(out)
        return dh


class _SolveRecord:
    """The last forward solve of an :class:`ODEBlock`, for its NFE counters.

    Dropped on copy and pickling: the solution may hold tensors of a live autograd graph, which
    ``copy.deepcopy`` (e.g. of a model for an EMA) cannot copy.
    """

    def __init__(self, solution: Solution | None = None) -> None:
        self.solution = solution
        self.backward_reached = False

    def mark_backward(self, grad: torch.Tensor) -> None:
        self.backward_reached = True

    def __deepcopy__(self, memo: dict[int, Any]) -> _SolveRecord:
        return _SolveRecord()

    def __reduce__(self) -> tuple[Callable[[], _SolveRecord], tuple[()]]:
        return (_SolveRecord, ())


class ODEBlock(nn.Module):
    """``h(t_end)`` where ``dh/dt = odefunc(t, h)`` and ``h(0) = x``: the ODE-Net layer.

    The whole batch is one state with one step size, as in the reference code, unless
    ``batched=True`` (each sample its own steps; ``odefunc`` then also receives ``t`` of shape
    ``[B]``).

    Args:
        odefunc: the vector field ``odefunc(t, h)``, an ``nn.Module`` (its parameters are the ones
            the adjoint differentiates).
        t_end: the end of the integration interval ``[0, t_end]``.
        method, rtol, atol, step_size: passed to :func:`neuralode.solve` (``step_size`` for the
            fixed-step methods; ``rtol``/``atol`` are ignored by them).
        gradient: ``"adjoint"`` (Chen et al.'s constant-memory adjoint, the ODE-Net default),
            ``"backprop"`` (through the solver: the RK-Net) or ``"checkpoint"``.
        batched: per-sample adaptive steps.
        solve_options: any other keyword of :func:`neuralode.solve` (e.g. ``adjoint_options``,
            ``max_num_steps``). The settings are kept as ``block.solver``
            (:class:`~neuralode.nn.SolveSettings`, the same for every model family).

    NFE counters (see :func:`model_nfe`): ``nfe_forward`` is the last forward solve's number of
    vector-field evaluations (the maximum over samples when batched); ``nfe_backward`` is the
    backward pass's: the adjoint's backward solve or the checkpoint's recomputation, as reported
    by ``Solution.backward_stats``, and for ``"backprop"`` by convention equal to
    ``nfe_forward`` (one vector-Jacobian product per forward evaluation).  It is ``None`` until a
    backward pass has gone through the block.

    Raises:
        ValueError: if ``t_end`` is not positive and finite, or for settings that
            :class:`~neuralode.nn.SolveSettings` rejects (unknown method or gradient, negative
            tolerance, a ``solve_options`` key that has its own argument).

    Examples:
        >>> import torch
        >>> from neuralode.nn import ODEBlock, ODEFunc
        >>> block = ODEBlock(ODEFunc(dim=4), method="rk4", step_size=0.25, gradient="backprop")
        >>> out = block(torch.randn(2, 4, 6, 6))
        >>> out.shape, block.nfe_forward  # 4 steps of 4 stages
        (torch.Size([2, 4, 6, 6]), 16)
        >>> out.sum().backward(); block.nfe_backward
        16
    """

    integration_time: torch.Tensor

    def __init__(
        self,
        odefunc: nn.Module,
        t_end: float = 1.0,
        *,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        gradient: str = "adjoint",
        step_size: float | None = None,
        batched: bool = False,
        solve_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        t_end = float(t_end)
        if not (t_end > 0 and t_end < float("inf")):
            raise ValueError(f"t_end must be positive and finite, got {t_end}")
        self.odefunc = odefunc
        self.t_end = t_end
        self.solver = SolveSettings(method, rtol, atol, step_size, gradient, solve_options or {})
        self.batched = batched
        self.register_buffer("integration_time", torch.tensor([0.0, t_end]), persistent=False)
        self._record = _SolveRecord()

    def extra_repr(self) -> str:
        return f"t_end={self.t_end}, {self.solver!r}, batched={self.batched}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Solve ``dh/dt = odefunc(t, h)`` from ``h(0) = x`` to ``t_end``.

        Args:
            x: the initial state ``[B, C, H, W]`` (any shape ``odefunc`` accepts), floating
                point; the integration times take its dtype.

        Returns:
            The state at ``t_end``, shaped as ``x``.

        Raises:
            TypeError: for input :func:`neuralode.solve` rejects, e.g. an integer ``x`` or an
                unknown keyword in ``solve_options``.
            neuralode.SolverError: if the solve fails (too many steps, step size underflow,
                non-finite values), unless ``solve_options={"throw": False}``.
        """
        t = self.integration_time.to(x.dtype)
        sol = solve(self.odefunc, x, t, batched=self.batched, **self.solver.kwargs())
        out: torch.Tensor = sol.ys[:, -1] if self.batched else sol.ys[-1]
        self._record = _SolveRecord(sol)
        if out.requires_grad:
            # Tensor.register_hook has no annotations (torch 2.13).
            out.register_hook(self._record.mark_backward)  # type: ignore[no-untyped-call]
        return out

    @property
    def last_solution(self) -> Solution | None:
        """The :class:`neuralode.Solution` of the last forward pass (``None`` before one)."""
        return self._record.solution

    @property
    def nfe_forward(self) -> int:
        """Vector-field evaluations of the last forward solve (0 before one)."""
        sol = self._record.solution
        return 0 if sol is None else int(sol.stats.nfe.max())

    @property
    def nfe_backward(self) -> int | None:
        """Vector-field evaluations of the last backward pass (``None`` until one ran)."""
        sol = self._record.solution
        if sol is None or not self._record.backward_reached:
            return None
        if self.solver.gradient == "backprop":
            return self.nfe_forward
        stats = sol.backward_stats
        return None if stats is None else int(stats.nfe.max())


class ResBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(ReLU(GN(conv(ReLU(GN(x))))))``.

    Args:
        inplanes, planes: input and output channels.
        stride: stride of the first 3x3 convolution.
        downsample: applied to ``ReLU(GN(x))`` for the shortcut when the shape changes
            (default: the identity shortcut, which needs ``inplanes == planes`` and
            ``stride == 1``).

    Examples:
        >>> import torch
        >>> from neuralode.nn.odenet import ResBlock
        >>> ResBlock(8, 8)(torch.zeros(2, 8, 6, 6)).shape
        torch.Size([2, 8, 6, 6])
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.norm2 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: ``[B, inplanes, H, W]``.

        Returns:
            ``[B, planes, ceil(H / stride), ceil(W / stride)]``.
        """
        out = torch.relu(self.norm1(x))
        shortcut: torch.Tensor = x if self.downsample is None else self.downsample(out)
        residual: torch.Tensor = self.conv2(torch.relu(self.norm2(self.conv1(out))))
        return residual + shortcut


def downsampling_layers(kind: str = "conv", dim: int = 64, in_channels: int = 1) -> nn.Sequential:
    """The reference code's downsampling of ``[B, in_channels, 28, 28]`` images.

    Args:
        kind: ``"conv"``:
            ``Conv(in,dim,3,1)-GN-ReLU-Conv(dim,dim,4,2,1)-GN-ReLU-Conv(dim,dim,4,2,1)`` to
            ``[B, dim, 6, 6]``; ``"res"``: ``Conv(in,dim,3,1)`` and two strided residual blocks
            to ``[B, dim, 7, 7]``.
        dim: output channels.
        in_channels: channels of the images.

    Returns:
        A new :class:`torch.nn.Sequential`.

    Raises:
        ValueError: for a ``kind`` other than ``"conv"`` and ``"res"``.

    Examples:
        >>> import torch
        >>> from neuralode.nn.odenet import downsampling_layers
        >>> downsampling_layers("conv", dim=8)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 8, 6, 6])
    """
    if kind == "conv":
        return nn.Sequential(
            nn.Conv2d(in_channels, dim, 3, 1),
            norm(dim),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 4, 2, 1),
            norm(dim),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 4, 2, 1),
        )
    if kind == "res":
        return nn.Sequential(
            nn.Conv2d(in_channels, dim, 3, 1),
            ResBlock(dim, dim, stride=2, downsample=nn.Conv2d(dim, dim, 1, 2, bias=False)),
            ResBlock(dim, dim, stride=2, downsample=nn.Conv2d(dim, dim, 1, 2, bias=False)),
        )
    raise ValueError(f"downsampling must be 'conv' or 'res', got {kind!r}")


def head(dim: int = 64, num_classes: int = 10) -> nn.Sequential:
    """The classifier head ``GN-ReLU-AdaptiveAvgPool(1)-Flatten-Linear(dim, num_classes)``.

    Args:
        dim: channels of its ``[B, dim, H, W]`` input.
        num_classes: number of logits.

    Returns:
        A new :class:`torch.nn.Sequential` mapping ``[B, dim, H, W]`` to ``[B, num_classes]``.

    Examples:
        >>> import torch
        >>> from neuralode.nn.odenet import head
        >>> head(dim=8)(torch.zeros(2, 8, 6, 6)).shape
        torch.Size([2, 10])
    """
    return nn.Sequential(
        norm(dim),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(dim, num_classes),
    )


def _classifier(features: nn.Module, dim: int, ds: str, in_ch: int, n_cls: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            downsampling=downsampling_layers(ds, dim, in_ch),
            features=features,
            head=head(dim, n_cls),
        )
    )


def odenet(
    *,
    dim: int = 64,
    downsampling: str = "conv",
    in_channels: int = 1,
    num_classes: int = 10,
    t_end: float = 1.0,
    method: str = "dopri5",
    rtol: float = 1e-3,
    atol: float = 1e-3,
    gradient: str = "adjoint",
    step_size: float | None = None,
    batched: bool = False,
    solve_options: Mapping[str, Any] | None = None,
) -> nn.Sequential:
    """ODE-Net: downsampling, ``ODEBlock(ODEFunc(dim))``, head; ``[B, 1, 28, 28]`` -> ``[B, 10]``.

    Children: ``downsampling``, ``features`` (the :class:`ODEBlock`), ``head``.  Defaults are the
    reference code's: dopri5 at ``rtol = atol = 1e-3`` over ``[0, 1]``, with the adjoint.

    Args:
        dim: channels of the ODE state (64 in the paper).
        downsampling: ``"conv"`` or ``"res"`` (see :func:`downsampling_layers`).
        in_channels: image channels.
        num_classes: number of logits.
        t_end, method, rtol, atol, gradient, step_size, batched, solve_options: the
            :class:`ODEBlock`'s.

    Returns:
        A new :class:`torch.nn.Sequential`.

    Raises:
        ValueError: for an unknown ``downsampling``, or an argument :class:`ODEBlock` rejects.

    Examples:
        >>> import torch
        >>> from neuralode.nn.odenet import odenet
        >>> model = odenet(dim=8)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    block = ODEBlock(
        ODEFunc(dim),
        t_end,
        method=method,
        rtol=rtol,
        atol=atol,
        gradient=gradient,
        step_size=step_size,
        batched=batched,
        solve_options=solve_options,
    )
    return _classifier(block, dim, downsampling, in_channels, num_classes)


def rknet(
    *,
    dim: int = 64,
    downsampling: str = "conv",
    in_channels: int = 1,
    num_classes: int = 10,
    t_end: float = 1.0,
    method: str = "rk4",
    steps: int = 4,
) -> nn.Sequential:
    """RK-Net: the ODE-Net solved with ``steps`` fixed steps of ``method`` (default rk4, 4 steps:
    16 evaluations), differentiated by backpropagation through the solver.

    Args:
        dim, downsampling, in_channels, num_classes, t_end: as :func:`odenet`.
        method: a fixed-step method (``"rk4"``, ``"euler"``, ...).
        steps: number of steps over ``[0, t_end]`` (step size ``t_end / steps``).

    Returns:
        A new :class:`torch.nn.Sequential`, ``[B, in_channels, 28, 28]`` ->
        ``[B, num_classes]``.

    Raises:
        ValueError: if ``steps`` is not a positive ``int``, or for an argument
            :class:`ODEBlock` rejects.

    Examples:
        >>> import torch
        >>> from neuralode.nn import model_nfe
        >>> from neuralode.nn.odenet import rknet
        >>> model = rknet(dim=8, steps=2)
        >>> model(torch.zeros(2, 1, 28, 28)).shape, model_nfe(model)["forward"]
        (torch.Size([2, 10]), 8)
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    block = ODEBlock(
        ODEFunc(dim), t_end, method=method, gradient="backprop", step_size=t_end / steps
    )
    return _classifier(block, dim, downsampling, in_channels, num_classes)


def resnet(
    *,
    dim: int = 64,
    downsampling: str = "conv",
    in_channels: int = 1,
    num_classes: int = 10,
    num_blocks: int = 6,
) -> nn.Sequential:
    """ResNet: downsampling, ``num_blocks`` :class:`ResBlock` s, head.

    Args:
        dim, downsampling, in_channels, num_classes: as :func:`odenet`.
        num_blocks: residual blocks in place of the ODE block (6 in the paper).

    Returns:
        A new :class:`torch.nn.Sequential`, ``[B, in_channels, 28, 28]`` ->
        ``[B, num_classes]``.

    Raises:
        ValueError: for an unknown ``downsampling``.

    Examples:
        >>> import torch
        >>> from neuralode.nn.odenet import resnet
        >>> resnet(dim=8, num_blocks=2)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    blocks = nn.Sequential(*(ResBlock(dim, dim) for _ in range(num_blocks)))
    return _classifier(blocks, dim, downsampling, in_channels, num_classes)


def mlp(*, in_features: int = 784, hidden: int = 300, num_classes: int = 10) -> nn.Sequential:
    """The paper's 1-layer MLP: ``Flatten-Linear(784, 300)-ReLU-Linear(300, 10)``.

    Args:
        in_features: pixels per image (``C * H * W``).
        hidden: hidden units.
        num_classes: number of logits.

    Returns:
        A new :class:`torch.nn.Sequential`, ``[B, 1, 28, 28]`` -> ``[B, num_classes]``.

    Examples:
        >>> import torch
        >>> from neuralode.nn.odenet import mlp
        >>> mlp(hidden=16)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


MODELS: dict[str, Callable[..., nn.Module]] = {
    "odenet": odenet,
    "resnet": resnet,
    "rknet": rknet,
    "mlp": mlp,
}
"""Model name -> factory (keyword options only)."""


def build_model(name: str, **options: Any) -> nn.Module:
    """Build one of :data:`MODELS` by name.

    Args:
        name: ``"odenet"``, ``"resnet"``, ``"rknet"`` or ``"mlp"``.
        **options: the factory's keywords (see :func:`~neuralode.nn.odenet.odenet`,
            :func:`~neuralode.nn.odenet.resnet`, :func:`~neuralode.nn.odenet.rknet`,
            :func:`~neuralode.nn.odenet.mlp`); further keywords of :func:`neuralode.solve` go
            in the ODE-Net's ``solve_options``.

    Returns:
        A new module mapping ``float`` ``[B, 1, 28, 28]`` to logits ``[B, num_classes]``.

    Raises:
        ValueError: for an unknown ``name`` (listing the known ones), or an option value the
            factory rejects.
        TypeError: for a keyword the factory does not take (listing the ones it takes).

    Examples:
        >>> import torch
        >>> from neuralode.nn import build_model, count_parameters
        >>> model = build_model("mlp", hidden=16)
        >>> model(torch.zeros(2, 1, 28, 28)).shape, count_parameters(model)
        (torch.Size([2, 10]), 12730)
        >>> build_model("odenet", dim=8, method="rk4", step_size=0.5).features.solver
        method='rk4', rtol=0.001, atol=0.001, gradient='adjoint', step_size=0.5
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models are {list(MODELS)}")
    factory = MODELS[name]
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(options) - set(params))
    if unknown and not takes_any:
        known = [k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        raise TypeError(f"unknown option(s) {unknown} for model {name!r}; known: {known}")
    return factory(**options)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters of ``model`` (only those that require grad by default).

    Args:
        model: any module.
        trainable_only: count only the parameters with ``requires_grad``; ``False`` counts
            frozen ones too (buffers never count).

    Returns:
        The total number of elements.

    Examples:
        >>> from torch import nn
        >>> from neuralode.nn import count_parameters
        >>> layer = nn.Linear(3, 2)
        >>> count_parameters(layer)
        8
        >>> _ = layer.bias.requires_grad_(False)
        >>> count_parameters(layer), count_parameters(layer, trainable_only=False)
        (6, 8)
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_nfe(model: nn.Module) -> dict[str, int | None]:
    """Forward and backward NFE of the last pass, summed over the model's :class:`ODEBlock` s.

    Args:
        model: any module; its :class:`ODEBlock` submodules (at any depth) are counted.

    Returns:
        ``{"forward": int, "backward": int | None}``; ``backward`` is ``None`` when a block has
        not been through a backward pass since its last forward (see :class:`ODEBlock` for the
        backprop convention).  A model without ODE blocks gives ``{"forward": 0, "backward": 0}``.

    Examples:
        >>> import torch
        >>> from neuralode.nn import ODEBlock, ODEFunc, model_nfe
        >>> block = ODEBlock(ODEFunc(4), method="rk4", step_size=0.5, gradient="backprop")
        >>> model = torch.nn.Sequential(block, torch.nn.Flatten())
        >>> out = model(torch.randn(2, 4, 6, 6))
        >>> model_nfe(model)  # 2 steps of 4 stages; no backward pass yet
        {'forward': 8, 'backward': None}
        >>> out.sum().backward()
        >>> model_nfe(model)
        {'forward': 8, 'backward': 8}
    """
    forward = 0
    backward: int | None = 0
    for m in model.modules():
        if isinstance(m, ODEBlock):
            forward += m.nfe_forward
            b = m.nfe_backward
            backward = None if (b is None or backward is None) else backward + b
    return {"forward": forward, "backward": backward}


def reset_nfe(model: nn.Module) -> None:
    """Set the call counter ``nfe`` of every :class:`ODEFunc` in ``model`` to zero.

    Args:
        model: any module; its :class:`ODEFunc` submodules (at any depth) are reset.

    Examples:
        >>> import torch
        >>> from neuralode.nn import ODEFunc
        >>> from neuralode.nn.odenet import reset_nfe
        >>> f = ODEFunc(4)
        >>> _ = f(torch.tensor(0.0), torch.zeros(1, 4, 3, 3))
        >>> reset_nfe(torch.nn.Sequential(f)); f.nfe
        0
    """
    for m in model.modules():
        if isinstance(m, ODEFunc):
            m.reset_nfe()
