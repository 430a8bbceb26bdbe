"""What the GPU check ran on: Python, torch, CUDA, the GPU, and which attention kernels this process can use.

    python benchmarks/gpu/env_report.py [--json PATH]

Runs anywhere (on a CPU machine it says so). The attention facts come from hs_scale.selection.backends, the
module that chooses the kernel, so the report and the model cannot disagree.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys

import torch

from hs_scale.selection.backends import BACKENDS, available_kernels, resolve_backend

# Packages the project imports that the GPU image may lack (then carried as wheels, benchmarks/gpu/wheels/).
PACKAGES = ("transformers", "safetensors", "sentencepiece", "webdataset", "soundfile", "kaldi-native-fbank",
            "jiwer", "babel", "megatron-core", "deepspeed", "flash-attn", "pytest", "pytest-timeout")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def report() -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cuda_available": cuda,
        "packages": package_versions(),
        "attention_kernels": available_kernels(device),
        # What each configurable backend becomes here in bf16 (the dtype of the GPU runs).
        "attention_backend_bf16": {name: resolve_backend(name, device, torch.bfloat16) for name in BACKENDS},
    }
    if cuda:
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_GiB": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "count": torch.cuda.device_count(),
        }
    return info


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    info = report()
    text = json.dumps(info, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return info


if __name__ == "__main__":
    main()
