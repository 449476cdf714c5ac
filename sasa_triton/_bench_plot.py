"""Plots of `python -m sasa_triton.bench` results (matplotlib, Agg backend).

Every function takes rows as dicts with the CSV's columns (strings or numbers), so the plots can
be redrawn from a saved results.csv (`load_csv`), as notebooks/throughput.ipynb does.
"""
from __future__ import annotations

import csv
import os

NUMERIC = ("batch", "H", "W", "C", "heads", "D", "k", "ms_median", "ms_p20", "ms_p80", "images_per_s", "gflop",
           "tflops", "mbytes", "gbps", "roofline_frac", "peak_mem_mb")
COLORS = {"sasa": "C3", "sasa_layer": "C1", "conv3x3": "k", "conv_kxk": "C0", "dwconv_kxk": "C2",
          "reference": "C7", "flex": "C4"}


def _number(value):
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        f = float(value)
    except ValueError:
        return value
    return int(f) if f.is_integer() and "." not in value and "e" not in value.lower() else f


def normalize(rows) -> list[dict]:
    """Row objects or CSV dicts -> dicts with numeric columns as numbers (None when empty)."""
    out = []
    for row in rows:
        d = row.as_dict() if hasattr(row, "as_dict") else dict(row)
        out.append({key: (_number(value) if key in NUMERIC else value) for key, value in d.items()})
    return out


def load_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return normalize(csv.DictReader(f))


# Where `python -m sasa_triton.bench` writes, by plan (bench.default_out).
RESULT_FOLDERS = ("bench_out", "bench_out_full", "bench_out_quick", "bench_out_full_quick")


def find_results(start: str = ".") -> str | None:
    """The results.csv to show: $SASA_BENCH_CSV when set, else the newest results.csv of the
    benchmark's output folders (RESULT_FOLDERS) in `start` or the nearest folder above it that has
    one, up to the project root (the first folder with a pyproject.toml or .git); else, at that
    root, the newest recorded run under bench/results/<date>-<card>/ (the GPU runs of
    bench/RESULTS.md; newest by folder name). A notebook runs in notebooks/, the README's command
    writes bench_out/ at the repository root. None if none."""
    if os.environ.get("SASA_BENCH_CSV"):
        return os.environ["SASA_BENCH_CSV"]
    folder = os.path.abspath(start)
    while True:
        found = [os.path.join(folder, name, "results.csv") for name in RESULT_FOLDERS]
        found = [path for path in found if os.path.isfile(path)]
        if found:
            return max(found, key=os.path.getmtime)
        parent = os.path.dirname(folder)
        if parent == folder or any(os.path.exists(os.path.join(folder, m)) for m in ("pyproject.toml", ".git")):
            break
        folder = parent
    recorded = os.path.join(folder, "bench", "results")
    runs = sorted(name for name in (os.listdir(recorded) if os.path.isdir(recorded) else ())
                  if os.path.isfile(os.path.join(recorded, name, "results.csv")))
    return os.path.join(recorded, runs[-1], "results.csv") if runs else None


def _plt():
    import matplotlib
    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        try:
            matplotlib.use("Agg")
        except Exception:
            pass
    import matplotlib.pyplot as plt
    return plt


def _stages(rows):
    seen = []
    for r in rows:
        if r["section"] == "layer" and r["shape"] not in seen:
            seen.append(r["shape"])
    return seen


def _timed(rows):
    return [r for r in rows if r.get("ms_median") is not None]


def _layer(rows):
    """Timed layer rows, without conv_kxk at k = 3 where conv3x3 (the same layer) was timed."""
    layer = [r for r in _timed(normalize(rows)) if r["section"] == "layer"]
    conv3 = {(r["shape"], r["pass"]) for r in layer if r["provider"] == "conv3x3"}
    return [r for r in layer if not (r["provider"] == "conv_kxk" and r["k"] == 3 and (r["shape"], r["pass"]) in conv3)]


def _window_sizes(layer):
    """The window sizes of the attention-like rows (conv3x3 is always k = 3)."""
    return sorted({r["k"] for r in layer if isinstance(r["k"], int) and r["provider"] != "conv3x3"})


def _legend(ax, **kwargs):
    """A legend only when something on the axes is labelled (else matplotlib warns)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def plot_layer_throughput(rows, path=None, title=""):
    """images/s per provider: against k per stage (columns) and pass (rows) when the run swept k,
    against the stage per pass when it timed one k; conv3x3 black dashed."""
    plt = _plt()
    layer = _layer(rows)
    stages = _stages(layer)
    passes = [p for p in ("fwd", "fwd+bwd") if any(r["pass"] == p for r in layer)]
    if not stages or not passes:
        return None
    ks = _window_sizes(layer)
    if len(ks) <= 1:
        fig, axes = plt.subplots(1, len(passes), figsize=(5.5 * len(passes), 4), squeeze=False)
        for ax, pass_ in zip(axes[0], passes):
            sel = [r for r in layer if r["pass"] == pass_]
            for provider in dict.fromkeys(r["provider"] for r in sel):
                pts = [(stages.index(r["shape"]), r["images_per_s"]) for r in sel if r["provider"] == provider]
                conv = provider == "conv3x3"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s" if conv else "o",
                        linestyle="--" if conv else "-", color=COLORS.get(provider, "C9"),
                        label="conv3x3" if conv else f"{provider} (k = {ks[0] if ks else '-'})")
            ax.set_yscale("log")
            ax.set_xticks(range(len(stages)), stages, fontsize=8)
            ax.set_xlim(-0.4, len(stages) - 0.6)
            ax.set_title(pass_, fontsize=9)
            ax.set_ylabel("images / s")
            ax.grid(True, which="both", alpha=0.3)
            _legend(ax, fontsize=7)
        fig.suptitle(f"Layer throughput vs convolution\n{title}", fontsize=10)
        fig.tight_layout()
        return _save(fig, path)
    fig, axes = plt.subplots(len(passes), len(stages), figsize=(3.6 * len(stages), 3.2 * len(passes)),
                             squeeze=False, sharex=True)
    for i, pass_ in enumerate(passes):
        for j, stage in enumerate(stages):
            ax = axes[i][j]
            sel = [r for r in layer if r["pass"] == pass_ and r["shape"] == stage]
            for provider in dict.fromkeys(r["provider"] for r in sel):
                pts = sorted((r["k"], r["images_per_s"]) for r in sel if r["provider"] == provider)
                if provider == "conv3x3":
                    ax.axhline(pts[0][1], color="k", linestyle="--", linewidth=1, label="conv3x3")
                else:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider,
                            color=COLORS.get(provider))
            ax.set_yscale("log")
            ax.set_xticks(ks)
            ax.set_title(f"{stage} {pass_}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel("images / s")
            if i == len(passes) - 1:
                ax.set_xlabel("window k")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(f"Layer throughput vs convolution\n{title}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.93))
    return _save(fig, path)


def plot_speedup_vs_conv(rows, path=None, title="", providers=("sasa", "sasa_layer", "flex")):
    """Time of conv3x3 / time of each SASA provider in the same pass: against k, one line per
    stage and provider, when the run swept k; against the stage, one line per provider, when it
    timed one k. Only passes with a conv3x3 row and a SASA row get a panel."""
    plt = _plt()
    layer = _layer(rows)
    stages = _stages(layer)
    conv = {(r["shape"], r["pass"]): r["ms_median"] for r in layer if r["provider"] == "conv3x3"}
    sel = [r for r in layer if r["provider"] in providers and (r["shape"], r["pass"]) in conv]
    passes = [p for p in ("fwd", "fwd+bwd") if any(r["pass"] == p for r in sel)]
    if not passes:
        return None
    ks = _window_sizes(sel)
    by_stage = len(ks) <= 1
    fig, axes = plt.subplots(1, len(passes), figsize=(5.5 * len(passes), 4), squeeze=False)
    styles = {"sasa": "-", "sasa_layer": "--", "flex": ":", "reference": "-."}
    for ax, pass_ in zip(axes[0], passes):
        here = [r for r in sel if r["pass"] == pass_]
        for provider in providers:
            if by_stage:
                pts = [(stages.index(r["shape"]), conv[(r["shape"], pass_)] / r["ms_median"])
                       for r in here if r["provider"] == provider]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle=styles.get(provider, "-"),
                            color=COLORS.get(provider, "C9"), label=f"{provider} (k = {ks[0]})")
                continue
            for s_index, stage in enumerate(stages):
                pts = sorted((r["k"], conv[(stage, pass_)] / r["ms_median"]) for r in here
                             if r["provider"] == provider and r["shape"] == stage)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle=styles.get(provider, "-"),
                            color=f"C{s_index}", label=f"{provider} {stage}")
        ax.axhline(1.0, color="k", linewidth=1)
        ax.set_yscale("log")
        if by_stage:
            ax.set_xticks(range(len(stages)), stages, fontsize=8)
            ax.set_xlim(-0.4, len(stages) - 0.6)
        else:
            ax.set_xticks(ks)
            ax.set_xlabel("window k")
        ax.set_ylabel("speed relative to conv3x3 (>1: faster)")
        ax.set_title(pass_, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax, fontsize=7)
    fig.suptitle(f"SASA vs the 3x3 convolution it replaces\n{title}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def roofs(rows) -> tuple:
    """(copy GB/s, matmul TFLOP/s) measured in the run (its "roofline" rows), None when absent."""
    rows = normalize(rows)
    copy = [r["gbps"] for r in rows if r["section"] == "roofline" and r["provider"] == "copy" and r["gbps"]]
    matmul = [r["tflops"] for r in rows if r["section"] == "roofline" and r["provider"] == "matmul" and r["tflops"]]
    return (copy[0] if copy else None), (matmul[0] if matmul else None)


def plot_roofline(rows, bandwidth_gbps=None, matmul_tflops=None, path=None, title=""):
    """Achieved TFLOP/s against arithmetic intensity (FLOP per byte of minimal traffic); the roofs
    default to the ones measured in the same run.

    The memory roof is a copy far larger than any cache, so a row whose working set stays in
    cache (CPU caches; a GPU's L2 between the forward and the backward of a small stage) can
    beat it, and a convolution can beat the matmul roof where its library outdoes the matmul
    measured. Points above the roof are counted on the plot and are such rows, not errors."""
    plt = _plt()
    measured = roofs(rows)
    bandwidth_gbps = bandwidth_gbps or measured[0]
    matmul_tflops = matmul_tflops or measured[1]
    rows = [r for r in _layer(rows) if r.get("gbps")]
    if not rows or not bandwidth_gbps or not matmul_tflops:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    intensities = [r["tflops"] * 1e3 / r["gbps"] for r in rows]
    lo, hi = min(intensities + [1.0]) / 2, max(intensities + [1000.0]) * 2
    ridge = matmul_tflops * 1e3 / bandwidth_gbps

    def roof(x):
        return min(x * bandwidth_gbps / 1e3, matmul_tflops)

    xs = [lo, ridge, hi]
    ax.plot(xs, [roof(x) for x in xs], color="k", linewidth=1.5,
            label=f"roof: {bandwidth_gbps:.3g} GB/s copy, {matmul_tflops:.3g} TFLOP/s matmul")
    markers = {"fwd": "o", "fwd+bwd": "^"}
    seen = set()
    for r, x in zip(rows, intensities):
        key = r["provider"]
        label = key if key not in seen else None
        if key == "conv3x3":  # hollow and on top: never hidden under another provider's point
            ax.scatter(x, r["tflops"], facecolors="none", edgecolors="k", marker=markers.get(r["pass"], "s"), s=55,
                       linewidths=1.4, label=label, zorder=4)
        else:
            ax.scatter(x, r["tflops"], color=COLORS.get(key, "C9"), marker=markers.get(r["pass"], "s"), s=22,
                       label=label, alpha=0.8, zorder=3)
        seen.add(key)
    above = sum(r["tflops"] > roof(x) * 1.001 for r, x in zip(rows, intensities))
    if above:
        fig.text(0.01, 0.01, f"{above} point{'s' if above > 1 else ''} above the roof: a working set that stays in "
                             "cache beats the large-copy roof,\nor a conv library beats the matmul measured",
                 fontsize=7, va="bottom")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (useful FLOP / minimal byte)")
    ax.set_ylabel("useful TFLOP/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, title="o fwd, ^ fwd+bwd", title_fontsize=7, loc="lower right")
    ax.set_title(f"Roofline\n{title}", fontsize=9)
    fig.tight_layout(rect=(0, 0.06 if above else 0, 1, 1))
    return _save(fig, path)


def plot_models(rows, path=None, title=""):
    """images/s of each model, inference and training."""
    plt = _plt()
    rows = [r for r in _timed(normalize(rows)) if r["section"] == "model"]
    if not rows:
        return None
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    passes = list(dict.fromkeys(r["pass"] for r in rows))  # inference, training, then their CUDA-graph runs
    fig, ax = plt.subplots(figsize=(7, 1.4 + 0.45 * len(providers) * len(passes)))
    height = 0.8 / len(passes)
    for i, pass_ in enumerate(passes):
        ys, vals = [], []
        for j, provider in enumerate(providers):
            match = [r for r in rows if r["provider"] == provider and r["pass"] == pass_]
            if match:
                ys.append(j + i * height)
                vals.append(match[0]["images_per_s"])
        bars = ax.barh(ys, vals, height=height, label=pass_, color=f"C{i}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xlim(0, 1.2 * max(r["images_per_s"] for r in rows))  # room for the value labels
    ax.set_yticks([j + height * (len(passes) - 1) / 2 for j in range(len(providers))], providers, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images / s")
    ax.legend(fontsize=8)
    b = rows[0]
    ax.set_title(f"Models, batch {b['batch']}, {b['shape']}, {b['dtype']}\n{title}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path):
    if path is None:
        return fig
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def title_of(rows) -> str:
    """The label of a run from its rows: the GPU name, or the CPU warning."""
    devices = {r["device"] for r in normalize(rows)}
    if devices == {"cpu"}:
        from .bench import CPU_LABEL
        return CPU_LABEL
    return ", ".join(sorted(devices))


def plot_all(rows, out_dir: str, title: str | None = None) -> list[str]:
    """Write every plot that has data to out_dir; returns the paths written."""
    rows = normalize(rows)
    title = (title if title is not None else title_of(rows)).replace("; ", "\n")
    made = [
        plot_layer_throughput(rows, os.path.join(out_dir, "layer_throughput.png"), title),
        plot_speedup_vs_conv(rows, os.path.join(out_dir, "speedup_vs_conv.png"), title),
        plot_roofline(rows, path=os.path.join(out_dir, "roofline.png"), title=title),
        plot_models(rows, os.path.join(out_dir, "models.png"), title),
    ]
    return [p for p in made if p]
