"""The optional ahead-of-time build of the CUDA extension (metadata lives in pyproject.toml).

``pip install .`` and ``pip install -e .`` stay pure Python and fast: the extension is then
compiled on first use into the user's cache (``fusedopt.build``). With
``FUSEDOPT_BUILD_CUDA=1 pip install .`` it is compiled now, into the package
(``fusedopt/_C*.so``, with ``fusedopt/_C.build`` naming the torch and CUDA it was built
against; the backend uses it only with that torch). Architectures: ``TORCH_CUDA_ARCH_LIST``,
else sm_80 and sm_90 plus the visible GPUs'. In pip's isolated build environment torch and
ninja are requested as build requirements; ``--no-build-isolation`` builds against the
installed torch instead (the usual choice: the build must match the torch it runs with).
"""

import importlib.util
import json
import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _build_module():
    """fusedopt/build.py loaded by path (importing the package would import torch first)."""
    spec = importlib.util.spec_from_file_location("_fusedopt_build", HERE / "fusedopt" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_setup():
    try:
        import torch  # noqa: F401
    except ImportError:
        # Requirement discovery of an isolated build: pip installs these and runs setup again.
        return setup(setup_requires=["torch", "ninja"])

    build = _build_module()
    home = build.find_cuda_home()
    if home is None:
        raise RuntimeError("FUSEDOPT_BUILD_CUDA=1: " + build.cannot_build())
    os.environ.setdefault("CUDA_HOME", str(home))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build.arch_list())

    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    class BuildWithStamp(BuildExtension):
        """Build, then write ``_C.build`` next to the library: the torch it belongs to."""

        def run(self):
            super().run()
            for ext in self.extensions:
                stamp = Path(self.get_ext_fullpath(ext.name)).with_name("_C.build")
                stamp.write_text(json.dumps({
                    "torch": torch.__version__,
                    "cuda": torch.version.cuda,
                    "archs": os.environ["TORCH_CUDA_ARCH_LIST"],
                }))

    sources = [str(p.relative_to(HERE)) for p in build.sources(HERE / "csrc")]
    extension = CUDAExtension(
        "fusedopt._C",
        sources,
        extra_compile_args={"cxx": list(build.CFLAGS), "nvcc": list(build.CUDA_CFLAGS)},
    )
    return setup(ext_modules=[extension], cmdclass={"build_ext": BuildWithStamp})


if os.environ.get("FUSEDOPT_BUILD_CUDA", "").strip() in ("1", "true", "yes"):
    _cuda_setup()
else:
    setup()
