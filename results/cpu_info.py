"""Which host a cloud VM's "AMD EPYC" runs on today. The same VM has run on a Zen 3 host (AVX2, no
bf16 instructions) and on a Zen 5 one (family 26, AVX-512 with bf16), and a bfloat16 benchmark changes with it:
its step-cost curve was flat on one and grew 30x over 64 tokens on the other. Run it beside a log:
    python results/cpu_info.py
"""
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train import native_bfloat16  # noqa: E402


def cpu_info():
    """The first core's /proc/cpuinfo entries (empty off Linux)."""
    info = {}
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    return info


def main():
    info = cpu_info()
    flags = set(info.get("flags", "").split())
    print(f"cpu: {info.get('model name', platform.processor() or platform.machine())}")
    print(f"family {info.get('cpu family', '?')} model {info.get('model', '?')}, {os.cpu_count()} cores")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print("vector extensions: " + " ".join(sorted(f for f in flags if f.startswith(("avx", "amx"))) or ["none"]))
    print(f"bf16 matmul in hardware: {'yes' if native_bfloat16('cpu') else 'no'}")


if __name__ == "__main__":
    main()
