"""Launch each attention variant of ``benchmarks/attention.py`` a fixed number of times, for Nsight Compute.

    ncu --clock-control none -k regex:'_fwd_kernel|_mt_pass1|_key_mass|_decode|flash|fmha|cudnn' \
        --launch-skip-before-match 0 --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section SchedulerStats python benchmarks/attention_profile.py --n 2880

Each variant runs once to compile, then ``--launches`` more times; the variant names are printed in launch order
(with ``--nvtx`` ncu also labels them by the NVTX range of the same name).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from attention import DEV, DT, D, H, edits_for  # noqa: E402
from mmattn.kernels.triton_attention import triton_attention  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2880)
    parser.add_argument("--kv", type=int, default=8192, help="KV length of the decode cases")
    parser.add_argument("--launches", type=int, default=1)
    args = parser.parse_args()
    g = torch.Generator(device=DEV).manual_seed(args.n)
    q, k, v = (torch.randn(1, H, args.n, D, device=DEV, dtype=DT, generator=g) for _ in range(3))
    _, variants = edits_for(args.n, args.n, g)
    cases = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    for name, edit in variants.items():
        cases[name] = lambda edit=edit: triton_attention(q, k, v, scale=D**-0.5, causal=True, edit=edit)
    qd = torch.randn(1, H, 1, D, device=DEV, dtype=DT, generator=g)
    kd, vd = (torch.randn(1, H, args.kv, D, device=DEV, dtype=DT, generator=g) for _ in range(2))
    _, dvariants = edits_for(args.kv, 1, g)
    var = dvariants["mmattn+mass_transfer(VAR rows)"]
    var = type(var)(**{**var.__dict__, "row_start": None, "group_bias": dvariants["mmattn+group_bias"].group_bias,
                       "head_scale": 0.5 + torch.rand(1, H, device=DEV, generator=g)})
    cases["decode sdpa"] = lambda: F.scaled_dot_product_attention(qd, kd, vd)
    cases["decode mmattn"] = lambda: triton_attention(qd, kd, vd, scale=D**-0.5, causal=True)
    cases["decode mmattn+VAR"] = lambda: triton_attention(qd, kd, vd, scale=D**-0.5, causal=True, edit=var)
    for name, fn in cases.items():
        fn()
    torch.cuda.synchronize()
    for name, fn in cases.items():
        print(f"profiled variant: {name}", flush=True)
        torch.cuda.nvtx.range_push(name)
        for _ in range(args.launches):
            fn()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()


if __name__ == "__main__":
    main()
