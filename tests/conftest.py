"""Triton kernels run under the numpy interpreter (TRITON_INTERPRET=1) on machines without a
CUDA device. Set here, before any test module imports triton: `triton.jit` reads the variable
when a kernel is defined, so setting it later has no effect.

The tiny models the tests share live in tiny.py (importable from every test module); the
fixtures here hand out the ones several modules load from a file."""
import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# backend="auto" (the default) would time every installed engine (an ONNX export, an OpenVINO
# conversion) for each new model and batch size: the suite's auto runs torch only (the auto
# tests lift this), and converted models go to a temp folder, not the user's cache
os.environ.setdefault("FASTDDPM_AUTO_ENGINES", "torch")
os.environ.setdefault("FASTDDPM_CACHE", tempfile.mkdtemp(prefix="fastddpm-test-cache-"))


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true",
                     help="fuzz suites (tests/test_fuzz_*.py): random seeds and 1000× the examples")


def pytest_configure(config):
    if config.getoption("--fuzz-long"):  # read by tests/fuzzing.py when the fuzz modules import
        os.environ["FASTDDPM_FUZZ_LONG"] = "1000"


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test. Chains of hundreds of tiny ops: on a busy 2-core
    machine a second thread spins and waits (measured 1 s → 20 s per chain). Runs compared byte
    for byte with one-thread torchrun workers: CPU convolutions may sum in a thread-dependent order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """Engines a module converts (OpenVINO IR, int8 graphs) go to a cache folder of the
    module's own: one conversion serves its tests, and no other module's entries are there."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTDDPM_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory):
    """tiny.TINY (1 channel, no attention, T = 50, weights of seed 0) as a model file."""
    from tiny import save_tiny  # here, not at the top: after TRITON_INTERPRET is set

    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny.pt")
