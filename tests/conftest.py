import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from skips import NotApplicable  # noqa: E402


def cuda_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


requires_cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tiny_pair_fp32():
    """(dLLM, verifier) of the shipped tiny pair, loaded in fp32, with one
    intra-op thread while the module runs: the tiny models' GEMMs are far too
    small to gain from more, and on a loaded machine extra threads only wait
    on each other."""
    import apd_ext
    from apd_ext import tiny

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    d, a = tiny.paths()
    yield apd_ext.load_model(d, dtype=torch.float32), apd_ext.load_model(a, dtype=torch.float32)
    torch.set_num_threads(threads)


def pytest_configure(config):
    # Without pytest-timeout the pyproject `timeout` is ignored (a warning
    # only) and a looping test hangs CI: in CI, refuse to run without it.
    if in_ci() and not config.pluginmanager.hasplugin("timeout"):
        raise pytest.UsageError("CI: pytest-timeout is not installed, so no test would time out; "
                                "install it (the Makefile's deps line lists it)")


def pytest_collection_modifyitems(config, items):
    # A helper imported into a test module under a test_* name (e.g.
    # `from apd_ext.tiny import test_file`) would be collected as a test that
    # "passes": only functions defined in the test file itself are tests.
    strays = [item.nodeid for item in items
              if isinstance(item, pytest.Function) and item.module is not None
              and getattr(item.function, "__module__", item.module.__name__) != item.module.__name__]
    if strays:
        raise pytest.UsageError("collected functions that are not defined in their test module "
                                f"(import them under another name): {strays}")
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not cuda_available():
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Under CI a skip hides a broken install (an importorskip that no longer
    # imports, a missing data file): only tests marked `cuda` may skip, since
    # CI has no GPU. Any other skip is turned into a failure that says why.
    outcome = yield
    rep = outcome.get_result()
    by_design = call.excinfo is not None and call.excinfo.errisinstance(NotApplicable)  # tests/skips.py
    if rep.skipped and in_ci() and "cuda" not in item.keywords and not hasattr(rep, "wasxfail") and not by_design:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"CI: a test not marked `cuda` was skipped ({reason}); under CI=true only CUDA tests may skip"
