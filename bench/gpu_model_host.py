"""Where an eager model step's host time goes, module by module (issue 12).

On the H200 VM (bench/RESULTS.md, 2026-11-30 15:45 UTC) an eager SASA-ResNet-50 inference step
(B 32, bf16 autocast) enqueued in 8.5 ms against ResNet-50's 4.8 ms, with as many convolutions
and batch norms per step: 16 attention layers at their measured ~100 us per call do not explain
the 3.7 ms. This times one step of each model with every unit of it timed in place: a forward
pre-hook and a forward hook on each leaf module and on each SelfAttention2d (whose projection is
then not hooked on its own), summed per module type, so the table says which calls the
difference sits in and what one call costs inside the model, where it may cost more than alone
(other tensors, autocast, allocator state). "outside the units" is the rest of the step (the
blocks' own Python, the residual adds, the hooks' own cost). Then the SASA step once more with
the attention kernels' launches replaced by no-ops: if the step's enqueue time drops by far more
than 16 launches cost, the launches wait on something.

    python bench/gpu_model_host.py              # CUDA, B 32, 224 x 224, bf16 autocast
    TRITON_INTERPRET=1 MODEL_HOST_DRY=1 python bench/gpu_model_host.py   # the logic on a CPU (tiny, meaningless times)
"""
import collections
import os
import sys
import time

os.environ.setdefault("SASA_TRITON_AUTOTUNE", "0")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from sasa_triton import SelfAttention2d, models  # noqa: E402
from sasa_triton.ops import local_attention as op  # noqa: E402

DRY = os.environ.get("MODEL_HOST_DRY") == "1"
DEVICE = "cpu" if DRY else "cuda"
BATCH, SIZE = (1, 32) if DRY else (32, 224)
sync = (lambda: None) if DRY else torch.cuda.synchronize


def step_fn(net, images):
    def step():
        with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
            return net(images)
    return step


def enqueue_ms(step, steps=10, rounds=5) -> float:
    """Fastest of `rounds` of `steps` steps: wall milliseconds per step to enqueue (the GPU
    synchronised before each round)."""
    steps, rounds = (1, 1) if DRY else (steps, rounds)
    best = float("inf")
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - start) / steps * 1e3)
    sync()
    return best


def units(net):
    """The modules timed in place: SelfAttention2d layers whole, every other leaf module."""
    inside_attention = {id(m) for layer in net.modules() if isinstance(layer, SelfAttention2d)
                        for m in layer.modules() if m is not layer}
    return [m for m in net.modules() if id(m) not in inside_attention
            and (isinstance(m, SelfAttention2d) or not any(True for _ in m.children()))]


def attribute(net, step, steps=10) -> tuple:
    """({module type: (calls per step, us per call)}, ms per step with the hooks on)."""
    totals, calls, starts = collections.defaultdict(float), collections.Counter(), {}

    def before(module, args):
        starts[id(module)] = time.perf_counter()

    def after(module, args, output):
        name = type(module).__name__
        totals[name] += time.perf_counter() - starts.pop(id(module))
        calls[name] += 1

    handles = [h for m in units(net) for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        step()
        sync()
        totals.clear(), calls.clear()
        steps = 1 if DRY else steps
        start = time.perf_counter()
        for _ in range(steps):
            step()
        step_ms = (time.perf_counter() - start) / steps * 1e3
        sync()
    finally:
        for handle in handles:
            handle.remove()
    return {name: (calls[name] / steps, totals[name] / calls[name] * 1e6) for name in totals}, step_ms


def main() -> int:
    print("cpu (dry run)" if DRY else torch.cuda.get_device_name(), "torch", torch.__version__,
          "triton", __import__("triton").__version__)
    print(f"eager inference step, B {BATCH}, {SIZE}x{SIZE}, bf16 autocast, channels_last, default configs")
    images = torch.randn(BATCH, 3, SIZE, SIZE, device=DEVICE).contiguous(memory_format=torch.channels_last)
    for name, kwargs in (("resnet50", {}), ("sasa_resnet50", dict(stem="conv", backend="triton"))):
        net = getattr(models, name)(**kwargs).to(DEVICE, memory_format=torch.channels_last).eval()
        step = step_fn(net, images)
        for _ in range(1 if DRY else 5):
            step()
        plain = enqueue_ms(step)
        table, hooked = attribute(net, step)
        print(f"\n{name}: {plain:.2f} ms per step to enqueue ({hooked:.2f} ms with the hooks on)")
        print(f"  {'unit':<18} {'calls/step':>10} {'us/call':>9} {'ms/step':>8}")
        inside = 0.0
        for unit, (count, us) in sorted(table.items(), key=lambda kv: -kv[1][0] * kv[1][1]):
            inside += count * us / 1e3
            print(f"  {unit:<18} {count:>10.0f} {us:>9.1f} {count * us / 1e3:>8.2f}")
        print(f"  {'outside the units':<18} {'':>10} {'':>9} {hooked - inside:>8.2f}")
        if name == "sasa_resnet50":
            real_launch = op._launch
            op._launch = lambda plan, args: None
            try:
                stubbed = enqueue_ms(step)
            finally:
                op._launch = real_launch
            print(f"{name} with the attention kernels' launches stubbed: {stubbed:.2f} ms per step to enqueue "
                  f"({plain - stubbed:.2f} ms less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
