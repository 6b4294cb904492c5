"""Our causal DiT against upstream LiveAvatar's, on the same card, in one call (issue 13).

Upstream is timed by the harness in ../shared/bench/upstream_speed (its run.py runs LiveAvatar's
CausalWanModel_S2V unmodified, at full size with random weights, called the way its single-GPU
pipeline calls it); ours by bench/bench_generator.py, the same way. Nothing of upstream is in this
repository: copy the harness to the git-ignored .upstream_speed/ and run its prepare.sh against a
LiveAvatar export (docs/performance.md, "Against upstream in one call"). Each variant runs in its own
process on each side (upstream reads ENABLE_COMPILE at import), sizes and variants in the order given,
and the table pairs them:

    python3 bench/vs_upstream.py --sizes 704*384 --variants bf16,fp8 --out $OUT/vs_upstream.json
    python3 bench/vs_upstream.py --tiny --device cpu        # CPU check of the plumbing (tiny models)

Variants: bf16 (eager), fp8 (FP8 linears, eager), compile (bf16 + torch.compile), fp8+compile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / ".upstream_speed"
FRAMES_PER_BLOCK = 12
# variant -> (bench_generator.py arguments and the label of its run, upstream run.py flags)
VARIANTS = {
    "bf16": (["--only", "bf16"], "bf16", []),
    "fp8": (["--only", "fp8"], "fp8", ["--fp8"]),
    "compile": (["--only", "compile-bf16"], "bf16+compile", ["--compile"]),
    "fp8+compile": (["--only", "fp8", "--compile-first"], "fp8+compile", ["--fp8", "--compile"]),
}
UPSTREAM_TINY_SIZE = "128*64"  # run.py --tiny's own model; the plumbing check pairs rows by order


class BadInput(Exception):
    """Exit 2 with one line."""


def check_harness(harness: Path) -> None:
    if not (harness / "run.py").is_file() or not (harness / "upstream" / "liveavatar").is_dir():
        raise BadInput(
            f"no prepared upstream harness in {harness}: copy ../shared/bench/upstream_speed there and run "
            "its prepare.sh with UPSTREAM_SRC_LOCAL=<a LiveAvatar export> (docs/performance.md)"
        )


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="704*384,384*256")
    ap.add_argument("--variants", default="bf16,fp8")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models on both sides (a CPU check, not a comparison)")
    ap.add_argument("--harness", type=Path, default=HARNESS, help="the prepared harness (default .upstream_speed)")
    ap.add_argument("--timed", type=int, default=8, help="timed blocks per variant, both sides")
    ap.add_argument("--time-budget", type=float, default=540, help="seconds; variants not started by then are skipped")
    ap.add_argument("--out", default=None, help="JSON results (default $OUT/vs_upstream.json when $OUT is set)")
    args = ap.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        raise BadInput(f"--variants: unknown {unknown or 'none given'}; choose from {', '.join(VARIANTS)}")
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in args.sizes:
        w, _, h = s.partition("*")
        if not (w.isdigit() and h.isdigit() and int(w) % 16 == 0 and int(h) % 16 == 0):
            raise BadInput(f"--sizes: {s!r} is not W*H in multiples of 16, e.g. 704*384")
    check_harness(args.harness)
    return args


def ours(variant: str, size: str, args, work: Path) -> dict:
    """bench_generator.py's run of `variant` at `size` (its own process)."""
    extra, label, _ = VARIANTS[variant]
    out = work / f"ours-{variant}-{size.replace('*', 'x')}.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_generator.py"), *extra, "--sizes", size]
    cmd += ["--device", args.device, "--blocks", str(args.timed + 2), "--warm", "2", "--flat-blocks", "0"]
    cmd += ["--out", str(out)] + (["--tiny"] if args.tiny else [])
    subprocess.run(cmd, check=False, cwd=ROOT)
    if not out.exists():
        return {"error": "bench_generator.py wrote no result"}
    result = json.loads(out.read_text())
    runs = [r for r in result.get("runs", []) if r["variant"] == label]
    if not runs:
        return {"error": "; ".join(f"{k}: {v}" for k, v in result.get("errors", {}).items()) or "no run"}
    # the run with all its cache sets (bench_generator also times a one-set layout), warm if timed twice
    full = max(r["kv_sets"] for r in runs)
    run = [r for r in runs if r["kv_sets"] == full][-1]
    return {"size": run["size"], "ms_per_block": run["block_ms"], "peak_gib": run["peak_gib"], "env": result["env"]}


def upstream(variant: str, size: str, args, work: Path) -> dict:
    """The harness's run.py for `variant` at `size` (its own process)."""
    flags = VARIANTS[variant][2]
    out = work / f"upstream-{variant}-{size.replace('*', 'x')}.jsonl"
    site = work / "upstream-site"  # its wheels (diffusers, easydict), before anything of ours
    if not site.exists():
        wheels = sorted(str(p) for p in (args.harness / "wheels").glob("*.whl"))
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site)]
        subprocess.run(pip + wheels, check=False)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "run.py", *flags, "--timed", str(args.timed), "--json-out", str(out)]
    cmd += ["--tiny", "--device", args.device] if args.tiny else ["--size", size]
    subprocess.run(cmd, check=False, cwd=args.harness, env=env)
    if not out.exists():
        return {"error": "run.py wrote no result"}
    r = json.loads(out.read_text().splitlines()[-1])
    peak = r.get("peak_alloc_gib")
    return {"size": r["size"], "ms_per_block": r["ms_per_block_median"], "peak_gib": peak, "env": r.get("env")}


def fps(ms: float | None) -> float | None:
    return FRAMES_PER_BLOCK / (ms / 1000) if ms else None


def main(argv=None) -> int:
    try:
        args = parse(argv)
    except BadInput as exc:
        print(f"vs_upstream: {exc}", file=sys.stderr)
        return 2
    out_path = args.out or (os.path.join(os.environ["OUT"], "vs_upstream.json") if os.environ.get("OUT") else None)
    results = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "tiny": args.tiny,
        "rows": [],
        "skipped": [],
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vs-upstream-") as tmp:
        for size in args.sizes:
            for variant in args.variants:
                if time.monotonic() - started > args.time_budget:
                    results["skipped"].append(f"{variant} {size}")
                    continue
                print(f"vs_upstream: {variant} {size}: ours, then upstream", file=sys.stderr, flush=True)
                mine, theirs = ours(variant, size, args, Path(tmp)), upstream(variant, size, args, Path(tmp))
                row = {"variant": variant, "size": size, "ours": mine, "upstream": theirs}
                if mine.get("ms_per_block") and theirs.get("ms_per_block") and not args.tiny:
                    row["speedup"] = theirs["ms_per_block"] / mine["ms_per_block"]
                results["rows"].append(row)
                if out_path:
                    Path(out_path).write_text(json.dumps(results, indent=1))
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    print("| variant | size | ours ms/block | ours FPS | upstream ms/block | upstream FPS | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for row in results["rows"]:
        cells = []
        for side in ("ours", "upstream"):
            r = row[side]
            ms = r.get("ms_per_block")
            cells += [f"{ms:.0f}", f"{fps(ms):.1f}"] if ms else [r.get("error", "-")[:60], "-"]
        speedup = f"{row['speedup']:.2f}x" if "speedup" in row else "-"
        print(f"| {row['variant']} | {row['size']} | " + " | ".join(cells) + f" | {speedup} |")
    for skipped in results["skipped"]:
        print(f"skipped (time budget): {skipped}")
    if results["tiny"]:
        print("(tiny models on both sides, of different shapes: a check of the plumbing, not a comparison)")


if __name__ == "__main__":
    sys.exit(main())
