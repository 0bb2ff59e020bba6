#!/usr/bin/env bash
# Installs NVIDIA's CUDA 13.0 compiler toolchain (nvcc, ptxas and the headers the kernels include) from
# PyPI wheels into a virtual environment, so cuda/ compiles to ptx/ and ptxas checks the PTX on machines
# without a GPU or a CUDA install. 13.0 matches the lent GPU machines' driver (580): the PTX it emits loads
# there. Idempotent; prints the `export PATH=...` line to eval:
#   eval "$(scripts/cuda-toolchain.sh)"
set -euo pipefail
dir=${CUDA_TOOLCHAIN_DIR:-$HOME/.cache/cuda-toolchain-13.0}
if [[ ! -x $dir/cu13/bin/ptxas || ! -x $dir/cu13/bin/nvcc ]]; then
  python3 -m venv "$dir/py" >&2
  "$dir/py/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-nvvm==13.0.*" "nvidia-cuda-cccl==13.0.*" >&2
  site=$("$dir/py/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  ln -sfn "$site/nvidia/cu13" "$dir/cu13"
fi
echo "export PATH=$dir/cu13/bin:\$PATH"
