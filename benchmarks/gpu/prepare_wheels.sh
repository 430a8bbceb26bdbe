#!/usr/bin/env bash
# Download the wheels benchmarks/gpu/run.sh installs on the GPU machine, which has no network (docs/gpu.md).
#   benchmarks/gpu/prepare_wheels.sh [DEST]        # default benchmarks/gpu/wheels/ (git-ignored; carry it)
# Binary wheels only, for that machine: CPython 3.12, manylinux x86_64, --no-deps (each dependency named here).
# Its image already has torch 2.11 (CUDA 13), transformers, safetensors, sentencepiece, pyarrow, scipy, sacrebleu,
# tensorboard, matplotlib, pyyaml, tqdm, pytest and pytest-timeout; these are the project's other imports.
# Not carried: deepspeed (PyPI has only an sdist, built at install time) and flash-attn (sdist, needs nvcc and a
# long CUDA build): without them ZeRO is not checked on the GPU and attention uses PyTorch's fused kernels.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-$here/wheels}
mkdir -p "$dest"
packages=(
  webdataset==1.0.2 braceexpand==0.1.7            # shards (hs_scale.data)
  soundfile==0.14.0 cffi==2.0.0 pycparser==2.23     # audio I/O (libsndfile bundled in the wheel)
  kaldi-native-fbank==1.23.0                        # filterbank features
  espeakng-loader==0.2.4                            # speech synthesis for the corpora
  jiwer==4.0.0 rapidfuzz==3.14.6                    # WER
  babel==2.19.0                                     # language names
  megatron-core==0.16.1                             # tensor / pipeline parallelism (pyproject: >=0.16,<0.17)
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${packages[@]}"
ls -1 "$dest"
du -sh "$dest"
