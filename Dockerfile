# GPU worker image: the same install as `make setup`, with a CUDA build of torch instead of the CPU one.
# Build: docker build -t crawl2chat .      Run: docker run --gpus all -v $PWD/artifacts:/app/artifacts crawl2chat run --preset small
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
        git libmagic1 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
RUN python3 -m venv /venv && /venv/bin/pip install --upgrade pip \
    && /venv/bin/pip install torch==2.13.0 --index-url $TORCH_INDEX \
    && /venv/bin/pip install -e .
ENV PATH=/venv/bin:$PATH
ENTRYPOINT ["crawl2chat"]
