"""Kernel launch configurations: the defaults, the candidate spaces, and the lookup of tuned ones.

A config is a dict of launch meta-parameters (tile sizes in upper case, num_warps, num_stages)
that the op's launcher passes to its kernel. Only the default and space functions below know
what the tile fields mean; everything else treats a config as an opaque dict.

Nothing is ever tuned inside a user's process. `get_config` only looks up, in order:
  1. this process's memory (after the first call per key: one dict lookup, nothing else);
  2. SASA_TRITON_CONFIG_FILE (files separated by os.pathsep);
  3. this GPU's tuned file in the user cache directory (SASA_TRITON_CACHE_DIR, default
     ~/.cache/sasa_triton), written by `python -m sasa_triton.autotune`;
  4. this GPU's file shipped in sasa_triton/configs/;
  5. the default config.
SASA_TRITON_AUTOTUNE=0 skips 2-4 (default configs only: what the GPU tests pin).

Why no tuning in the user's process: on an H100 with Triton 3.6 some candidates computed wrong
answers, and some faulted with an illegal memory access, which poisons the whole CUDA context
(catching the exception does not help); tuning inside the first call also made every new shape
cost ~30 s. So tuning happens only in `python -m sasa_triton.autotune` (sasa_triton.autotune),
which tunes in a child process, accepts a candidate only if its outputs match the default
config's, and writes the winners to a file that step 3 reads.

Cache key: kernel name, kernel size, dilation, head dim, dtype and the image height and width
rounded up to a power of two (56 and 60 share the bucket 64), never the batch.

Tuned files: JSON named after the GPU (`<gpu name>.json`, see `tuned_file`). A file holds the GPU
name, the Triton version and a hash of the @triton.jit sources of each kernel family; a file for
another GPU or Triton version, or a family whose kernels changed since, is ignored with a
one-line warning. See sasa_triton/configs/README.md for the format.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import inspect
import itertools
import json
import os
import re
import tempfile
import textwrap
import warnings
from typing import Callable, Iterable

import torch

from ._utils import interpreter_enabled

FILE_FORMAT = 1
PACKAGE_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
CONFIG_FIELDS = ("num_warps", "num_stages")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ----------------------------------------------------------------------------------------------
# Default configs
# ----------------------------------------------------------------------------------------------

def _local_default(kernel: str, kernel_size: int, dilation: int, head_dim: int, dtype: torch.dtype) -> dict:
    """The default tile of "local_fwd", "local_bwd_dq", "local_bwd_dkdv": ops/local_attention.py
    owns what its tile fields mean (the same tiles on the GPU and under the interpreter)."""
    from .ops.local_attention import default_config as local_default
    return local_default(kernel, kernel_size, dilation, head_dim, dtype)


def _spatial_default(kernel: str, kernel_size: int, head_dim: int, dtype: torch.dtype) -> dict:
    """The GPU's default tile of the stem kernels (ops/spatial_attention.py), kernel_size = block size.

    "spatial_block_*": GROUP blocks of a block row per tile, walked in BLOCK_M (stationary) x
    BLOCK_N (streamed) pixel chunks; "spatial_sliding_*": BLOCK_H x BLOCK_W tiles as the local
    kernels. The dk/dv kernels loop over TILES_PER_PROGRAM tiles (fewer partial mix-gradient rows
    to sum).
    """
    cap = 32 if head_dim > 64 else 64  # BLOCK_M * BLOCK_D <= 64 x 64 fp32 accumulators
    num_warps = 8 if dtype == torch.float32 or head_dim > 64 else 4  # fp32 dots run on the FMA units
    common = {"TILES_PER_PROGRAM": 8, "num_warps": num_warps, "num_stages": 1}
    if "_block_" in kernel:
        # The forward in 16 bits fills chunks of up to 64 pixels with whole blocks: on an H200
        # (Triton 3.6, 2026-11-29, bs 4, D 16, B 32 at 224x224) 4 blocks in 64 x 64 chunks took
        # 0.606 ms against 1.076 for one block in 16 x 16.
        # (At D > 64 a bs-2 forward in 32 x 32 chunks spilled 4 bytes on Triton 3.6: 16 there.)
        fill = 64 if kernel.endswith("_fwd") and dtype != torch.float32 and head_dim <= 64 else 16
        group = max(1, fill // (kernel_size * kernel_size))
        chunk = min(cap, max(16, next_power_of_2(group * kernel_size ** 2)))
        return {"GROUP": group, "BLOCK_M": chunk, "BLOCK_N": chunk, **common}
    block_w = 8 if kernel_size + 7 <= 16 else 16
    block_h = cap // block_w
    if kernel.endswith("dkdv"):
        # It keeps k, dk and the pair tables of M dots live: a 4 x 8 tile spilled 60 bytes on Triton 3.6
        # (sm_90, bs 4, D 16); 2 x 8 keeps 152-194 registers on 3.3, 3.6 and 3.9.
        block_h = max(16 // block_w, block_h // 4)
    return {"BLOCK_H": block_h, "BLOCK_W": block_w, **common}


def _interpreter_tiles(kernel: str, kernel_size: int, dilation: int, config: dict) -> dict:
    """Small tiles for Triton's CPU interpreter, which runs each program in numpy: less padding
    work, so the tests stay fast."""
    if kernel.startswith("spatial_"):
        if "_block_" in kernel:
            return {**config, "BLOCK_M": 16, "BLOCK_N": 16, "TILES_PER_PROGRAM": 2}
        return {**config, "BLOCK_H": 4, "BLOCK_W": 4 if kernel_size + 3 <= 16 else 8, "TILES_PER_PROGRAM": 2}
    return config  # the local kernels run the GPU's own tiles (small: 16 queries)


def gpu_default_config(kernel: str, kernel_size: int, dilation: int, head_dim: int, dtype: torch.dtype) -> dict:
    """The default config a GPU launch uses for `kernel`, also under TRITON_INTERPRET=1 (so the
    tests can run the GPU's tiles through the interpreter)."""
    if kernel.startswith("spatial_"):
        return _spatial_default(kernel, kernel_size, head_dim, dtype)
    return _local_default(kernel, kernel_size, dilation, head_dim, dtype)


def default_config(kernel: str, kernel_size: int, dilation: int, head_dim: int, dtype: torch.dtype) -> dict:
    """The default config of `kernel` here: the GPU's (gpu_default_config), with the stem's
    tiles made small under TRITON_INTERPRET=1."""
    config = gpu_default_config(kernel, kernel_size, dilation, head_dim, dtype)
    if interpreter_enabled():
        config = _interpreter_tiles(kernel, kernel_size, dilation, config)
    return config


# ----------------------------------------------------------------------------------------------
# Kernel families and their candidate spaces
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class KernelFamily:
    """The kernels whose names start with `name + "_"`.

    space(kernel, kernel_size, dilation, head_dim, dtype, height_bucket, width_bucket) yields
    the candidate configs of a key; `module` holds the family's @triton.jit functions (hashed
    into the tuned files) and its launchers.
    """
    name: str
    module: str
    space: Callable[..., Iterable[dict]]


FAMILIES: dict[str, KernelFamily] = {}


def register_family(name: str, *, module: str, space) -> KernelFamily:
    """Register (or replace) the candidate space of the kernels named `name + "_*"`."""
    family = KernelFamily(name, module, space)
    FAMILIES[name] = family
    return family


def family_name(kernel: str) -> str:
    return kernel.split("_", 1)[0]


def family(kernel: str) -> KernelFamily:
    name = family_name(kernel)
    found = FAMILIES.get(name)
    if found is None:
        found = KernelFamily(name, f"{__package__}.ops.{name}_attention", _launch_space)
    return found


def _rows_per_warp(dtype) -> int:
    """The fewest tile rows a dot gives a warp: 16 for the tensor-core dots of 16-bit inputs,
    8 for the FMA dots of fp32 ones."""
    return 8 if dtype == torch.float32 else 16


def _launches(tile: int, dtype, stages=(1, 2)) -> list[tuple[int, int]]:
    """(num_warps, num_stages) for a tile of `tile` stationary pixels: as many warps as the tile
    has dot row-blocks (at most 8: more replicate the tile), with each pipeline depth, and 4
    warps (one Hopper warpgroup) single-stage."""
    warps = min(8, max(1, tile // _rows_per_warp(dtype)))
    out = [(warps, s) for s in stages]
    if warps != 4:
        out.append((4, 1))
    return out


def _local_space(kernel, kernel_size, dilation, head_dim, dtype, height_bucket, width_bucket):
    """The local kernels' candidates (ops/local_attention.py `config_space`)."""
    from .ops.local_attention import config_space
    yield from config_space(kernel, kernel_size, dilation, head_dim, dtype, height_bucket, width_bucket)


def _launch_space(kernel, kernel_size, dilation, head_dim, dtype, height_bucket, width_bucket):
    """Space of an unregistered family: its default tile with 2/4/8 warps and 1-2 stages (the
    tile's meaning is the op's business, so only the launch parameters vary)."""
    base = default_config(kernel, kernel_size, dilation, head_dim, dtype)
    for num_warps, num_stages in itertools.product((2, 4, 8), (1, 2)):
        yield {**base, "num_warps": num_warps, "num_stages": num_stages}


register_family("local", module=f"{__package__}.ops.local_attention", space=_local_space)


# The stem's kernels (ops/spatial_attention.py, "spatial_{block|sliding}_*"; kernel_size = the
# block size bs). Block window: a tile is GROUP whole bs x bs blocks of a block row (GROUP * bs^2
# pixels), walked in BLOCK_M (stationary) x BLOCK_N (streamed) pixel chunks. Sliding window:
# BLOCK_H x BLOCK_W tiles, keys streamed as haloed rows of next_power_of_2(BLOCK_W + bs - 1)
# (>= 16) pixels. The dk/dv kernels also take TILES_PER_PROGRAM (tiles walked per program:
# fewer partial dmix rows against fewer programs).
STEM_CHUNKS = (16, 32, 64, 128)        # BLOCK_M = BLOCK_N (powers of two >= 16: tl.dot)
STEM_QUERY_TILES = (16, 32, 64, 128)   # sliding: BLOCK_H * BLOCK_W
WIDTHS_PER_KEY = 2                     # sliding: the narrowest padded halo and the next one up
STEM_WIDTHS = (4, 8, 16, 32)
STEM_TILES_PER_PROGRAM = (2, 8, 32)


def _stem_groups(block_size: int, width_bucket: int) -> list[int]:
    """Blocks per tile: the most whole blocks that fill each chunk size (GROUP * bs^2 <= chunk),
    no more blocks side by side than the image holds (beyond one)."""
    groups = {max(1, chunk // (block_size * block_size)) for chunk in STEM_CHUNKS}
    return [g for g in sorted(groups) if g == 1 or g * block_size <= max(width_bucket, block_size)]


def _stem_sliding_widths(block_size: int, width_bucket: int) -> list[int]:
    """Tile widths worth trying for a bs-wide window (haloed row BLOCK_W + bs - 1): no wider than
    the image (bucket); per padded halo width only the widest tile that pads to it (the same key
    strip for more queries); the WIDTHS_PER_KEY narrowest halos (wider ones are mostly padding)."""
    widths = [w for w in STEM_WIDTHS if w <= max(width_bucket, STEM_WIDTHS[0])]
    by_halo = {}
    for w in widths:
        by_halo[max(16, next_power_of_2(w + block_size - 1))] = w
    return [w for _, w in sorted(by_halo.items())][:WIDTHS_PER_KEY]


def _stem_launches(kernel, dtype, tile_pixels, per_program):
    """(num_warps, num_stages, TILES_PER_PROGRAM): the launches of `_launches`, single-stage in
    the dk/dv kernels and in fp32 (every small spill seen in ~850 sm_90 compiles of stem
    candidates came with num_stages = 2 there); the first launch with each of `per_program`,
    the others with its first value."""
    single = kernel.endswith("dkdv") or dtype == torch.float32
    launches = _launches(tile_pixels, dtype, stages=(1,) if single else (1, 2))
    out = [(*launches[0], tiles) for tiles in per_program]
    return out + [(*launch, per_program[0]) for launch in launches[1:]]


def _spatial_space(kernel, kernel_size, dilation, head_dim, dtype, height_bucket, width_bucket):
    """Tiles per block size and window (see STEM_* above). The forward and dq kernels keep the
    default's TILES_PER_PROGRAM (they ignore it)."""
    bs = kernel_size
    default = default_config(kernel, kernel_size, dilation, head_dim, dtype)
    per_program = (default["TILES_PER_PROGRAM"],)
    if kernel.endswith("dkdv"):
        per_program += tuple(t for t in STEM_TILES_PER_PROGRAM if t != per_program[0])
    if "_block_" in kernel:
        for group in _stem_groups(bs, width_bucket):
            chunk = min(STEM_CHUNKS[-1], max(16, next_power_of_2(group * bs * bs)))
            for num_warps, num_stages, tiles in _stem_launches(kernel, dtype, chunk, per_program):
                yield {"GROUP": group, "BLOCK_M": chunk, "BLOCK_N": chunk, "TILES_PER_PROGRAM": tiles,
                       "num_warps": num_warps, "num_stages": num_stages}
        return
    for block_w in _stem_sliding_widths(bs, width_bucket):
        for tile in STEM_QUERY_TILES:
            block_h = tile // block_w
            if block_h < 1 or (block_h > height_bucket and tile > 16):
                continue
            for num_warps, num_stages, tiles in _stem_launches(kernel, dtype, tile, per_program):
                yield {"BLOCK_H": block_h, "BLOCK_W": block_w, "TILES_PER_PROGRAM": tiles,
                       "num_warps": num_warps, "num_stages": num_stages}


register_family("spatial", module=f"{__package__}.ops.spatial_attention", space=_spatial_space)


def bucket(n: int) -> int:
    """Image sizes share a key up to the next power of two (56 and 60 -> 64)."""
    return next_power_of_2(max(1, int(n)))


def candidate_configs(kernel, kernel_size, dilation, head_dim, dtype, height, width) -> list[dict]:
    """The configs the autotuner tries for this key: the default first (the reference every
    other candidate must match, and the fallback), then the family's space. Nothing is pruned
    here: the tuner compiles each candidate and drops those that fail or spill."""
    out = [default_config(kernel, kernel_size, dilation, head_dim, dtype)]
    for config in family(kernel).space(kernel, kernel_size, dilation, head_dim, dtype, bucket(height),
                                       bucket(width)):
        if config not in out:
            out.append(config)
    return out


# ----------------------------------------------------------------------------------------------
# Keys, environment, tuned files
# ----------------------------------------------------------------------------------------------

def dtype_name(dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def config_key(kernel, kernel_size, dilation, head_dim, dtype, height, width) -> str:
    """'local_fwd/k7/d1/D64/bf16/H64/W64': the cache key (bucketed image size, no batch)."""
    return (f"{kernel}/k{int(kernel_size)}/d{int(dilation)}/D{int(head_dim)}/{dtype_name(dtype)}"
            f"/H{bucket(height)}/W{bucket(width)}")


KEY_PATTERN = re.compile(r"^(?P<kernel>[a-z_]+)/k(?P<k>\d+)/d(?P<d>\d+)/D(?P<D>\d+)/(?P<dtype>\w+)"
                         r"/H(?P<H>\d+)/W(?P<W>\d+)$")


def parse_key(key: str) -> dict:
    """The fields of a config_key: kernel, kernel_size, dilation, head_dim, dtype (name), height,
    width (the buckets)."""
    match = KEY_PATTERN.match(key)
    if match is None:
        raise ValueError(f"key must look like 'local_fwd/k7/d1/D64/bf16/H64/W64', got {key!r}")
    return {"kernel": match["kernel"], "kernel_size": int(match["k"]), "dilation": int(match["d"]),
            "head_dim": int(match["D"]), "dtype": match["dtype"], "height": int(match["H"]),
            "width": int(match["W"])}


def tuned_configs_enabled() -> bool:
    """SASA_TRITON_AUTOTUNE=0 (or false/off/no): default configs only, tuned files ignored.
    Anything else: tuned files, then defaults. Nothing is tuned in this process either way."""
    return os.environ.get("SASA_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def cache_dir() -> str:
    """SASA_TRITON_CACHE_DIR, else $XDG_CACHE_HOME/sasa_triton, else ~/.cache/sasa_triton."""
    path = os.environ.get("SASA_TRITON_CACHE_DIR")
    if not path:
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(root, "sasa_triton")
    return path


def device_name() -> str:
    """The name tuned files are keyed by: the CUDA device's, or "triton-interpreter"."""
    if interpreter_enabled():
        return "triton-interpreter"
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return "cpu"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_") or "unknown"


def tuned_file(directory: str | None = None) -> str:
    """Path of this GPU's tuned file in `directory` (default: the user cache directory)."""
    return os.path.join(directory or cache_dir(), _slug(device_name()) + ".json")


def triton_version() -> str:
    import triton
    return triton.__version__


def jit_functions(module) -> list:
    """The @triton.jit functions defined in `module` (a module object), sorted by name."""
    out = []
    for name, obj in sorted(vars(module).items()):
        fn = getattr(obj, "fn", None)
        if fn is None or not type(obj).__module__.startswith("triton") or not inspect.isfunction(fn):
            continue
        if fn.__module__ == module.__name__:
            out.append(obj)
    return out


def kernel_source_hash(family_: str) -> str | None:
    """sha256 (16 hex digits) of the source of the family module's @triton.jit functions; None
    when the module is absent."""
    try:
        module = importlib.import_module(family(family_ + "_").module)
    except ImportError:
        return None
    sources = [textwrap.dedent(inspect.getsource(obj.fn)) for obj in jit_functions(module)]
    return hashlib.sha256("\n".join(sources).encode()).hexdigest()[:16]


def entry_config(entry: dict) -> dict:
    """The launch config of a file entry (drops the bookkeeping fields: ms, default_ms, rejected...)."""
    return {k: v for k, v in entry.items() if k in CONFIG_FIELDS or k.isupper()}


class _State:
    def __init__(self):
        self.memory: dict[tuple, dict] = {}     # (kernel, k, dilation, D, dtype, H, W) -> config
        self.entries: dict[str, dict] | None = None  # key -> entry of the tuned files (first file wins)
        self.warned: set = set()


_state = _State()


def clear_cache() -> None:
    """Forget every config of this process and the loaded files (they are read again on next use,
    with the environment as it is then)."""
    global _state
    _state = _State()


def _warn_once(message: str) -> None:
    if message not in _state.warned:
        _state.warned.add(message)
        warnings.warn(message, stacklevel=3)


def config_files() -> list[str]:
    """Files looked at, highest priority first: SASA_TRITON_CONFIG_FILE (os.pathsep-separated),
    this GPU's file in the user cache directory, then in the package's configs/ folder."""
    explicit = [p for p in os.environ.get("SASA_TRITON_CONFIG_FILE", "").split(os.pathsep) if p]
    return explicit + [tuned_file(), tuned_file(PACKAGE_CONFIG_DIR)]


def read_tuned_file(path: str) -> dict | None:
    """The file's contents when it is for this GPU and Triton version, else None (with a warning
    when it exists but does not match)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        _warn_once(f"sasa_triton: ignoring tuned configs {path}: unreadable ({error})")
        return None
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT or not isinstance(data.get("configs"), dict):
        _warn_once(f"sasa_triton: ignoring tuned configs {path}: not a format-{FILE_FORMAT} sasa_triton file")
        return None
    gpu, version = device_name(), triton_version()
    if data.get("gpu") != gpu:
        _warn_once(f"sasa_triton: ignoring tuned configs {path}: tuned on {data.get('gpu')!r}, this is {gpu!r}")
        return None
    if data.get("triton") != version:
        _warn_once(f"sasa_triton: ignoring tuned configs {path}: tuned with Triton {data.get('triton')}, "
                   f"this is Triton {version}; rerun python -m sasa_triton.autotune")
        return None
    return data


def tuned_entries() -> dict[str, dict]:
    """{key: entry} of every tuned file that matches this GPU and Triton version, keeping only the
    families whose kernels have not changed since; the first file (config_files order) wins."""
    if _state.entries is not None:
        return _state.entries
    entries: dict = {}
    hashes: dict = {}
    for path in config_files():
        data = read_tuned_file(path)
        if data is None:
            continue
        stored = data.get("kernel_hashes") or {}
        for key, entry in data["configs"].items():
            name = family_name(key)
            if name not in hashes:
                hashes[name] = kernel_source_hash(name)
            if stored.get(name) != hashes[name]:
                _warn_once(f"sasa_triton: ignoring the {name}_* configs of {path}: the kernels changed since "
                           f"they were tuned (hash {stored.get(name)}, now {hashes[name]}); rerun "
                           f"python -m sasa_triton.autotune")
                continue
            if isinstance(entry, dict):
                entries.setdefault(key, entry)
    _state.entries = entries
    return entries


def _resolve(kernel, kernel_size, dilation, head_dim, dtype, height, width) -> dict:
    if tuned_configs_enabled():
        entry = tuned_entries().get(config_key(kernel, kernel_size, dilation, head_dim, dtype, height, width))
        if entry is not None:
            return entry_config(entry)
    return default_config(kernel, kernel_size, dilation, head_dim, dtype)


def get_config(kernel: str, kernel_size: int, dilation: int, head_dim: int, dtype: torch.dtype,
               height: int, width: int, run=None) -> dict:
    """The config a launcher uses for `kernel` on an image of height x width (any batch): the
    first call per key resolves it (see the module doc), later calls are one dict lookup.
    `run` is accepted and ignored (nothing is tuned here)."""
    key = (kernel, kernel_size, dilation, head_dim, dtype, height, width)
    config = _state.memory.get(key)
    if config is None:
        config = _state.memory[key] = _resolve(*key)
    return dict(config)


def save_tuned(path: str | None, entries: dict) -> str:
    """Write `entries` ({key: entry}) to `path` (default: this GPU's file in the user cache
    directory), merged with what a matching file there already holds (its entries of families
    whose kernels changed are dropped). Atomic (written beside, then renamed). Returns the path."""
    path = path or tuned_file()
    old = read_tuned_file(path) if os.path.exists(path) else None
    hashes = {name: kernel_source_hash(name)
              for name in {family_name(k) for k in entries} | {family_name(k) for k in (old or {}).get("configs", {})}}
    configs = {}
    if old is not None:
        for key, entry in old["configs"].items():
            if (old.get("kernel_hashes") or {}).get(family_name(key)) == hashes[family_name(key)]:
                configs[key] = entry
    configs.update(entries)
    data = {
        "format": FILE_FORMAT,
        "gpu": device_name(),
        "triton": triton_version(),
        "torch": torch.__version__,
        "kernel_hashes": {f: h for f, h in sorted(hashes.items()) if any(family_name(k) == f for k in configs)},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "configs": dict(sorted(configs.items())),
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    clear_cache()  # the next lookup reads the new file
    return path
