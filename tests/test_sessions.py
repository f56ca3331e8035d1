"""Long-lived sessions: a second sample() call, a second Sampler, a fresh load of the same file and
a Pipeline pay no second engine build (counted); a model changed in place is rebuilt; the caches
stay bounded; the content hash sees every weight and config and is not recomputed per call."""
import pytest
import torch
from tiny import TINY, tiny_model

import fastddpm
from fastddpm import Pipeline, sessions
from fastddpm.backends import Backend, _registry, register_backend
from fastddpm.runtime import Sampler, sample

KW = dict(num=2, steps=3, sampler="ddim", device="cpu")


@pytest.fixture
def counting(monkeypatch):
    """A backend 'test-sessions' (plain torch ε) that counts its builds."""
    builds = []

    def make(model, device, dtype, threads):
        builds.append(model)
        unet = model.unet

        def denoise(x, t):
            with torch.no_grad():
                return unet(x.float(), t).to(x.dtype)
        return denoise

    register_backend(Backend("test-sessions", make))
    sessions.clear()
    yield builds
    sessions.clear()
    _registry.pop("test-sessions")


def test_second_sample_call_builds_nothing(counting):
    model = tiny_model(TINY)
    first = sample(model, backend="test-sessions", seed=1, **KW)
    again = sample(model, backend="test-sessions", seed=1, **KW)
    other = sample(model, backend="test-sessions", seed=2, **KW)
    assert len(counting) == 1
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    Sampler(model, backend="test-sessions", steps=5, device="cpu")  # another table, same engine
    assert len(counting) == 1


def test_same_file_loaded_again_hits_the_cache(counting, tiny_model_file):
    sample(str(tiny_model_file), backend="test-sessions", **KW)
    sample(str(tiny_model_file), backend="test-sessions", **KW)
    assert len(counting) == 1


def test_a_changed_model_is_rebuilt(counting):
    model = tiny_model(TINY)
    before = sample(model, backend="test-sessions", **KW)
    with torch.no_grad():
        next(model.unet.parameters()).add_(0.5)
    after = sample(model, backend="test-sessions", **KW)
    assert len(counting) == 2
    assert not torch.equal(before, after)
    # a second object with the first one's weights must not get the changed object's engine
    fresh = tiny_model(TINY)
    torch.testing.assert_close(sample(fresh, backend="test-sessions", **KW), before, rtol=0, atol=0)


def test_each_engine_setting_is_its_own_entry(counting):
    model = tiny_model(TINY)
    sample(model, backend="test-sessions", threads=1, **KW)
    sample(model, backend="test-sessions", threads=2, **KW)
    sample(model, backend="test-sessions", dtype="bf16", **KW)
    assert len(counting) == 3


def test_caches_are_bounded(counting):
    for seed in range(sessions.DENOISERS.size + 2):
        sample(tiny_model(TINY, seed=seed), backend="test-sessions", **KW)
    assert len(sessions.DENOISERS.values()) == sessions.DENOISERS.size
    assert len(sessions.SAMPLERS.values()) == sessions.SAMPLERS.size


def test_pipeline_builds_once_and_matches_sample(counting):
    model = tiny_model(TINY)
    pipe = fastddpm.Pipeline(model, backend="test-sessions", device="cpu", sampler="ddim", steps=3)
    a = pipe.sample(2, seed=4)
    b = pipe.sample(2, seed=4, steps=3)
    assert len(counting) == 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, sample(model, backend="test-sessions", seed=4, **KW), rtol=0, atol=0)
    assert pipe.sample(3, seed=4, batch_size=2).shape == (3, 1, 8, 8)
    assert "Pipeline" in fastddpm.__all__ and isinstance(pipe, Pipeline)


def test_hash_sees_weights_and_configs_and_is_kept(monkeypatch):
    model = tiny_model(TINY)
    key = sessions.model_hash(model)
    assert sessions.model_hash(tiny_model(TINY)) == key  # content, not identity
    assert sessions.model_hash(tiny_model(TINY, seed=1)) != key
    # the weights are hashed once per change: a second call reads no tensor bytes
    hashed = []
    real = sessions.hashlib.sha256

    def spy(*args):
        hashed.append(1)
        return real(*args)

    monkeypatch.setattr(sessions.hashlib, "sha256", spy)
    assert sessions.model_hash(model) == key
    assert len(hashed) == 1  # only the small (digest, configs) hash
    monkeypatch.undo()
    with torch.no_grad():
        model.unet.state_dict(keep_vars=True)[next(iter(model.unet.state_dict()))].mul_(1.0001)
    assert sessions.model_hash(model) != key
    from fastddpm.schedule import ScheduleConfig

    other_schedule = tiny_model(TINY, ScheduleConfig("linear", 60))
    assert sessions.model_hash(other_schedule) != key
