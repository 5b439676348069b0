# sslscale for CUDA GPUs: the PyTorch base image (its torch is kept), DeepSpeed with its fused
# ops compiled at build time, the project installed; entrypoint `sslscale`.
#
#   docker build -t sslscale .
#   docker run --gpus all --ipc=host -v "$PWD:/workspace" sslscale train configs/mae_vit_base_16.yaml
#
# No GPU is needed to build: DS_ACCELERATOR=cuda makes DeepSpeed compile its CUDA ops for
# TORCH_CUDA_ARCH_LIST instead of probing for a device. For Slurm with pyxis/enroot:
# `sslscale submit ... --container-image=<registry>#sslscale:latest`; Apptainer: see README.
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

# 8.0 A100, 8.6 A10 / RTX 30xx, 8.9 L4 / L40S, 9.0 H100 / H200.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
ARG DEEPSPEED_VERSION=0.19.8
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/etc/sslscale/constraints.txt \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Keep the base image's torch: pip must never replace it with another build.
RUN mkdir -p /etc/sslscale \
 && python -c "import torch; print(f'torch=={torch.__version__}')" > /etc/sslscale/constraints.txt \
 && cat /etc/sslscale/constraints.txt

# DeepSpeed's fused Adam (GPU) and CPU Adam, compiled now rather than on first use in every job.
RUN pip install ninja==1.13.0 \
 && DS_ACCELERATOR=cuda DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 \
    pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" \
 && DS_ACCELERATOR=cuda ds_report | grep -E "fused_adam|cpu_adam"

# The project, editable: `sslscale submit` reads its job template from slurm/ beside the code.
WORKDIR /opt/sslscale
COPY pyproject.toml README.md ./
COPY launcher ./launcher
COPY sslscale ./sslscale
COPY slurm ./slurm
COPY configs ./configs
RUN pip install -e ".[gpu]" \
 && sslscale --help > /dev/null

WORKDIR /workspace
ENTRYPOINT ["sslscale"]
CMD ["--help"]
