"""FID and IS mechanics with torch-fidelity's InceptionV3 architecture, randomly initialised and
saved in the test (no download): a set against itself, a shifted set, the sharded reduction under
torchrun (2 gloo processes) against torch-fidelity's own single-process functions, and bad input."""
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import types
from unittest import mock

import numpy as np
import pytest
import torch

from fastddpm import fid, inception, shards
from fastddpm.checkpoint import load
from fastddpm.cli import main

if importlib.util.find_spec("torch_fidelity") is None:
    pytest.skip("needs torch-fidelity: pip install --no-deps 'torch-fidelity>=0.4,<0.5'",
                allow_module_level=True)

NUM, CHUNK = 10, 5  # IS needs 10 samples (10 splits); two chunks, one per rank
# torch-fidelity's smallest FID features: the same code as the standard 2048, but the network
# stops after its first block and Σ₁Σ₂'s eigenvalues are a 64² problem, not a 2048² one
DIMS = 64


@pytest.fixture(autouse=True)
def one_thread(monkeypatch, tmp_path):
    """Inception on one thread, here and in each torchrun worker (CPU convolutions may sum in a
    thread-dependent order; the sharded comparison is at 1e-6), and a private statistics cache."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path / "cache"))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """torch-fidelity's InceptionV3, randomly initialised (He-normal convolutions, so features
    neither vanish nor blow up through its ~100 layers), saved as a plain state dict."""
    module = inception._module()

    class Unloaded(module.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True):  # keep the random weights
            return None

    torch.manual_seed(0)
    with mock.patch.object(module, "load_state_dict_from_url", lambda *a, **k: {}):
        net = Unloaded(inception.NAME, [str(inception.FEATURE_DIM)])
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "inception.pt"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def torch_fidelity_metrics():
    """torch-fidelity's metric_fid / metric_isc modules. Their package imports torchvision (which
    does not load beside a CPU torch); the two functions used here need none of it, so the
    module they import helpers from is stood in for while they load."""
    inception._module()  # the bare torch_fidelity package entry
    stub = types.ModuleType("torch_fidelity.utils")
    for name in ("get_cacheable_input_name", "cache_lookup_one_recompute_on_miss",
                 "extract_featuresdict_from_input_id_cached", "create_feature_extractor",
                 "resolve_feature_extractor", "resolve_feature_layer_for_metric"):
        setattr(stub, name, None)
    with mock.patch.dict(sys.modules, {"torch_fidelity.utils": stub}):
        return (importlib.import_module("torch_fidelity.metric_fid"),
                importlib.import_module("torch_fidelity.metric_isc"))


def _images(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def _npz(path, images) -> str:
    np.savez(path, images=images)
    return str(path)


def _eval(capsys, *argv) -> dict:
    assert main(["eval", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_set_against_itself_is_zero_and_a_shifted_set_is_not(tmp_path, weights, capsys):
    a = _images(1, 4)
    same = _eval(capsys, "--fid", "--samples", _npz(tmp_path / "a.npz", a),
                 "--ref", str(tmp_path / "a.npz"), "--inception-weights", str(weights),
                 "--fid-dims", str(DIMS), "--batch-size", "2", "--device", "cpu")
    assert same["num"] == 4 and same["ref_num"] == 4 and same["ref_statistics"] == "computed"
    shifted = _eval(capsys, "--fid", "--samples",
                    _npz(tmp_path / "b.npz", np.clip(a.astype(int) + 60, 0, 255).astype(np.uint8)),
                    "--ref", str(tmp_path / "a.npz"), "--inception-weights", str(weights),
                    "--fid-dims", str(DIMS), "--batch-size", "2", "--device", "cpu")
    assert shifted["ref_statistics"].startswith("cache ")  # the reference was measured once
    assert abs(same["fid"]) < 1e-6 * shifted["fid"] and shifted["fid"] > 1e-3


@pytest.mark.slow  # torchrun starts three Python processes
def test_the_sharded_reduction_is_torch_fidelitys_value(tmp_path, weights, torch_fidelity_metrics):
    metric_fid, metric_isc = torch_fidelity_metrics
    samples = _npz(tmp_path / "s.npz", _images(2, NUM))
    # reference statistics as torch-fidelity makes them, from made-up features
    ref = metric_fid.fid_features_to_statistics(torch.randn(40, DIMS, dtype=torch.float64) + 0.5)
    np.savez(tmp_path / "ref.npz", mu=ref["mu"], sigma=ref["sigma"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "fastddpm", "eval", "--fid", "--isc",
                           "--samples", samples, "--ref", str(tmp_path / "ref.npz"),
                           "--inception-weights", str(weights), "--fid-dims", str(DIMS),
                           "--batch-size", str(CHUNK), "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)  # rank 0 alone prints
    assert got["world"] == 2 and got["num"] == NUM and got["fid_dims"] == DIMS

    # one process, torch-fidelity's functions, the same chunks (the features are bit-equal)
    net = inception.Inception(weights, torch.device("cpu"), DIMS, logits=True)
    images = fid.read_images(samples)
    parts = [net.features(images[i:i + CHUNK]) for i in range(0, NUM, CHUNK)]
    pool, logits = torch.cat([p for p, _ in parts]), torch.cat([lg for _, lg in parts])
    want_fid = metric_fid.fid_statistics_to_metric(metric_fid.fid_features_to_statistics(pool), ref,
                                                   verbose=False)[metric_fid.KEY_METRIC_FID]
    want_isc = metric_isc.isc_features_to_metric(logits)  # splits 10, shuffled with seed 2020
    assert got["fid"] == pytest.approx(want_fid, rel=1e-6)
    assert got["isc_mean"] == pytest.approx(want_isc[metric_isc.KEY_METRIC_ISC_MEAN], rel=1e-6)
    assert got["isc_std"] == pytest.approx(want_isc[metric_isc.KEY_METRIC_ISC_STD], rel=1e-6)


def test_inception_score_matches_torch_fidelity_on_random_logits(torch_fidelity_metrics):
    _, metric_isc = torch_fidelity_metrics
    logits = torch.randn(37, 1008, dtype=torch.float64) * 3
    mean, std = fid.inception_score(logits)
    want = metric_isc.isc_features_to_metric(logits)
    assert mean == pytest.approx(want[metric_isc.KEY_METRIC_ISC_MEAN], rel=1e-12)
    assert std == pytest.approx(want[metric_isc.KEY_METRIC_ISC_STD], rel=1e-9)


def test_sums_give_numpys_mean_and_covariance():
    features = torch.randn(50, 7, dtype=torch.float64) + 3
    sums = fid.FeatureSums(7)
    sums.add(features[:20])
    sums.add(features[20:])
    mu, sigma = sums.statistics()
    np.testing.assert_allclose(mu, features.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features.numpy(), rowvar=False), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["missing ref", "unreadable ref", "not inception", "pickle code",
                                  "one sample", "isc too few"])
def test_bad_input_is_one_line(tmp_path, weights, capsys, case):
    a = _npz(tmp_path / "a.npz", _images(3, 4))
    argv = ["eval", "--fid", "--samples", a, "--ref", a, "--inception-weights", str(weights),
            "--device", "cpu"]
    if case == "missing ref":
        argv[argv.index("--ref") + 1] = str(tmp_path / "nope.npz")
        expect = "not found"
    elif case == "unreadable ref":
        (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a zip at all")
        argv[argv.index("--ref") + 1] = str(tmp_path / "bad.npz")
        expect = "not a readable .npz"
    elif case == "not inception":
        torch.save({"conv.weight": torch.randn(3, 3)}, tmp_path / "w.pt")
        argv[argv.index("--inception-weights") + 1] = str(tmp_path / "w.pt")
        expect = "not an InceptionV3 state dict"
    elif case == "pickle code":
        class Boom:
            def __reduce__(self):
                return (os.system, ("touch " + str(tmp_path / "ran"),))
        torch.save({"x": Boom()}, tmp_path / "evil.pt")
        argv[argv.index("--inception-weights") + 1] = str(tmp_path / "evil.pt")
        expect = "safe loading refuses"
    elif case == "one sample":
        argv[argv.index("--samples") + 1] = _npz(tmp_path / "one.npz", _images(4, 1))
        argv[argv.index("--ref") + 1] = str(tmp_path / "stats.npz")
        np.savez(tmp_path / "stats.npz", mu=np.zeros(DIMS), sigma=np.eye(DIMS))
        argv += ["--fid-dims", str(DIMS)]
        expect = "at least 2 samples"
    else:
        argv = ["eval", "--isc", "--samples", a, "--inception-weights", str(weights), "--device", "cpu"]
        expect = "at least 10 samples"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(argv) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.strip().splitlines()) == 1 and expect in out.err, out.err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, no cache
    assert not (tmp_path / "ran").exists()


def test_samples_drawn_on_the_fly_measure_as_the_same_samples_on_disk(tmp_path, weights, capsys,
                                                                      tiny_model_file):
    """--model draws exactly the images `fastddpm sample` writes (same seed, same batches), so the
    FID over them equals the FID over the .npz written beforehand."""
    sampling = ["--sampler", "ddim", "--steps", "3", "--seed", "7", "--batch-size", "3",
                "--device", "cpu", "--backend", "torch"]
    ref = _npz(tmp_path / "ref.npz", _images(5, 4)[..., :1])
    assert main(["sample", "--model", str(tiny_model_file), "-n", "5", "--out",
                 str(tmp_path / "s.npz"), "--no-progress", *sampling]) == 0
    capsys.readouterr()
    common = ["--fid", "--ref", ref, "--inception-weights", str(weights), "--fid-dims", str(DIMS)]
    on_disk = _eval(capsys, *common, "--samples", str(tmp_path / "s.npz"), "--batch-size", "3",
                    "--device", "cpu")
    drawn = _eval(capsys, *common, "--model", str(tiny_model_file), "-n", "5", *sampling)
    assert drawn["fid"] == on_disk["fid"] and drawn["num"] == on_disk["num"] == 5
    assert (drawn["seed"], drawn["sampler"], drawn["steps"]) == (7, "ddim", 3)
    assert drawn["dtype"] == "fp32"  # what --dtype auto is under the torch backend, on any CPU
    assert drawn["model_hash"] == shards.model_hash(load(str(tiny_model_file)))

