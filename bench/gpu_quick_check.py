"""A short GPU check of the local-attention op without pytest: correctness against float64 at the
default configs (every gradient; windows up to k = 15, dilation 2, both paddings, shared/per-head/no
tables, fp32/fp16/bf16), then timing at the four ResNet-50 stages (B 32, k 7, bf16) against a
cuDNN 3x3 conv, and the host time per call. Prints one line per check; exits 1 on a mismatch.

The verdict is the test suite's own contract (tests/helpers.py: assert_close_to_reference against
PyTorch computing the same function in the kernel's dtype, its tables cast to that dtype as
autocast would); the printed ratio is the kernel's RMS error over that yardstick's.

    SASA_TRITON_AUTOTUNE=0 python bench/gpu_quick_check.py [--no-timing | --timing-only]
"""
import os
import sys
import time

os.environ.setdefault("SASA_TRITON_AUTOTUNE", "0")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

import sasa_triton  # noqa: E402
from sasa_triton.reference import local_attention2d as reference  # noqa: E402
from tests.helpers import assert_close_to_reference, reference_in_dtype  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
# A dry run of the script's own logic without a GPU: TRITON_INTERPRET=1 QUICK_CHECK_DEVICE=cpu ... --max-cases 1
dev = os.environ.get("QUICK_CHECK_DEVICE", "cuda")
bad = 0


def check(B, H, W, heads, D, k, d, padding, rel, dtype, seed=0):
    global bad
    gen = torch.Generator().manual_seed(seed)
    q, key, v = (torch.randn(B, H, W, heads, D, generator=gen, dtype=torch.float64) for _ in range(3))
    lead = (heads,) if rel == "per_head" else ()
    rr = torch.randn(*lead, k, D // 2, generator=gen, dtype=torch.float64) * 0.5 if rel else None
    rc = torch.randn(*lead, k, D - D // 2, generator=gen, dtype=torch.float64) * 0.5 if rel else None
    low = [t.to(dtype) for t in (q, key, v)] + [None if t is None else t.float() for t in (rr, rc)]
    ins = [None if t is None else t.to(dev).requires_grad_() for t in low]
    r64 = [None if t is None else t.to(dev, torch.float64).requires_grad_() for t in low]  # float64 on the GPU
    kw = dict(kernel_size=k, dilation=d, scale=0.5, padding=padding)
    y = sasa_triton.local_attention2d(*ins, backend="triton", **kw)
    y64 = reference(*r64, **kw)
    dy = torch.randn(y64.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(y, [t for t in ins if t is not None], dy.to(dev, dtype))
    grads64 = torch.autograd.grad(y64, [t for t in r64 if t is not None], dy.to(dev))
    # PyTorch's own result in the dtype on the same inputs: the scale of what is allowed.
    rl = [None if t is None else t.detach().to(dev).requires_grad_() for t in low]
    yl = reference_in_dtype(*rl, **kw)
    gl = torch.autograd.grad(yl, [t for t in rl if t is not None], dy.to(dev, dtype))
    worst, failed = 0.0, []
    names = ["y", "dq", "dk", "dv", "drel_rows", "drel_cols"]
    for name, a, e, l in zip(names, [y, *grads], [y64, *grads64], [yl, *gl]):
        try:
            assert_close_to_reference(a, e, l, dtype, name)
        except AssertionError as error:
            failed.append(name)
            print(f"  MISMATCH {error}")
        a, e, l = a.detach().double().cpu(), e.detach().double().cpu(), l.detach().double().cpu()
        err = (a - e).pow(2).mean().sqrt().item()
        base = (l - e).pow(2).mean().sqrt().item() + 1e-7 * e.pow(2).mean().sqrt().item()
        worst = max(worst, err / base if torch.isfinite(a).all() else float("inf"))
    bad += bool(failed)
    print(f"{'BAD' if failed else 'ok '} B{B} {H}x{W} h{heads} D{D} k{k} d{d} {padding} {rel} {str(dtype)[6:]}: "
          f"worst RMS error {worst:.2f}x PyTorch's own in that dtype", flush=True)


cases = []
for D, HW in ((8, 56), (16, 28), (32, 14), (64, 7)):
    cases.append((2, HW, HW, 8, D, 7, 1, "zeros", "shared", torch.bfloat16))
for dtype in (torch.bfloat16, torch.float16):
    for k, d in ((3, 1), (7, 2), (11, 1), (15, 1)):  # radius >= 5: where the old dq went wrong
        cases.append((2, 19, 21, 2, 32, k, d, "zeros", "shared", dtype))
cases.append((2, 13, 11, 2, 16, 7, 1, "mask", "per_head", torch.bfloat16))
cases.append((2, 9, 10, 2, 128, 7, 1, "zeros", None, torch.bfloat16))
cases.append((2, 28, 28, 8, 16, 7, 1, "zeros", "shared", torch.float32))
cases.append((2, 19, 21, 2, 32, 15, 1, "mask", "shared", torch.float32))
start = time.time()
if "--max-cases" in sys.argv:
    cases = cases[-int(sys.argv[sys.argv.index("--max-cases") + 1]):]  # the last ones are the smallest
if "--timing-only" not in sys.argv:
    for case in cases:
        check(*case)
    print(f"correctness: {len(cases) - bad}/{len(cases)} ok in {time.time() - start:.0f} s", flush=True)

if "--no-timing" not in sys.argv:
    from triton.testing import do_bench
    print(torch.cuda.get_device_name(), "bf16, B 32, k 7, 8 heads, default configs; median ms of do_bench")
    copy_src = torch.empty(2 ** 28, device=dev, dtype=torch.bfloat16)
    copy_dst = torch.empty_like(copy_src)
    ms = do_bench(lambda: copy_dst.copy_(copy_src), rep=100)
    bandwidth = 2 * copy_src.numel() * 2 / ms / 1e9  # TB/s
    print(f"copy bandwidth {bandwidth:.2f} TB/s")
    for C, HW in ((64, 56), (128, 28), (256, 14), (512, 7)):
        heads, D = 8, C // 8
        qkv = torch.randn(32, HW, HW, 3, heads, D, device=dev, dtype=torch.bfloat16)
        q, k_, v = qkv.unbind(3)
        rr = torch.randn(7, D // 2, device=dev)
        rc = torch.randn(7, D - D // 2, device=dev)
        fwd = do_bench(lambda: sasa_triton.local_attention2d(q, k_, v, rr, rc), rep=100)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k_, v, rr, rc)]
        dy = torch.randn_like(q)

        def fwd_bwd():
            torch.autograd.grad(sasa_triton.local_attention2d(*leaves), leaves, dy)
        both = do_bench(fwd_bwd, rep=100)
        layer = sasa_triton.SelfAttention2d(C, C, 7).to(dev, torch.bfloat16).to(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(C, C, 3, padding=1, bias=False).to(dev, torch.bfloat16).to(memory_format=torch.channels_last)
        x = torch.randn(32, C, HW, HW, device=dev, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        x.requires_grad_(True)
        layer_ms = do_bench(lambda: layer(x).sum().backward(), rep=100)
        conv_ms = do_bench(lambda: conv(x).sum().backward(), rep=100)
        roof_ms = 4 * 32 * HW * HW * C * 2 / (bandwidth * 1e12) * 1e3
        print(f"{HW}x{HW}x{C}: op fwd {fwd * 1e3:.1f} us ({roof_ms / fwd:.1%} of roofline {roof_ms * 1e3:.1f} us), "
              f"fwd+bwd {both * 1e3:.1f} us ({both / fwd:.1f}x fwd); layer fwd+bwd {layer_ms:.3f} ms, "
              f"conv3x3 fwd+bwd {conv_ms:.3f} ms ({layer_ms / conv_ms:.1f}x)", flush=True)
    # Host time per call at 7x7 (enqueue only): the Python path plus Triton's launcher.
    qkv = torch.randn(32, 7, 7, 3, 8, 64, device=dev, dtype=torch.bfloat16)
    q, k_, v = qkv.unbind(3)
    rr, rc = torch.randn(7, 32, device=dev), torch.randn(7, 32, device=dev)
    with torch.no_grad():
        for _ in range(50):
            sasa_triton.local_attention2d(q, k_, v, rr, rc)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(500):
            sasa_triton.local_attention2d(q, k_, v, rr, rc)
        host_us = (time.perf_counter() - start) / 500 * 1e6
        torch.cuda.synchronize()
    print(f"host time per forward call at 7x7x512 (enqueue, no grad): {host_us:.1f} us")
sys.exit(1 if bad else 0)
