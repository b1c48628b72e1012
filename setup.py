"""Build and install iwm-fast (metadata and dependencies: pyproject.toml).

The C++/CUDA block-mask sampler (csrc/) is built as ``iwm_fast._C`` with torch's extension tools: a
CppExtension with a CPU-only torch, a CUDAExtension where torch has CUDA and the CUDA toolkit is found.
``IWM_FAST_CUDA=1`` forces the CUDA build (a failure is an error), ``IWM_FAST_CUDA=0`` skips it,
``IWM_FAST_NO_EXT=1`` skips the extension altogether (the package then samples masks in Python). Unset, a CUDA
build that fails falls back to the CPU-only extension with one line saying so.

The toolkit: ``CUDA_HOME`` (or ``CUDA_PATH``) when set; else the folder of ``nvcc`` on PATH with symbolic links
resolved, or, where ``nvcc`` is a wrapper script, the folder nvcc itself reports; it must hold
``include/cuda_runtime_api.h``. torch alone takes the parent of nvcc's folder on PATH, which for
``/usr/local/bin/nvcc`` is ``/usr/local``, where the headers are not.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

HEADER = os.path.join("include", "cuda_runtime_api.h")


def _has_headers(home):
    return bool(home) and os.path.isfile(os.path.join(home, HEADER))


def _reported_home(nvcc):
    """The toolkit folder nvcc reports in a dry run (``_HERE_`` is its real bin folder), or None."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        open(src, "w").close()
        try:
            run = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    found = re.search(r"^#\$ _HERE_=(.+)$", run.stdout + run.stderr, re.MULTILINE)
    return os.path.dirname(found.group(1).strip()) if found else None


def find_cuda_home(environ=os.environ, which=shutil.which):
    """(toolkit folder or None, one line saying what is wrong when a toolkit was looked for and not found)."""
    home = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    if home:
        return (home, None) if _has_headers(home) else \
            (None, f"CUDA_HOME={home} has no {HEADER}; set CUDA_HOME to the CUDA toolkit folder")
    nvcc = which("nvcc")
    if nvcc is None:
        return ("/usr/local/cuda", None) if _has_headers("/usr/local/cuda") else (None, None)
    for home in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), _reported_home(nvcc)):
        if _has_headers(home):
            return home, None
    return None, (f"nvcc is at {nvcc} but no CUDA toolkit with {HEADER} was found from it; set CUDA_HOME to the "
                  "toolkit folder (the one holding bin/nvcc and include/)")


def _say(line):
    print(f"iwm-fast: {line}", file=sys.stderr, flush=True)


def _want_cuda(switch, torch_cuda, environ=os.environ, which=shutil.which):
    """Whether to build the CUDA extension; sets CUDA_HOME for torch's build tools when it found the toolkit."""
    if switch == "0" or (switch is None and torch_cuda is None):
        return False
    if switch == "1" and torch_cuda is None:
        raise SystemExit("iwm-fast: IWM_FAST_CUDA=1 but this torch has no CUDA; install a CUDA build of torch")
    home, problem = find_cuda_home(environ, which)
    if home is None:
        if switch == "1":
            raise SystemExit(f"iwm-fast: IWM_FAST_CUDA=1 but {problem or 'no nvcc was found on PATH'}")
        if problem:
            _say(f"{problem}; building the CPU-only extension")
        return False
    environ["CUDA_HOME"] = home  # read by torch.utils.cpp_extension when it is imported, below
    return True


def _fallback_build_ext(base, cpu_extension, forced):
    """``base`` (torch's BuildExtension) whose CUDA build, when it fails and CUDA was not forced, is followed by a
    build of the CPU-only extension instead."""

    class BuildWithFallback(base):
        def build_extensions(self):
            compiler = self.compiler  # torch's build_extensions wraps its compile methods: undone for the retry
            saved = (compiler.compile, getattr(compiler, "_compile", None), list(compiler.src_extensions))
            try:
                return super().build_extensions()
            except Exception as e:  # compiler, linker and ninja errors arrive as several exception types
                if forced:
                    raise
                last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
                _say(f"the CUDA build failed ({last}); building the CPU-only extension (set IWM_FAST_CUDA=1 to "
                     "make this an error)")
            compiler.compile, compiler._compile, compiler.src_extensions = saved
            self.extensions = [cpu_extension]
            return super().build_extensions()

    return BuildWithFallback


def _extensions():
    if os.environ.get("IWM_FAST_NO_EXT") == "1":
        return [], {}
    cpp = sorted(glob.glob("csrc/*.cpp"))
    if not cpp:
        return [], {}
    import torch

    switch = os.environ.get("IWM_FAST_CUDA")
    use_cuda = _want_cuda(switch, torch.version.cuda)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx = ["-O3", "-std=c++20", "-fopenmp"]  # torch >= 2.10 headers use C++20
    common = dict(include_dirs=[os.path.abspath("csrc")], extra_link_args=["-fopenmp"])
    cpu = CppExtension("iwm_fast._C", cpp, extra_compile_args={"cxx": cxx}, **common)
    if not use_cuda:
        return [cpu], {"build_ext": BuildExtension.with_options(use_ninja=True)}
    nvcc = ["-O3", "-std=c++17", "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    ext = CUDAExtension("iwm_fast._C", cpp + sorted(glob.glob("csrc/*.cu")),
                        extra_compile_args={"cxx": cxx + ["-DIWM_FAST_WITH_CUDA"], "nvcc": nvcc}, **common)
    build = _fallback_build_ext(BuildExtension, cpu, forced=switch == "1")
    return [ext], {"build_ext": build.with_options(use_ninja=True)}


if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
    setup(
        packages=find_packages(include=["iwm_fast", "iwm_fast.*"]) + ["iwm_fast.kernels"],
        package_dir={"iwm_fast.kernels": "kernels"},
        package_data={"iwm_fast": ["py.typed"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
