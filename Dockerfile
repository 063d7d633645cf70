# fusedopt on a CUDA machine: `docker build -t fusedopt .` then
# `docker run --gpus all --rm fusedopt` checks every backend against the reference.
FROM nvidia/cuda:12.8.1-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-venv git \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install torch --index-url https://download.pytorch.org/whl/cu128

WORKDIR /opt/fusedopt
COPY . .
RUN pip install -e ".[test]"

CMD ["python", "-m", "fusedopt", "check"]
