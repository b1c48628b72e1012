"""setup.py's CUDA toolkit discovery and its fallback to the CPU-only extension (functions tested directly)."""
import importlib.util
import os
import pathlib
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup_module():
    spec = importlib.util.spec_from_file_location("iwm_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: setup() does not run
    return module


setup_py = _setup_module()


def _toolkit(tmp_path):
    home = tmp_path / "cuda-13.0"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "include" / "cuda_runtime_api.h").write_text("")
    (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
    return home


def test_nvcc_link_on_path_is_resolved_to_its_toolkit(tmp_path):
    home = _toolkit(tmp_path)
    (tmp_path / "bin").mkdir()
    os.symlink(home / "bin" / "nvcc", tmp_path / "bin" / "nvcc")
    found, problem = setup_py.find_cuda_home({}, lambda name: str(tmp_path / "bin" / "nvcc"))
    assert found == str(home) and problem is None  # torch alone would take tmp_path, which has no headers


def test_cuda_home_is_used_or_named_as_the_problem(tmp_path):
    home = _toolkit(tmp_path)
    assert setup_py.find_cuda_home({"CUDA_HOME": str(home)}, lambda name: None) == (str(home), None)
    found, problem = setup_py.find_cuda_home({"CUDA_HOME": str(tmp_path)}, lambda name: None)
    assert found is None and "set CUDA_HOME" in problem and "\n" not in problem


def test_nvcc_without_a_toolkit_says_what_to_set(tmp_path):
    (tmp_path / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "nvcc").chmod(0o755)
    found, problem = setup_py.find_cuda_home({}, lambda name: str(tmp_path / "nvcc"))
    assert found is None and "set CUDA_HOME" in problem


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_the_real_nvcc_leads_to_headers():
    found, problem = setup_py.find_cuda_home({}, shutil.which)
    assert problem is None and os.path.isfile(os.path.join(found, "include", "cuda_runtime_api.h"))


def test_unset_switch_falls_back_to_cpu_without_a_toolkit(tmp_path, capsys):
    env = {}
    assert setup_py._want_cuda(None, "13.0", env, lambda name: str(tmp_path / "nvcc")) is False
    assert "building the CPU-only extension" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="IWM_FAST_CUDA=1"):
        setup_py._want_cuda("1", "13.0", env, lambda name: str(tmp_path / "nvcc"))
    home = _toolkit(tmp_path)
    assert setup_py._want_cuda(None, "13.0", env, lambda name: str(home / "bin" / "nvcc")) is True
    assert env["CUDA_HOME"] == str(home)


class _Compiler:
    compile = _compile = None
    src_extensions = [".c"]


def _base(fail_names):
    class Base:
        built = []

        def __init__(self, extensions):
            self.extensions, self.compiler = extensions, _Compiler()

        def build_extensions(self):
            if self.extensions[0] in fail_names:
                self.compiler.compile = "wrapped"
                raise RuntimeError("Error compiling objects for extension\nnvcc fatal: unsupported gpu")
            Base.built.append(self.extensions[0])

    return Base


def test_failed_cuda_build_is_followed_by_the_cpu_build(capsys):
    build = setup_py._fallback_build_ext(_base({"cuda"}), "cpu", forced=False)(["cuda"])
    build.build_extensions()
    assert build.built == ["cpu"] and build.compiler.compile is None
    assert "the CUDA build failed (nvcc fatal: unsupported gpu)" in capsys.readouterr().err
    forced = setup_py._fallback_build_ext(_base({"cuda"}), "cpu", forced=True)(["cuda"])
    with pytest.raises(RuntimeError):
        forced.build_extensions()
