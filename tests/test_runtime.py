"""The sampling loop: wiring against a hand-written loop, determinism, batch-size independence."""
import pytest
import torch
from tiny import tiny_config, tiny_model

from fastddpm import kernels
from fastddpm.errors import UserError
from fastddpm.kernels.noise import INIT_STREAM, STEP_STREAM
from fastddpm.runtime import Sampler, sample
from fastddpm.schedule import ScheduleConfig

# 2 channels (neither grey nor RGB: no channel count is assumed) and attention
TWO_CHANNELS = tiny_config(2, attention=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model(TWO_CHANNELS, ScheduleConfig("linear", 100))


@pytest.mark.parametrize("sampler,eta", [("ddpm", None), ("ddim", 0.5), ("dpm++", None), ("dpm++3m", None),
                                         ("unipc3", None), ("ipndm", None), ("ipndm2", None)])
def test_loop_equals_hand_written_loop(model, sampler, eta):
    steps, seed, num = 12, 1234, 3
    table = model.table(sampler=sampler, steps=steps, eta=eta)
    shape = (2, 8, 8)
    index = torch.arange(num)
    x = kernels.gaussian(seed, index, 0, shape, INIT_STREAM)
    history = []  # x̂0 (ε for iPNDM) of the earlier steps, newest first
    eps_history = table.history_kind == "eps"
    with torch.no_grad():
        for i, t in enumerate(table.timesteps.tolist()):
            eps = model.unet(x, torch.full((num,), t))
            z = kernels.gaussian(seed, index, i, shape, STEP_STREAM)
            x, x0 = kernels.reverse_step_reference(x, eps, table.coef[i].float(), z, history, table.clip,
                                                   eps_history=eps_history)
            history = [eps if eps_history else x0, *history][:table.history]
    got = sample(model, num=num, steps=steps, sampler=sampler, eta=eta, seed=seed, device="cpu",
                 dtype="fp32")
    assert got.shape == (num, 2, 8, 8) and got.dtype == torch.float32
    torch.testing.assert_close(got, x.clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_same_seed_same_images_whatever_the_batch_size(model):
    kwargs = dict(num=5, steps=10, sampler="ddpm", seed=7, device="cpu")
    whole = sample(model, **kwargs)
    assert torch.isfinite(whole).all() and whole.abs().max() <= 1.0
    assert torch.equal(whole, sample(model, **kwargs))
    for batch_size in (1, 2, 4):
        # equal up to float rounding: convolution algorithms may differ with the batch size
        # (with a random network; an untrained one with large weights amplifies rounding chaotically)
        torch.testing.assert_close(sample(model, batch_size=batch_size, **kwargs), whole,
                                   rtol=0, atol=1e-5)
    other = sample(model, **{**kwargs, "seed": 8})
    assert (other - whole).abs().mean() > 0.1


def test_samples_are_distinct_within_a_batch(model):
    x = sample(model, num=4, steps=5, seed=3, device="cpu")
    flat = x.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(4) * 1e9).min() > 0.1


def test_on_step_sees_every_predicted_x0(model):
    runner = Sampler(model, sampler="ddim", steps=6, device="cpu")
    seen = []
    final = runner.run(seed=0, first=0, batch=2, on_step=lambda i, x0: seen.append((i, x0.clone())))
    assert [i for i, _ in seen] == list(range(6))
    torch.testing.assert_close(seen[-1][1], final)  # the last step returns its x̂0
    assert not torch.allclose(seen[0][1], seen[-1][1])


@pytest.mark.parametrize("sampler,history", [("ddpm", 0), ("ddim", 0), ("dpm++", 1), ("dpm++3m", 2),
                                             ("unipc3", 3), ("ipndm", 3)])
def test_x0_is_stored_only_where_it_is_read(model, sampler, history, monkeypatch):
    """A multistep sampler keeps its x̂0's in a ring of `table.history` slots, and on_step reads
    each step's x̂0 from there; otherwise x̂0 is written only for on_step — also beside an ε
    ring (iPNDM), which holds no x̂0. The images are the same either way, and on_step sees the
    reference's x̂0 of every step."""
    x0_in_ring = history > 0 and sampler != "ipndm"
    seen = []
    real = kernels.reverse_step

    def recording(x, eps, coef, step, rng, ring=None, clip=False, **kw):
        seen.append((0 if ring is None else ring.shape[0], kw["x0_out"] is not None))
        return real(x, eps, coef, step, rng, ring, clip, **kw)

    monkeypatch.setattr(kernels, "reverse_step", recording)
    runner = Sampler(model, sampler=sampler, steps=5, device="cpu", dtype="fp32")  # distinct sums
    plain = runner.run(seed=2, first=0, batch=2)
    assert seen == [(history, False)] * 5
    seen.clear()
    x0s = []
    watched = runner.run(seed=2, first=0, batch=2, on_step=lambda i, x0: x0s.append(x0.clone()))
    assert seen == [(history, not x0_in_ring)] * 5
    torch.testing.assert_close(watched, plain, rtol=0, atol=0)
    torch.testing.assert_close(x0s[-1], watched)  # the last step returns its x̂0
    assert len({x0.sum().item() for x0 in x0s}) == 5  # each step's own x̂0, not a stale slot


@pytest.mark.parametrize("kwargs,message", [
    ({"num": 0}, "num must be positive"),
    ({"batch_size": 0}, "batch size must be positive"),
    ({"device": "tpu"}, "device"),
    ({"device": "cuda"} if not torch.cuda.is_available() else {"device": "cuda:99"}, "cuda"),
    ({"dtype": "fp8"}, "unknown dtype"),
    ({"sampler": "euler"}, "unknown sampler"),
    ({"steps": 101}, "steps must be between 1 and 100"),
    ({"eta": -0.1, "sampler": "ddim"}, "eta must be in"),
    ({"eta": 0.5}, "η is a DDIM option"),  # DDPM (the default) takes no η: was silently dropped
    ({"eta": 0.0, "sampler": "dpm++"}, "η is a DDIM option"),
    ({"seed": -1}, "seed must be in"),
    ({"backend": "jax"}, "unknown backend"),
])
def test_bad_arguments(model, kwargs, message):
    with pytest.raises(UserError, match=message):
        sample(model, **{"num": 2, "steps": 3, "device": "cpu", **kwargs})


@pytest.mark.slow
def test_compiled_backend_matches_eager(model):
    kwargs = dict(num=2, steps=4, sampler="ddim", seed=5, device="cpu", dtype="fp32")
    torch.testing.assert_close(sample(model, backend="compile", **kwargs), sample(model, **kwargs),
                               rtol=0, atol=1e-5)


def test_low_precision_sampling_leaves_the_model_in_fp32(model):
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    kwargs = dict(num=2, steps=4, sampler="ddim", seed=5, device="cpu")
    low = sample(model, dtype="bf16", **kwargs)
    full = sample(model, dtype="fp32", **kwargs)
    assert torch.isfinite(low).all() and (low - full).abs().max() < 0.1
    for k, v in model.unet.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k]), k
