# sslscale for CUDA GPUs: the PyTorch base image with the tested torch (2.13.0, requirements.lock;
# the build stops if the base has another), DeepSpeed with its fused ops compiled at build time,
# the dependencies at their tested versions (requirements.lock), then the project (a regular,
# non-editable install); runs as a non-root user; entrypoint `sslscale`.
#
#   docker build -t sslscale .
#   docker run --gpus all --ipc=host --user "$(id -u):$(id -g)" -v "$PWD:/workspace" \
#     sslscale train configs/mae_vit_base_16.yaml
#
# Layers, most stable first, so that editing the code reinstalls only the project (seconds):
# base + user, DeepSpeed ops, the dependencies of pyproject.toml, then launcher/ and sslscale/.
# No GPU is needed to build: DS_ACCELERATOR=cuda makes DeepSpeed compile its CUDA ops for
# TORCH_CUDA_ARCH_LIST instead of probing for a device. For Slurm with pyxis/enroot:
# `sslscale submit ... --container-image=<registry>#sslscale:latest`; Apptainer: see README.
# Any uid can run it (pyxis and Apptainer use the caller's): caches live in /cache (mode 1777).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}
ARG BASE_IMAGE

# 8.0 A100, 8.6 A10 / RTX 30xx, 8.9 L4 / L40S, 9.0 H100 / H200.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
ARG USER_UID=1000
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/etc/sslscale/constraints.txt \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    XDG_CACHE_HOME=/cache \
    MPLCONFIGDIR=/cache/matplotlib \
    WANDB_CACHE_DIR=/cache/wandb \
    WANDB_CONFIG_DIR=/cache/wandb-config

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# libjpeg-turbo's headers: the data workers' JPEG box decoding (sslscale/data/jpeg_box.c,
# built below) decodes only the crop of each image.
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends gcc libjpeg-dev \
 && rm -rf /var/lib/apt/lists/*

# The user that runs sslscale (uid USER_UID, taken over from the base image's user of that uid
# if it has one), and caches any uid can write.
RUN existing="$(getent passwd "${USER_UID}" | cut -d: -f1)" \
 && if [ -n "${existing}" ]; then userdel --remove "${existing}" 2>/dev/null || userdel "${existing}"; fi \
 && useradd --create-home --uid "${USER_UID}" --shell /bin/bash sslscale \
 && mkdir -p /cache /workspace \
 && chmod 1777 /cache \
 && chown sslscale /workspace

# The tested versions: the base image's torch must be the one requirements.lock pins, and pip may
# never replace it (its exact version, CUDA tag included, becomes the pin). The constraint of every
# later install is the lock, less the packages the base image already has (torch's CUDA stack:
# triton, nvidia-*, sympy ...; pip keeps them as they are when they satisfy the requirements).
COPY requirements.lock /tmp/sslscale-requirements.lock
RUN tested="$(sed -n 's/^torch==\([^ ;#+]*\).*/\1/p' /tmp/sslscale-requirements.lock)" \
 && have="$(python -c 'import torch; print(torch.__version__)')" \
 && if [ "${have%%+*}" != "${tested}" ]; then \
      echo "error: ${BASE_IMAGE} has torch ${have}; sslscale is tested with torch ${tested} (requirements.lock): use a BASE_IMAGE with it" >&2; \
      exit 1; fi \
 && mkdir -p /etc/sslscale \
 && python -c "import re, sys; from importlib.metadata import distributions; \
norm = lambda n: re.sub(r'[-_.]+', '-', n).lower(); \
base = {norm(d.metadata['Name']) for d in distributions()}; \
lock = [l for l in open(sys.argv[1]).read().splitlines() if l and not l.startswith('#')]; \
print('\n'.join(['torch==' + sys.argv[2]] + [l for l in lock if norm(l.split('==')[0]) not in base]))" \
    /tmp/sslscale-requirements.lock "${have}" > /etc/sslscale/constraints.txt \
 && rm /tmp/sslscale-requirements.lock \
 && cat /etc/sslscale/constraints.txt

# DeepSpeed's fused Adam (GPU) and CPU Adam, compiled now rather than on first use in every job
# (DeepSpeed and ninja at their versions in requirements.lock, through PIP_CONSTRAINT).
# hadolint ignore=DL3013
RUN pip install ninja \
 && DS_ACCELERATOR=cuda DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 \
    pip install --no-build-isolation deepspeed \
 && DS_ACCELERATOR=cuda ds_report | grep -E "fused_adam|cpu_adam"

# The dependencies (and the gpu extra) named in pyproject.toml, before any code: this layer is
# rebuilt only when pyproject.toml changes.
COPY pyproject.toml /tmp/sslscale-pyproject.toml
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/sslscale-pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['gpu']))" > /tmp/sslscale-requirements.txt \
 && pip install -r /tmp/sslscale-requirements.txt \
 && rm /tmp/sslscale-requirements.txt

# The project: a regular install (its Slurm job template is package data); configs/ for reference.
WORKDIR /opt/sslscale
COPY pyproject.toml README.md LICENSE ./
COPY launcher ./launcher
COPY sslscale ./sslscale
RUN pip install --no-deps . \
 && rm -rf build ./*.egg-info \
 && sslscale --help > /dev/null \
 && python -I -c "from launcher.slurm import TEMPLATE; assert TEMPLATE.is_file(), TEMPLATE" \
 && python -I -c "from sslscale.data import jpeg_box; assert jpeg_box.available(), jpeg_box.unavailable()" \
 && chmod -R a+rX /cache/torch_extensions
COPY configs ./configs

USER ${USER_UID}
WORKDIR /workspace
ENTRYPOINT ["sslscale"]
CMD ["--help"]
