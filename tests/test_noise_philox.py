"""Philox4x32-10's words: both implementations against Random123's known answers, the CPU one
(numpy) equal to the torch reference bit for bit on random counters and seeds, and the CPU noise
drawn through it equal to the noise drawn through the reference."""
import pytest
import torch

from fastddpm.kernels import noise

M = 0xFFFFFFFF
# Random123's kat_vectors for philox4x32_10: (key0, key1), (counter), the four output words
KNOWN = [((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
         ((M, M), (M, M, M, M), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
         ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
          (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
IMPLEMENTATIONS = {"reference": noise.philox4x32, "numpy": noise.philox4x32_numpy}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("key, counter, want", KNOWN, ids=["zeros", "ones", "pi"])
def test_known_answers(impl, key, counter, want):
    words = IMPLEMENTATIONS[impl](key[0] | key[1] << 32, *(torch.tensor([c]) for c in counter))
    assert [int(w) for w in words] == list(want)


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 12345, 2**64 - 1])
def test_numpy_words_equal_the_reference(seed):
    g = torch.Generator().manual_seed(seed % 1000)
    counters = [torch.randint(0, 2**32, (3, 50), generator=g, dtype=torch.int64) for _ in range(4)]
    counters[1] = counters[1][:1].expand(3, 50)  # broadcast views, as the sampler passes its step
    want = noise.philox4x32(seed, *counters)
    got = noise.philox4x32_numpy(seed, *counters)
    for g_word, w_word in zip(got, want, strict=True):
        assert g_word.dtype == torch.int64 and g_word.shape == (3, 50)
        assert torch.equal(g_word, w_word)
    assert len({int(w[0, 0]) for w in got}) == 4  # four different words, not one copied


def test_cpu_noise_is_the_reference_noise(monkeypatch):
    seed, samples, shape = 2**40 + 5, torch.arange(3, 6), (3, 5, 7)  # 105: the last draw cut
    fast = noise.gaussian(seed, samples, 4, shape)
    by_step = noise.step_noise(torch.tensor([seed, 3]), torch.tensor([4]), 3, shape)
    monkeypatch.setattr(noise, "philox4x32_numpy", noise.philox4x32)
    reference = noise.gaussian(seed, samples, 4, shape)
    assert fast.shape == (3, *shape) and torch.isfinite(fast).all() and fast.std() > 0.5
    assert torch.equal(fast, reference) and torch.equal(by_step, reference)
