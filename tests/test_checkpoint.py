"""Model files: round trips, atomic writes, and every kind of bad file refused in one line."""
import os
import pickle

import pytest
import torch
from tiny import TINY_ATTN, tiny_model

from fastddpm import checkpoint
from fastddpm.errors import UserError
from fastddpm.model import SamplingDefaults
from fastddpm.schedule import ScheduleConfig


@pytest.fixture
def model():  # with attention: its weights go through the file formats too
    return tiny_model(TINY_ATTN, ScheduleConfig("cosine", 50), SamplingDefaults("fixed_small", False))


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors"])
def test_round_trip(model, tmp_path, name):
    checkpoint.save(model, tmp_path / name)
    back = checkpoint.load(tmp_path / name)
    assert back.config == model.config
    assert back.schedule.config == model.schedule.config
    assert back.sampling == model.sampling
    assert torch.equal(back.schedule.betas, model.schedule.betas)
    for (k, a), (k2, b) in zip(model.unet.state_dict().items(), back.unet.state_dict().items(), strict=False):
        assert k == k2 and torch.equal(a, b)
    assert not back.unet.training
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp files left behind


def test_model_file_is_plain_data(model, tmp_path):
    checkpoint.save(model, tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["format"] == "fastddpm" and raw["version"] == checkpoint.VERSION
    assert raw["unet"] == TINY_ATTN.to_dict() and raw["schedule"]["kind"] == "cosine"


def test_failed_save_keeps_the_old_file(model, tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    path.write_bytes(b"previous good model")

    def exploding_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError):
        checkpoint.save(model, path)
    assert path.read_bytes() == b"previous good model"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        checkpoint.load(tmp_path / "absent.pt")


def test_truncated_file(model, tmp_path):
    checkpoint.save(model, tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        checkpoint.load(tmp_path / "cut.pt")


def test_truncated_safetensors(model, tmp_path):
    checkpoint.save(model, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(UserError, match="not a readable safetensors"):
        checkpoint.load(tmp_path / "cut.safetensors")


def test_garbage_file(tmp_path):
    (tmp_path / "g.pt").write_bytes(os.urandom(4096))
    with pytest.raises(UserError, match="truncated or corrupt"):
        checkpoint.load(tmp_path / "g.pt")


def test_unreadable_file(model, tmp_path, monkeypatch):
    checkpoint.save(model, tmp_path / "m.pt")
    os.chmod(tmp_path / "m.pt", 0)
    if os.geteuid() == 0:  # root reads files whatever their mode: make the check see what a user would
        monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match="permission denied"):
        checkpoint.load(tmp_path / "m.pt")


def test_not_a_fastddpm_model(tmp_path):
    torch.save({"something": torch.ones(3)}, tmp_path / "other.pt")
    with pytest.raises(UserError):
        checkpoint.load(tmp_path / "other.pt")
    torch.save({"format": "other", "state_dict": {}}, tmp_path / "tagged.pt")
    with pytest.raises(UserError, match="not a fastddpm model"):
        checkpoint.load(tmp_path / "tagged.pt")


class _RunsCode:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        torch.save({"format": "fastddpm", "state_dict": {}, "payload": _RunsCode(marker)}, f)
    with pytest.raises(UserError, match="safe loading refuses .io.open"):
        checkpoint.load(tmp_path / "evil.pt")
    assert not marker.exists()
    # and a raw pickle, not even a torch zip
    with open(tmp_path / "evil2.pt", "wb") as f:
        pickle.dump(_RunsCode(marker), f)
    with pytest.raises(UserError):
        checkpoint.load(tmp_path / "evil2.pt")
    assert not marker.exists()


def test_weights_that_do_not_fit_the_config(model, tmp_path):
    state = model.unet.state_dict()
    header = {"format": "fastddpm", "version": 1, "unet": TINY_ATTN.to_dict(),
              "schedule": model.schedule.config.to_dict()}
    bad_shape = dict(state, **{"conv_in.weight": torch.zeros(3, 1, 3, 3)})
    torch.save({**header, "state_dict": bad_shape}, tmp_path / "shape.pt")
    with pytest.raises(UserError, match="'conv_in.weight' has shape"):
        checkpoint.load(tmp_path / "shape.pt")
    missing = {k: v for k, v in state.items() if k != "conv_out.bias"}
    torch.save({**header, "state_dict": missing}, tmp_path / "missing.pt")
    with pytest.raises(UserError, match="missing weight 'conv_out.bias'"):
        checkpoint.load(tmp_path / "missing.pt")
    extra = dict(state, extra=torch.ones(1))
    torch.save({**header, "state_dict": extra}, tmp_path / "extra.pt")
    with pytest.raises(UserError, match="unexpected weight 'extra'"):
        checkpoint.load(tmp_path / "extra.pt")


def test_newer_format_version_is_refused(model, tmp_path):
    header = {"format": "fastddpm", "version": checkpoint.VERSION + 1, "unet": TINY_ATTN.to_dict(),
              "schedule": model.schedule.config.to_dict()}
    torch.save({**header, "state_dict": model.unet.state_dict()}, tmp_path / "new.pt")
    with pytest.raises(UserError, match="newer fastddpm"):
        checkpoint.load(tmp_path / "new.pt")


def test_save_into_missing_folder(model, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.save(model, tmp_path / "no" / "m.pt")


def test_saved_file_gets_the_modes_a_plain_open_would(model, tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    checkpoint.save(model, tmp_path / "m.pt")
    assert (tmp_path / "m.pt").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
