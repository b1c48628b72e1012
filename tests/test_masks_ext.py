"""Build checks of csrc/: the CUDA kernels compile with nvcc for sm_80 and sm_90; CMake + ctest of the CPU sampler."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_cuda_kernels_compile_for_sm80_and_sm90(tmp_path):
    cmd = [NVCC, "-std=c++17", "-O3", "-c", os.path.join(ROOT, "csrc", "block_masks.cu"), "-I",
           os.path.join(ROOT, "csrc"), "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
           "-Werror", "all-warnings", "-o", str(tmp_path / "block_masks.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    listing = subprocess.run([shutil.which("cuobjdump") or "cuobjdump", "--list-elf", str(tmp_path / "block_masks.o")],
                             capture_output=True, text=True) if shutil.which("cuobjdump") else None
    if listing is not None and listing.returncode == 0:
        assert "sm_80" in listing.stdout and "sm_90" in listing.stdout, listing.stdout


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_and_ctest_of_cpu_sampler(tmp_path):
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [["cmake", "-S", ROOT, "-B", str(build), "-DIWM_FAST_CUDA=OFF", *gen],
             ["cmake", "--build", str(build), "--parallel", "2"],
             ["ctest", "--test-dir", str(build), "--output-on-failure"]]
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    assert "100% tests passed" in res.stdout
