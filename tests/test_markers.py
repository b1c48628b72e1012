"""The suite's own markers (tests/conftest.py): ``cuda`` skips without a GPU, ``interpreter`` without the Triton
interpreter. Checked on a throwaway test file run by pytest with this suite's conftest."""
import os
import shutil
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

PROBE = '''
import pytest


@pytest.mark.cuda
def test_on_cuda():
    pass


@pytest.mark.interpreter
def test_on_interpreter():
    pass


def test_unmarked():
    pass
'''


def _outcomes(tmp_path, interpret):
    """{test name: PASSED or SKIPPED} of the probe file run with ``TRITON_INTERPRET=interpret``."""
    tmp_path.mkdir()
    shutil.copy(os.path.join(HERE, "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {**os.environ, "TRITON_INTERPRET": interpret, "PYTHONPATH": os.path.dirname(HERE)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-W",
                          "error::pytest.PytestUnknownMarkWarning", str(tmp_path)],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    found = {}
    for line in run.stdout.splitlines():  # "test_probe.py::test_on_cuda SKIPPED (needs a CUDA device) [ 33%]"
        if line.startswith("test_probe.py::"):
            name, outcome = line.split("::", 1)[1].split()[:2]
            found[name] = outcome
    return found


def test_the_cuda_and_interpreter_markers_skip_where_they_should(tmp_path):
    cuda = "PASSED" if torch.cuda.is_available() else "SKIPPED"
    with_interpreter = _outcomes(tmp_path / "on", "1")
    without = _outcomes(tmp_path / "off", "0")
    assert with_interpreter["test_unmarked"] == without["test_unmarked"] == "PASSED"
    assert with_interpreter["test_on_interpreter"] == "PASSED"
    assert without["test_on_cuda"] == with_interpreter["test_on_cuda"] == cuda
    assert without["test_on_interpreter"] == "SKIPPED"
