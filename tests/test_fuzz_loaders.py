"""Fuzzing every reader of a user's file in-process (Hypothesis): U-Net, schedule and sampling
configs; model.pt headers and safetensors metadata; diffusers folder and scheduler configs; and
the bytes of model files, .npz arrays and PNGs. Each case keeps the promise: the reader returns a
valid result or raises one UserError of one line (never another exception: a traceback), within
the 5 s deadline (fuzzing.budget). The CLI's promise, with memory limits: test_fuzz_cli.py."""
import io
import json
import random

import numpy as np
import pytest
import torch
from fuzzing import SCALARS, VALUES, budget, mutated, refused_in_one_line
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from tiny import TINY, tiny_model

from fastddpm import checkpoint, data
from fastddpm.interop.diffusers import SCHEDULER_CONFIG, UNET_CONFIG, load_folder, save_folder
from fastddpm.model import DiffusionModel, SamplingDefaults
from fastddpm.schedule import Schedule, ScheduleConfig
from fastddpm.unet import LIST_FIELDS, UNetConfig

MODEL = tiny_model(TINY)
HEADER = checkpoint._header(MODEL)
STATE = {k: v.contiguous() for k, v in MODEL.unet.state_dict().items()}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _loaded(model):
    """What a model that loads must be: a DiffusionModel whose weights are finite."""
    if model is not None:
        assert isinstance(model, DiffusionModel)
        assert all(torch.isfinite(p).all() for p in model.unet.parameters())


@budget(60)
@given(mutated(TINY.to_dict()))
def test_unet_configs(fields):
    cfg = refused_in_one_line(lambda: UNetConfig.from_dict(fields))
    assert cfg is None or isinstance(cfg, UNetConfig)


@budget(60)
@given(st.one_of(mutated(HEADER["schedule"]),
                 mutated({**HEADER["schedule"], "kind": "custom", "betas": [0.01] * 50})))
def test_schedule_configs(fields):
    schedule = refused_in_one_line(lambda: Schedule(ScheduleConfig.from_dict(fields)))
    assert schedule is None or torch.isfinite(schedule.alphas_cumprod).all()


@budget(40)
@given(mutated(HEADER["sampling"]))
def test_sampling_defaults(fields):
    refused_in_one_line(lambda: SamplingDefaults.from_dict(fields))


def _mutated_header():
    """The header of a model file with a field of it, or of one of its parts, made hostile."""
    parts = [k for k, v in HEADER.items() if isinstance(v, dict)]
    return st.one_of(
        mutated(HEADER),
        st.sampled_from(parts).flatmap(lambda part: mutated(HEADER[part]).map(
            lambda value: {**HEADER, part: value})))


@budget(40)
@given(_mutated_header())
def test_model_pt_headers(scratch, header):
    path = scratch / "model.pt"
    torch.save({**header, "state_dict": STATE}, path)
    _loaded(refused_in_one_line(lambda: checkpoint.load(path)))


@budget(40)
@given(st.one_of(_mutated_header().map(json.dumps), st.text(max_size=40),
                 VALUES.map(json.dumps)))
def test_safetensors_metadata(scratch, text):
    from safetensors.torch import save_file

    path = scratch / "model.safetensors"
    save_file(STATE, str(path), metadata={"fastddpm": text})
    _loaded(refused_in_one_line(lambda: checkpoint.load(path)))


@pytest.fixture(scope="module")
def diffusers_folder(scratch):
    folder = save_folder(MODEL, scratch / "diffusers")
    return folder, json.loads((folder / UNET_CONFIG).read_text()), \
        json.loads((folder / SCHEDULER_CONFIG).read_text())


@budget(40)
@given(st.data())
def test_diffusers_folder_configs(diffusers_folder, draw):
    folder, unet, scheduler = diffusers_folder
    which = draw.draw(st.sampled_from([UNET_CONFIG, SCHEDULER_CONFIG]))
    config = draw.draw(mutated(unet if which == UNET_CONFIG else scheduler))
    try:
        (folder / which).write_text(json.dumps(config))
        _loaded(refused_in_one_line(lambda: load_folder(folder)))
    finally:
        (folder / UNET_CONFIG).write_text(json.dumps(unet))
        (folder / SCHEDULER_CONFIG).write_text(json.dumps(scheduler))


def _damage(good: bytes, seed: int) -> bytes:
    """Truncated, bit-flipped or with bytes inserted: what a broken download or disk does."""
    rng = random.Random(seed)
    out = bytearray(good)
    kind = rng.randrange(3)
    if kind == 0:
        return bytes(out[:rng.randrange(len(out))])
    if kind == 1:
        for _ in range(rng.randrange(1, 9)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    else:
        at = rng.randrange(len(out))
        out[at:at] = rng.randbytes(rng.randrange(1, 24))
    return bytes(out)


def _bytes_of(save) -> bytes:
    buffer = io.BytesIO()
    save(buffer)
    return buffer.getvalue()


GOOD_FILES = {
    "model.pt": _bytes_of(lambda f: torch.save({**HEADER, "state_dict": STATE}, f)),
    "images.npz": _bytes_of(lambda f: np.savez(f, images=np.random.default_rng(0).integers(
        0, 256, (3, 8, 8), dtype=np.uint8))),
    "images_z.npz": _bytes_of(lambda f: np.savez_compressed(f, images=np.random.default_rng(1).random(
        (2, 1, 8, 8)).astype(np.float32))),
    "grey.png": _bytes_of(lambda f: Image.fromarray(np.random.default_rng(2).integers(
        0, 256, (9, 7), dtype=np.uint8)).save(f, format="PNG")),
    "colour.png": _bytes_of(lambda f: Image.fromarray(np.random.default_rng(3).integers(
        0, 256, (6, 8, 3), dtype=np.uint8)).save(f, format="PNG")),
}


@budget(80)
@given(st.sampled_from(sorted(GOOD_FILES)), st.integers(0, 2**32))
def test_damaged_files(scratch, name, seed):
    path = scratch / name
    path.write_bytes(_damage(GOOD_FILES[name], seed))
    if name.endswith(".pt"):
        _loaded(refused_in_one_line(lambda: checkpoint.load(path)))
        return
    x = refused_in_one_line(lambda: data.images(str(path), 8, 1))
    if x is not None:  # what reads is images in [-1, 1]
        assert x.shape[1:] == (1, 8, 8) and len(x) > 0 and x.abs().max() <= 1


@budget(60)
@given(st.lists(st.integers(0, 2**20), min_size=1, max_size=4), SCALARS.filter(lambda v: isinstance(v, str))
       | st.sampled_from(["<u1", "|u1", ">f8", "<f2", "<i8", "|b1", "<c8", "|O", "<U4", "|V8", "<M8[s]"]))
def test_npz_headers(scratch, shape, descr):
    """An .npz whose header says anything about a few bytes of data."""
    import zipfile

    header = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False,
                                                       "shape": tuple(shape)})
    except (ValueError, TypeError):  # numpy's own writer refuses to write it; craft it by hand
        text = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode()
        header = io.BytesIO(b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text)
    with zipfile.ZipFile(scratch / "h.npz", "w") as z:
        z.writestr("images.npy", header.getvalue() + bytes(range(256)) * 4)
    refused_in_one_line(lambda: data.images(str(scratch / "h.npz"), 8, 1))


@pytest.mark.parametrize("metadata", [
    "[1, 2]",  # a header that is JSON but no object
    json.dumps({**HEADER, "version": None}),  # a version that is no number
    json.dumps({**HEADER, "version": "2"}),
])
def test_found_by_fuzzing_model_headers(scratch, metadata):
    from safetensors.torch import save_file

    save_file(STATE, str(scratch / "found.safetensors"), metadata={"fastddpm": metadata})
    assert refused_in_one_line(lambda: checkpoint.load(scratch / "found.safetensors")) is None


@pytest.mark.parametrize("change", [
    {"_class_name": ["DDPMScheduler"]},  # a list where a name belongs (was: unhashable TypeError)
    {"beta_schedule": ["linear"]},
    {"beta_schedule": "sigmoid", "num_train_timesteps": 10**12},  # was: a 10^12-long table built
])
def test_found_by_fuzzing_scheduler_configs(diffusers_folder, change):
    folder, unet, scheduler = diffusers_folder
    try:
        (folder / SCHEDULER_CONFIG).write_text(json.dumps({**scheduler, **change}))
        assert refused_in_one_line(lambda: load_folder(folder)) is None
    finally:
        (folder / SCHEDULER_CONFIG).write_text(json.dumps(scheduler))


@pytest.mark.parametrize("key", LIST_FIELDS)
@pytest.mark.parametrize("value", [None, 3, "ab"])
def test_found_by_fuzzing_unet_lists(key, value):
    """A list field given as no list (was: TypeError from tuple(None))."""
    assert refused_in_one_line(lambda: UNetConfig.from_dict({**TINY.to_dict(), key: value})) is None
