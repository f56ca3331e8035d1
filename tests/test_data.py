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
