"""Training data: the built-in digits and user data, and bad data refused before training."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastddpm import data
from fastddpm.errors import UserError


def test_digits_split_is_fixed_and_scaled():
    a, b = data.digits(16), data.digits(16)
    assert a.train.shape == (1497, 1, 16, 16) and a.heldout.shape == (300, 1, 16, 16)
    assert torch.equal(a.heldout, b.heldout)  # the held-out set never moves
    assert a.train.min() == -1 and a.train.max() == 1
    assert sorted(set(a.labels_train.tolist())) == list(range(10))
    # no image is in both splits
    flat_train = {tuple(x.flatten().tolist()) for x in a.train}
    assert sum(tuple(x.flatten().tolist()) in flat_train for x in a.heldout) < 5  # dataset duplicates


def test_folder_of_images(tmp_path):
    rng = np.random.default_rng(0)
    for k, size in enumerate([(20, 20), (30, 24), (16, 40)]):  # mixed sizes: centre-crop + resize
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    ds = data.load(str(tmp_path), 8, 3)
    assert ds.train.shape[1:] == (3, 8, 8) and len(ds.train) + len(ds.heldout) == 3
    assert ds.train.min() >= -1 and ds.train.max() <= 1
    grey = data.load(str(tmp_path), 8, 1)
    assert grey.train.shape[1] == 1


def test_npz(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (12, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", images=arr)
    ds = data.load(str(tmp_path / "x.npz"), 8, 3)
    everything = torch.cat([ds.train, ds.heldout])
    expected = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    assert all(any(torch.allclose(x, y, atol=1e-6) for y in expected) for x in everything)


def test_npz_floats_in_either_range(tmp_path):
    arr = np.random.default_rng(0).random((6, 8, 8)).astype(np.float32)  # [0, 1]
    np.savez(tmp_path / "unit.npz", images=arr)
    np.savez(tmp_path / "signed.npz", images=arr * 2 - 1)
    a, b = data.load(str(tmp_path / "unit.npz"), 8, 1), data.load(str(tmp_path / "signed.npz"), 8, 1)
    assert torch.allclose(a.train, b.train, atol=1e-6) and a.train.min() >= -1


def test_cifar_batches(tmp_path):
    import pickle

    arr = np.random.default_rng(0).integers(0, 255, (6, 3072), dtype=np.uint8)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": arr, b"labels": [0] * 6}, f)
    ds = data.load(str(tmp_path), 32, 3)
    assert len(ds.train) + len(ds.heldout) == 6 and ds.train.shape[1:] == (3, 32, 32)


def test_cifar_test_batch_is_the_heldout_split(tmp_path):
    import pickle

    rng = np.random.default_rng(1)
    train, test = (rng.integers(0, 255, (n, 3072), dtype=np.uint8) for n in (6, 4))
    for name, arr in (("data_batch_1", train), ("test_batch", test)):
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": arr, b"labels": [0] * len(arr)}, f)
    ds = data.load(str(tmp_path), 32, 3)
    as_images = lambda a: torch.from_numpy(a.reshape(-1, 3, 32, 32)).float() / 127.5 - 1  # noqa: E731
    torch.testing.assert_close(ds.train, as_images(train))  # all of the training batches, in order
    torch.testing.assert_close(ds.heldout, as_images(test))
    (tmp_path / "data_batch_1").unlink()  # a folder with the test batch alone still loads
    only_test = data.load(str(tmp_path), 32, 3)
    assert len(only_test.train) == 0 and torch.equal(only_test.heldout, ds.heldout)


def test_cifar_batch_that_runs_code_is_refused(tmp_path):
    import os
    import pickle

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(UserError, match="not a CIFAR-10 python batch"):
        data.load(str(tmp_path), 32, 3)
    assert not marker.exists()


def test_bad_data(tmp_path):
    with pytest.raises(UserError, match="not found"):
        data.load(str(tmp_path / "absent"), 8, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no PNG or JPEG"):
        data.load(str(tmp_path / "empty"), 8, 1)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image"):
        data.load(str(tmp_path / "broken"), 8, 1)
    np.savez(tmp_path / "rgb.npz", images=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(UserError, match="3 channels, the model wants 1"):
        data.load(str(tmp_path / "rgb.npz"), 8, 1)
    np.savez(tmp_path / "float255.npz", images=np.full((4, 8, 8), 200.0))  # 0..255 as floats
    with pytest.raises(UserError, match=r"must lie in \[0, 1\]"):
        data.load(str(tmp_path / "float255.npz"), 8, 1)
    np.savez(tmp_path / "two.npz", a=np.zeros((4, 8, 8)), b=np.zeros((4, 8, 8)))
    with pytest.raises(UserError, match="several arrays"):
        data.load(str(tmp_path / "two.npz"), 8, 1)
    with pytest.raises(UserError, match="greyscale"):
        data.load("digits", 16, 3)


def test_images_to_start_from_are_all_of_a_users_and_the_heldout_of_a_data_set(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (7, 6, 6), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    x = data.images(str(tmp_path), 6, 1)  # every image of a folder: no held-out split
    assert x.shape == (7, 1, 6, 6)
    torch.testing.assert_close(x[:, 0], torch.from_numpy(pixels).float() / 127.5 - 1)
    one = data.images(str(tmp_path / "3.png"), 6, 1)  # a single image file
    torch.testing.assert_close(one, x[3:4])
    torch.testing.assert_close(data.images("digits", 16, 1), data.load("digits", 16, 1).heldout)
    (tmp_path / "notes.txt").write_text("not images")
    with pytest.raises(UserError, match="unsupported data file"):
        data.images(str(tmp_path / "notes.txt"), 6, 1)


def _npz_with_header(path, shape, descr="<f4", data=b"\0" * 64):
    """An .npz whose one member's header says `shape` / `descr` over `data` (crafted: no
    numpy writer would produce it)."""
    import io
    import zipfile

    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, {"descr": descr, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images.npy", npy.getvalue() + data)
    return path


def _png_header_only(path, width, height):
    """A PNG whose header says width × height over a few bytes of image data (a decompression
    bomb's header: PIL reads the size before decoding anything)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _valid_npz(path):
    np.savez(path, images=np.random.default_rng(0).integers(0, 256, (4, 8, 8), dtype=np.uint8))
    return path


def _valid_png(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(path)
    return path


def _saved(**arrays):
    return lambda p: np.savez(p, **arrays) or p


def _cut(make, keep):
    return lambda p: p.write_bytes(make(p).read_bytes()[:keep]) and p


# every way a data file was found to break a reader: each ends in one line naming the file
BAD_FILES = {
    "truncated npz": (_cut(_valid_npz, 150), "x.npz", "cannot read"),
    "not a zip": (lambda p: p.write_bytes(b"PK\x03\x04 garbage") and p, "x.npz", "cannot read"),
    "empty npz": (_saved(), "x.npz", "holds no arrays"),
    "pickled objects": (_saved(images=np.array([{"a": 1}, None], dtype=object)), "x.npz", "must be numbers"),
    "strings": (_saved(images=np.array([["ab", "cd"]] * 2)), "x.npz", "must be numbers"),
    "complex": (_saved(images=np.ones((2, 4, 4), np.complex64)), "x.npz", "must be numbers"),
    "no images": (_saved(images=np.zeros((0, 8, 8), np.uint8)), "x.npz", "holds no images"),
    "zero height": (_saved(images=np.zeros((3, 0, 8), np.uint8)), "x.npz", "holds no images"),
    "a vector": (_saved(images=np.zeros(12, np.uint8)), "x.npz", "expected images"),
    "header past its data": (lambda p: _npz_with_header(p, (4, 8, 8)), "x.npz", "truncated"),
    "header past the machine": (lambda p: _npz_with_header(p, (10**9, 1024, 1024), data=b""), "x.npz",
                                "truncated"),
    "NaN": (_saved(images=np.full((2, 4, 4), np.nan, np.float32)), "x.npz", "must lie in"),
    "truncated png": (_cut(_valid_png, 60), "x.png", "cannot read image"),
    "decompression bomb": (lambda p: _png_header_only(p, 100_000, 100_000), "x.png", "decompression bomb"),
    "a GIF named .png": (lambda p: Image.new("L", (4, 4)).save(p, format="GIF") or p, "x.png",
                         "cannot read image"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_damaged_data_file_is_one_line_naming_it(tmp_path, case):
    make, name, message = BAD_FILES[case]
    path = make(tmp_path / name)
    for read in (lambda: data.load(str(path), 8, 1), lambda: data.images(str(path), 8, 1)):
        with pytest.raises(UserError, match=message) as caught:
            read()
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_big_endian_floats_read_as_their_values(tmp_path):
    rng = np.random.default_rng(4)
    values = rng.random((3, 8, 8))
    np.savez(tmp_path / "be.npz", images=values.astype(">f8"))
    torch.testing.assert_close(data.images(str(tmp_path / "be.npz"), 8, 1)[:, 0],
                               torch.from_numpy(values).float() * 2 - 1)


@pytest.mark.parametrize("payload", [
    [1, 2, 3],  # a list where a dict belongs
    {b"data": [[0] * 3072]},  # a list where the array belongs
    {b"data": np.zeros((2, 100), np.uint8)},  # not 32×32×3 images
    {b"labels": [0]},  # no images at all
])
def test_a_cifar_batch_of_the_wrong_shape_is_one_line(tmp_path, payload):
    import pickle

    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump(payload, f)
    with pytest.raises(UserError, match="not a CIFAR-10 python batch") as caught:
        data.load(str(tmp_path), 32, 3)
    assert "data_batch_1" in str(caught.value)


def test_a_damaged_cifar_batch_is_one_line(tmp_path):
    """Truncations and bit flips of a real batch: the unpickler's whole range of errors."""
    import pickle
    import random

    good = pickle.dumps({b"data": np.random.default_rng(0).integers(0, 256, (2, 3072), dtype=np.uint8),
                         b"labels": [1, 2]})
    rng = random.Random(0)
    for _ in range(300):
        damaged = bytearray(good[:rng.randrange(len(good))] if rng.random() < 0.3 else good)
        for _ in range(rng.randrange(4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        (tmp_path / "data_batch_1").write_bytes(bytes(damaged))
        try:
            ds = data.load(str(tmp_path), 32, 3)
        except UserError as e:
            assert "data_batch_1" in str(e)
        else:
            assert len(ds.train) + len(ds.heldout) == 2
