"""Launch the three local-attention kernels twice at one shape (bf16, k 7, default configs), for
Nsight Compute: the first forward+backward compiles and warms, the second is the one to profile.

    ncu --clock-control none --section SpeedOfLight --section Occupancy -k regex:_local_attn \\
        --launch-skip 3 --launch-count 3 python bench/gpu_profile.py 32 56 56 8 8
"""
import os
import sys

os.environ.setdefault("SASA_TRITON_AUTOTUNE", "0")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

import sasa_triton  # noqa: E402

B, H, W, heads, D = (int(a) for a in sys.argv[1:6])
qkv = torch.randn(B, H, W, 3, heads, D, device="cuda", dtype=torch.bfloat16)
leaves = [t.detach().clone().requires_grad_() for t in qkv.unbind(3)]
leaves += [torch.randn(7, D // 2, device="cuda", requires_grad=True),
           torch.randn(7, D - D // 2, device="cuda", requires_grad=True)]
dy = torch.randn_like(leaves[0])
for _ in range(2):
    torch.autograd.grad(sasa_triton.local_attention2d(*leaves), leaves, dy)
torch.cuda.synchronize()
