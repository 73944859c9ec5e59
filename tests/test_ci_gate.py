"""The CI gate of conftest.py: under CI=true a plain skip of a test not marked
`cuda` fails the run, a `cuda`-marked skip and a NotApplicable (tests/skips.py)
stay skips."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CASES = '''
import pytest
from skips import not_applicable

def test_plain_skip():
    pytest.skip("a broken install would look like this")

@pytest.mark.cuda
def test_cuda_skip():
    pytest.skip("no device")

def test_by_design():
    not_applicable("does not apply here")
'''


def test_ci_gate(tmp_path):
    for name in ("conftest.py", "skips.py"):
        shutil.copy(HERE / name, tmp_path / name)
    (tmp_path / "test_cases.py").write_text(CASES)
    env = dict(os.environ, CI="true")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "test_cases.py"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout
    assert r.returncode == 1, out
    assert "FAILED test_cases.py::test_plain_skip" in out, out
    assert "1 failed, 2 skipped" in out, out
