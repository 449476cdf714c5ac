"""Train a small SASA ResNet on a procedurally generated task: `python -m sasa_triton.train`.

The task ("which side?"): each image holds a red square and a green cross on a noisy
background; the class says where the cross lies relative to the square (left, right, above,
below). Colour tells the shapes apart, so only relative position decides the class: the
relative row/column logits of the attention layers matter. Nothing is downloaded; every rank
regenerates the same data from --seed.

Single process:     python -m sasa_triton.train --epochs 4 --out sasa_toy.pt   (or: sasa-triton train)
Several processes:  torchrun --nproc_per_node 2 -m sasa_triton.train   (DDP: nccl on CUDA, gloo on
                    CPU; the training set is sharded with a DistributedSampler; rank 0 prints
                    and, with --out, saves)

On CPU the attention runs on the PyTorch reference (backend "auto"); on CUDA on the Triton
kernels. `--device cuda` means cuda:0 in one process and cuda:LOCAL_RANK under torchrun.
`--amp bf16|fp16` runs the forward under torch.autocast (fp16 with a gradient scaler).
Nothing is written unless `--out` is given. The checkpoint holds {"model": state_dict,
"model_config": build_model kwargs, "args", "history"}; reload with `build_model(**ckpt["model_config"]).load_state_dict(ckpt["model"])`.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from .models import ResNet

CLASSES = ("left", "right", "above", "below")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def _shape_masks(size: int, device=None):
    """A filled square and a plus sign, each size x size, as float masks."""
    square = torch.ones(size, size, device=device)
    cross = torch.zeros(size, size, device=device)
    mid = size // 2
    cross[mid, :] = 1
    cross[:, mid] = 1
    return square, cross


def make_dataset(n: int, image_size: int = 16, seed: int = 0, shape_size: int = 3, noise: float = 0.15):
    """n images (n, 3, image_size, image_size) float32 and labels (n,) int64 in [0, 4).

    Label c: the cross is left of (0), right of (1), above (2) or below (3) the square; the
    offset along that axis is at least shape_size + 1 pixels and at least twice the offset
    across it, so the class is unambiguous. Deterministic for a given seed.
    """
    if image_size < 3 * shape_size:
        raise ValueError(f"image_size ({image_size}) must be at least 3 * shape_size ({3 * shape_size})")
    g = torch.Generator().manual_seed(seed)
    images = noise * torch.randn(n, 3, image_size, image_size, generator=g)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    square, cross = _shape_masks(shape_size)
    span = image_size - shape_size  # top-left corners lie in [0, span]
    min_main = shape_size + 1
    i = 0
    while i < n:
        c = int(labels[i])
        main = int(torch.randint(min_main, span + 1, (1,), generator=g))
        side_max = main // 2
        side = int(torch.randint(-side_max, side_max + 1, (1,), generator=g))
        sign = -1 if c in (0, 2) else 1  # left / above: the cross has the smaller coordinate
        d_row, d_col = (sign * main, side) if c in (2, 3) else (side, sign * main)
        # Square corner such that both shapes fit.
        r_lo, r_hi = max(0, -d_row), min(span, span - d_row)
        c_lo, c_hi = max(0, -d_col), min(span, span - d_col)
        if r_lo > r_hi or c_lo > c_hi:
            continue
        r0 = int(torch.randint(r_lo, r_hi + 1, (1,), generator=g))
        c0 = int(torch.randint(c_lo, c_hi + 1, (1,), generator=g))
        r1, c1 = r0 + d_row, c0 + d_col
        s = shape_size
        brightness = 0.7 + 0.3 * torch.rand(2, generator=g)
        images[i, 0, r0:r0 + s, c0:c0 + s] += brightness[0] * square  # red square
        images[i, 1, r1:r1 + s, c1:c1 + s] += brightness[1] * cross   # green cross
        i += 1
    return images, labels


# ----------------------------------------------------------------------------------------------
# Model and steps
# ----------------------------------------------------------------------------------------------

def build_model(layers=(1, 1, 1), base_width=8, heads=2, kernel_size=5, num_classes=len(CLASSES),
                stem="small", backend="auto", **kwargs) -> ResNet:
    """The small SASA ResNet trained here: `models.ResNet` with bottleneck SASA blocks."""
    return ResNet(tuple(layers), num_classes=num_classes, attention=True, stem=stem, base_width=base_width,
                  heads=heads, kernel_size=kernel_size, backend=backend, **kwargs)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device_type: str, amp_dtype):
    """torch.autocast in amp_dtype, or a disabled one (amp_dtype None)."""
    return torch.autocast(device_type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               scheduler=None, amp_dtype=None, scaler=None):
    """One optimizer step, the forward under autocast in amp_dtype when given (None: the
    parameters' dtype); scaler: a torch.amp.GradScaler for fp16. Returns (loss tensor (detached),
    number of correct predictions tensor)."""
    model.train()
    with _autocast(images.device.type, amp_dtype):
        logits = model(images)
        loss = F.cross_entropy(logits, labels)  # autocast computes it in fp32
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.detach(), (logits.argmax(1) == labels).sum()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, channels_last=False, amp_dtype=None):
    """(correct, total) over `loader`, as tensors on `device` (summed over ranks by the caller)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = torch.zeros((), dtype=torch.long, device=device)
    for images, labels in loader:
        images, labels = _to(images, device, channels_last), labels.to(device)
        with _autocast(device.type, amp_dtype):
            logits = model(images)
        correct += (logits.argmax(1) == labels).sum()
        total += labels.numel()
    return correct, total


def _to(images, device, channels_last):
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


class Progress:
    """A plain stderr progress bar (no dependency); redraws in place on a terminal, else prints
    a line every 25 % of the epoch."""

    def __init__(self, total: int, prefix: str, enabled: bool = True, stream=sys.stderr):
        self.total, self.prefix, self.enabled, self.stream = total, prefix, enabled, stream
        self.tty = getattr(stream, "isatty", lambda: False)()
        self.start = time.perf_counter()
        self.last_quarter = -1

    def update(self, done: int, text: str = "") -> None:
        if not self.enabled:
            return
        width = 24
        filled = int(width * done / max(self.total, 1))
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        line = f"{self.prefix} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {rate:.1f} it/s {text}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done >= self.total else ""))
            self.stream.flush()
            return
        quarter = 4 * done // max(self.total, 1)
        if quarter > self.last_quarter:
            self.last_quarter = quarter
            self.stream.write(line + "\n")
            self.stream.flush()


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def build_parser(prog=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "python -m sasa_triton.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=4, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (linear warmup over min(1 epoch, 10%% of the steps), then cosine decay)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N; cuda means cuda:0 in one process and "
                                                 "cuda:LOCAL_RANK under torchrun; default cuda when available, else cpu")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                   help="attention backend: auto = Triton kernels on CUDA, PyTorch reference on CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the data (every rank) and of the initial weights")
    p.add_argument("--train-size", type=int, default=4096, help="training images")
    p.add_argument("--test-size", type=int, default=1024, help="test images")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="cap on the optimizer steps per epoch")
    p.add_argument("--image-size", type=int, default=16, help="image side in pixels")
    p.add_argument("--width", type=int, default=8, help="base width (stage-1 bottleneck width)")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 1, 1], help="bottleneck blocks per stage")
    p.add_argument("--heads", type=int, default=2, help="attention heads (must divide --width)")
    p.add_argument("--kernel-size", type=int, default=5, help="attention window (odd)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last activations (the attention's q/k/v are then free views; faster on CPU too)")
    p.add_argument("--amp", default=None, choices=tuple(AMP_DTYPES),
                   help="run the forward under torch.autocast in this dtype (fp16 adds a gradient scaler); "
                        "default: fp32 throughout")
    p.add_argument("--out", default=None, help="checkpoint path; nothing is saved without it")
    p.add_argument("--check-replicas", action="store_true",
                   help="after training, check that every rank holds identical parameters (exit 1 if not)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (torch.set_num_threads); default 1 on CPU (this small "
                        "model gains little from intra-op threads, and they stall badly when cores are shared), "
                        "torch's default on CUDA")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def resolve_device(device_arg: str | None, local_rank: int = 0, local_world_size: int = 1,
                   cuda_device_count: int | None = None) -> torch.device:
    """The device one training process runs on, with an explicit index for CUDA (what
    torch.cuda.set_device and DDP need).

    device_arg: None (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N". A bare "cuda"
    (or None) is cuda:local_rank: cuda:0 in a single process, this process's own GPU under
    torchrun. "cuda:N" is honoured as given, except with several processes on this node, which
    would all share GPU N (NCCL refuses that). cuda_device_count defaults to
    torch.cuda.device_count(). Raises ValueError naming --device otherwise.
    """
    count = torch.cuda.device_count() if cuda_device_count is None else cuda_device_count
    if device_arg is None:
        device_arg = "cuda" if count > 0 else "cpu"
    try:
        device = torch.device(device_arg)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device_arg!r}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device_arg!r}")
    if count == 0:
        raise ValueError(f"--device {device_arg}: no CUDA device is available (torch.cuda.device_count() == 0)")
    if device.index is None:
        index = local_rank
    elif local_world_size > 1:
        raise ValueError(f"--device {device_arg} would put all {local_world_size} processes of this node on one GPU; "
                         f"pass --device cuda (each process then uses cuda:LOCAL_RANK)")
    else:
        index = device.index
    if index >= count:
        raise ValueError(f"--device {device_arg}: cuda:{index} does not exist ({count} CUDA device(s) visible)")
    return torch.device("cuda", index)


def _launch_env():
    """(rank, world_size, local_rank, local_world_size) as torchrun sets them; (0, 1, 0, 1) alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))))


def _setup_distributed(device: torch.device, world_size: int) -> bool:
    """Select the GPU and, under torchrun, initialise the process group; True when this call
    created it (so that run() destroys only its own group)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return True
    return False


def _all_reduce(*tensors):
    if dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)
    return tensors


def check_replicas(model: nn.Module) -> float:
    """Max absolute difference between this rank's parameters and rank 0's (0.0 single-process)."""
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    if not dist.is_initialized():
        return 0.0
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    diff = (flat - reference).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def run(argv=None, prog=None) -> dict:
    """Run the training; returns {"history": [per-epoch dicts], "test_acc": float, "max_replica_diff"?}."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    rank, world_size, local_rank, local_world_size = _launch_env()
    try:
        device = resolve_device(args.device, local_rank, local_world_size)
    except ValueError as error:
        parser.error(str(error))  # usage + message, exit status 2
    created_group = _setup_distributed(device, world_size)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else None)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    is_main = rank == 0
    channels_last = args.channels_last
    amp_dtype = AMP_DTYPES.get(args.amp)
    log = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)
    try:
        torch.manual_seed(args.seed)
        train_x, train_y = make_dataset(args.train_size, args.image_size, seed=args.seed)
        test_x, test_y = make_dataset(args.test_size, args.image_size, seed=args.seed + 10_000)
        train_set, test_set = TensorDataset(train_x, train_y), TensorDataset(test_x, test_y)
        train_sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                           seed=args.seed, drop_last=True)
        # Without drop_last the test shards are padded with repeats to equal sizes (exact for one
        # process or a test set divisible by the number of processes).
        test_sampler = DistributedSampler(test_set, num_replicas=world_size, rank=rank, shuffle=False)
        train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler, drop_last=True)
        test_loader = DataLoader(test_set, batch_size=args.batch_size, sampler=test_sampler)

        model_config = dict(layers=tuple(args.layers), base_width=args.width, heads=args.heads,
                            kernel_size=args.kernel_size, backend=args.backend)
        model = build_model(**model_config).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        net = model
        if world_size > 1:
            net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

        steps = len(train_loader)
        if args.steps_per_epoch is not None:
            steps = min(steps, args.steps_per_epoch)
        if steps < 1:
            raise ValueError(f"no training step per epoch: --train-size {args.train_size} is smaller than "
                             f"--batch-size {args.batch_size} x {world_size} processes")
        total_steps = steps * args.epochs
        warmup = min(steps, max(total_steps // 10, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range.
        scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None

        def lr_lambda(step):
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total_steps - warmup, 1)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

        n_params = sum(p.numel() for p in model.parameters())
        log(f"sasa_triton.train: {n_params / 1e3:.1f} k params, {world_size} process(es) on {device}, "
            f"backend={args.backend}, amp={args.amp or 'off'}, {steps} steps/epoch x {args.epochs} epochs, "
            f"batch {args.batch_size}/process, "
            f"{args.image_size}x{args.image_size} images, chance = {1 / len(CLASSES):.2f}")
        history = []
        for epoch in range(args.epochs):
            train_sampler.set_epoch(epoch)
            progress = Progress(steps, f"epoch {epoch + 1}/{args.epochs}", enabled=is_main and not args.quiet)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            seen = torch.zeros((), dtype=torch.long, device=device)
            start = time.perf_counter()
            for step, (images, labels) in enumerate(train_loader):
                if step >= steps:
                    break
                images, labels = _to(images, device, channels_last), labels.to(device, non_blocking=True)
                loss, ok = train_step(net, optimizer, images, labels, scheduler, amp_dtype, scaler)
                loss_sum += loss * labels.numel()
                correct += ok
                seen += labels.numel()
                if is_main and not args.quiet:
                    progress.update(step + 1, f"loss {loss.item():.3f}")
            _all_reduce(loss_sum, correct, seen)
            test_correct, test_total = evaluate(model, test_loader, device, channels_last, amp_dtype)
            _all_reduce(test_correct, test_total)
            record = dict(epoch=epoch + 1, train_loss=float(loss_sum / seen), train_acc=float(correct / seen),
                          test_acc=float(test_correct / test_total), seconds=time.perf_counter() - start)
            history.append(record)
            log(f"epoch {record['epoch']}/{args.epochs}: train loss {record['train_loss']:.4f} "
                f"train acc {record['train_acc']:.3f} test acc {record['test_acc']:.3f} ({record['seconds']:.1f} s)")

        result = dict(history=history, test_acc=history[-1]["test_acc"] if history else float("nan"))
        if args.check_replicas:
            diff = check_replicas(model)
            result["max_replica_diff"] = diff
            log(f"replicas: max parameter difference across {world_size} rank(s) = {diff:.3g}")
            if diff != 0.0:
                raise SystemExit(f"replicas diverged: max parameter difference {diff}")
        if is_main and args.out:
            directory = os.path.dirname(os.path.abspath(args.out))
            os.makedirs(directory, exist_ok=True)
            torch.save(dict(model=model.state_dict(), model_config=model_config, args=vars(args), history=history),
                       args.out)
            log(f"saved {args.out}")
        if created_group:
            dist.barrier()  # every rank is past its last collective before any leaves (main)
        return result
    finally:
        torch.set_num_threads(previous_threads)
        if created_group and dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None, prog=None) -> int:
    """The command line (`python -m sasa_triton.train`, `sasa-triton train`): 0 on success.

    A rank of a multi-process run that succeeded leaves through os._exit, without the
    interpreter's teardown: gloo's worker threads outlive destroy_process_group (DDP keeps the
    group alive), and one still releasing its last collective when the interpreter finalizes
    takes the GIL there, which ends the thread inside a C++ destructor: std::terminate, SIGABRT.
    Seen in about 1 of 100-200 two-process runs on a 2-core CPU (tests/test_train.py's DDP test);
    its core dump (2026-12-01): a gloo worker in ~AsyncBarrierWork -> ~AsyncAllreduceWork -> a
    tensor's PyObject decref -> take_gil -> pthread_exit -> std::terminate, while the main thread
    was in Py_FinalizeEx (PyTorch's pull request 179291 describes the same)."""
    run(argv, prog)
    if _launch_env()[1] > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
