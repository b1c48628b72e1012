"""Build and install iwm-fast.

The C++/CUDA block-mask sampler (csrc/) is built as ``iwm_fast._C`` with torch's extension tools:
a CppExtension with a CPU-only torch, a CUDAExtension where torch has CUDA and nvcc is found.
``IWM_FAST_CUDA=1`` forces the CUDA build, ``IWM_FAST_CUDA=0`` skips it,
``IWM_FAST_NO_EXT=1`` skips the extension altogether (the package then samples masks in Python).
"""
import glob
import os
import shutil

from setuptools import find_packages, setup


def _extensions():
    if os.environ.get("IWM_FAST_NO_EXT") == "1":
        return [], {}
    cpp = sorted(glob.glob("csrc/*.cpp"))
    if not cpp:
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

    switch = os.environ.get("IWM_FAST_CUDA")
    has_nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    use_cuda = switch == "1" or (switch is None and torch.version.cuda is not None and has_nvcc)
    if switch == "1" and torch.version.cuda is None:
        raise RuntimeError("IWM_FAST_CUDA=1 but this torch has no CUDA; install a CUDA build of torch")
    cxx = ["-O3", "-std=c++20", "-fopenmp"]  # torch >= 2.10 headers use C++20
    common = dict(include_dirs=[os.path.abspath("csrc")], extra_link_args=["-fopenmp"])
    if use_cuda:
        nvcc = ["-O3", "-std=c++17", "-gencode=arch=compute_80,code=sm_80",
                "-gencode=arch=compute_90,code=sm_90"]
        ext = CUDAExtension("iwm_fast._C", cpp + sorted(glob.glob("csrc/*.cu")),
                            extra_compile_args={"cxx": cxx + ["-DIWM_FAST_WITH_CUDA"], "nvcc": nvcc}, **common)
    else:
        ext = CppExtension("iwm_fast._C", cpp, extra_compile_args={"cxx": cxx}, **common)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="iwm-fast",
    version="0.1.0",
    description="Custom-kernel training engine for Image World Models (IWM) and I-JEPA",
    python_requires=">=3.10",
    packages=find_packages(include=["iwm_fast", "iwm_fast.*"]) + ["iwm_fast.kernels"],
    package_dir={"iwm_fast.kernels": "kernels"},
    package_data={"iwm_fast": ["py.typed"]},
    install_requires=[
        "torch>=2.5",
        "triton>=3.1",
        "numpy>=1.24",
        "pybind11>=2.10",
        "pyyaml>=6",
        "scikit-learn>=1.2",
        "pillow>=9",
        "matplotlib>=3.6",
        "tensorboard>=2.12",
        "tqdm>=4.60",
        "xxhash>=3",                # checkpoint checksums (iwm_fast/train/checkpoint.py says why not SHA-256)
    ],
    extras_require={
        "dev": ["pytest>=7", "ninja", "ruff>=0.5", "pre-commit>=3"],
        "flash": ["flash-attn>=2.5"],
        "xformers": ["xformers>=0.0.25"],
    },
    entry_points={
        "console_scripts": [
            "iwm-train=iwm_fast.train.cli:train_main",
            "iwm-eval=iwm_fast.train.cli:eval_main",
            "iwm-bench=iwm_fast.bench.run:main",
            "iwm-make-shards=iwm_fast.data.make_shards:main",
            "iwm-finetune=iwm_fast.finetune.cli:main",
        ]
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
