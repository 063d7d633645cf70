# fusedopt on a CUDA machine, with the CUDA extension built ahead of time.
#
#   docker build -t fusedopt .
#   docker run --gpus all --rm fusedopt            # check every backend, then the quick benchmark
#   docker run --gpus all --rm -v "$PWD/out:/out" fusedopt \
#       python -m fusedopt bench --json /out/bench.json --plot /out/bench.png
#
# The base image's CUDA (13.0) is the CUDA of the torch build installed below (PyPI's default
# torch wheels are CUDA 13 builds), which the extension must match. Build for other GPUs with
# --build-arg TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0".
FROM nvidia/cuda:13.0.1-devel-ubuntu24.04

ARG TORCH_VERSION=2.14.1
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" setuptools wheel ninja

# Build the extension into the installed package (fusedopt/_C*.so with its _C.build stamp);
# the source tree is removed afterwards so that nothing shadows the installed package.
COPY . /tmp/fusedopt
RUN cd /tmp/fusedopt \
    && FUSEDOPT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
       pip install --no-build-isolation ".[test]" \
    && rm -rf /tmp/fusedopt \
    && python -c "from fusedopt import build; assert build.prebuilt(), 'the CUDA extension was not installed'"

WORKDIR /workspace
CMD ["sh", "-c", "python -m fusedopt info && python -m fusedopt check && python -m fusedopt bench --quick"]
