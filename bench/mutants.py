"""Mutation testing of the kernels: does the test suite notice a wrong kernel?

    python bench/mutants.py sasa_triton/ops/local_attention.py --tests "tests/test_local_attention.py"
        [--sample N] [--seed S] [--workers 2] [--timeout 900] [--lines A-B] [--functions a,b] [--list]

Each mutant changes one thing in one `@triton.jit` function of FILE (with `--functions`, in the
named functions instead, host code too): an operator (+ and -, * and /, // to *, & and |), a
comparison's strictness or sense, `and`/`or`, an integer constant by one, `tl.maximum` and
`tl.minimum`, `tl.exp2` to `tl.exp`, or `tl.where`'s branches. It is written into a private copy
of the repository and the test selection runs there (`pytest -x`, under the interpreter as in
CI, on a machine with a GPU too). A mutant is killed when a test fails or the run crashes, and
survives when the selection passes. A survivor is a hole in the tests or an equivalent mutant
(one that computes the same function, e.g. a bound that a mask already enforces); the report
lists each with its line for a person to tell which. This is not a check of the package: its
figures go into bench/RESULTS.md, and a hole it finds becomes a test.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import copy
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

SWAP_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
              ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.FloorDiv: ast.Mult}
SWAP_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
            ast.NotEq: ast.Eq}
SWAP_CALL = {"maximum": "minimum", "minimum": "maximum", "exp2": "exp"}


def _is_jit(fn: ast.FunctionDef) -> bool:
    return any(ast.unparse(d).endswith("jit") for d in fn.decorator_list)


def _mutations(node: ast.AST):
    """(description, mutated copy of node) for each single change of this node."""
    if isinstance(node, ast.BinOp) and type(node.op) in SWAP_BINOP:
        new = copy.deepcopy(node)
        new.op = SWAP_BINOP[type(node.op)]()
        yield f"{type(node.op).__name__} -> {type(new.op).__name__}", new
    elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in SWAP_CMP:
        new = copy.deepcopy(node)
        new.ops = [SWAP_CMP[type(node.ops[0])]()]
        yield f"{type(node.ops[0]).__name__} -> {type(new.ops[0]).__name__}", new
    elif isinstance(node, ast.BoolOp):
        new = copy.deepcopy(node)
        new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        yield f"{type(node.op).__name__} -> {type(new.op).__name__}", new
    elif isinstance(node, ast.Constant) and type(node.value) is int:
        new = copy.deepcopy(node)
        new.value = node.value + 1
        yield f"{node.value} -> {new.value}", new
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        name = node.func.attr
        if name in SWAP_CALL:
            new = copy.deepcopy(node)
            new.func.attr = SWAP_CALL[name]
            yield f"{name} -> {SWAP_CALL[name]}", new
        if name == "where" and len(node.args) == 3:
            new = copy.deepcopy(node)
            new.args = [node.args[0], node.args[2], node.args[1]]
            yield "where's branches swapped", new


def sites(source: str, lines: tuple | None = None, functions: set | None = None) -> list[dict]:
    """Every mutant of FILE's @triton.jit functions (or of the named `functions`, jitted or not):
    {function, line, col, end_line, end_col, what, old, text}."""
    tree = ast.parse(source)
    found = []
    for fn in ast.walk(tree):
        if not (isinstance(fn, ast.FunctionDef) and (fn.name in functions if functions else _is_jit(fn))):
            continue
        body = fn.body[1:] if (fn.body and isinstance(fn.body[0], ast.Expr)
                               and isinstance(fn.body[0].value, ast.Constant)) else fn.body  # docstring
        for stmt in body:
            for node in ast.walk(stmt):
                if not hasattr(node, "lineno") or (lines and not lines[0] <= node.lineno <= lines[1]):
                    continue
                for what, new in _mutations(node):
                    found.append({"function": fn.name, "line": node.lineno, "col": node.col_offset,
                                  "end_line": node.end_lineno, "end_col": node.end_col_offset,
                                  "what": what, "old": ast.get_source_segment(source, node),
                                  "text": ast.unparse(new)})
    return found


def apply(source: str, site: dict) -> str:
    """source with site's node replaced by its mutated text (parenthesized: precedence stays)."""
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line.encode()))
    data = source.encode()
    begin = starts[site["line"] - 1] + site["col"]
    end = starts[site["end_line"] - 1] + site["end_col"]
    return (data[:begin] + f"({site['text']})".encode() + data[end:]).decode()


def _copy_repo(into: str) -> str:
    repo = os.path.join(into, "repo")
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", "bench_out*", "__pycache__", "*.egg-info",
                                                              "results", ".pytest_cache"))
    return repo


def run_one(repo: str, relpath: str, source: str, site: dict, tests: list, timeout: float) -> dict:
    mutated = apply(source, site)
    ast.parse(mutated)  # a mutant must still be Python
    with open(os.path.join(repo, relpath), "w") as f:
        f.write(mutated)
    env = {**os.environ, "PYTHONPATH": repo, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                               *tests], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
        # pytest: 0 passed, 1 a test failed, 5 no test ran; a signal (< 0): the run crashed, which a
        # CI run reports as a failure too (the interpreter aborts on some wild addresses).
        rc = proc.returncode
        outcome = {0: "survived", 1: "killed", 5: "no tests ran"}.get(rc, "crashed" if rc < 0 else f"error rc={rc}")
        tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    except subprocess.TimeoutExpired:
        outcome, tail = "timeout", []
    finally:
        with open(os.path.join(repo, relpath), "w") as f:
            f.write(source)
    return {**site, "outcome": outcome, "seconds": round(time.perf_counter() - start, 1), "summary": " ".join(tail)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="the kernel file, relative to the repository root")
    parser.add_argument("--tests", default="", help="pytest arguments: the selection each mutant runs")
    parser.add_argument("--sample", type=int, default=0, help="run this many mutants drawn at random (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--lines", default=None, help="A-B: only mutants on these lines")
    parser.add_argument("--functions", default=None,
                        help="name,name: mutate these functions (host code too) instead of the @triton.jit ones")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    args = parser.parse_args(argv)
    with open(os.path.join(ROOT, args.file)) as f:
        source = f.read()
    lines = tuple(int(x) for x in args.lines.split("-")) if args.lines else None
    found = sites(source, lines, set(args.functions.split(",")) if args.functions else None)
    if args.list:
        for s in found:
            print(f"{args.file}:{s['line']} {s['function']}: {s['what']}: {s['old']!r} -> {s['text']!r}")
        print(f"{len(found)} mutants")
        return 0
    chosen = random.Random(args.seed).sample(found, args.sample) if 0 < args.sample < len(found) else found
    tests = args.tests.split()
    print(f"{len(chosen)} of {len(found)} mutants of {args.file}; tests: {args.tests}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        repos = [_copy_repo(os.path.join(tmp, str(i))) for i in range(args.workers)]
        free = list(repos)
        results = []
        with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
            def job(site):
                repo = free.pop()
                try:
                    return run_one(repo, args.file, source, site, tests, args.timeout)
                finally:
                    free.append(repo)
            for n, r in enumerate(pool.map(job, chosen), 1):
                results.append(r)
                print(f"[{n}/{len(chosen)}] {r['outcome']:9s} {r['seconds']:6.1f}s {args.file}:{r['line']} "
                      f"{r['function']}: {r['what']}: {r['old']!r} -> {r['text']!r}  {r['summary']}", flush=True)
    counts = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    print("outcomes:", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for r in results:
        if r["outcome"] in ("survived", "timeout"):
            print(f"  {r['outcome']}: {args.file}:{r['line']} {r['function']}: {r['old']!r} -> {r['text']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
