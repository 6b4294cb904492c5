"""`--compile-cache DIR`: a second process with the same directory loads torch.compile's graphs
from it instead of compiling them (inductor's FX graph cache; Triton's kernels on a GPU)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(600)

# What `avatar serve --compile-cache DIR` does before building engines, then a small compiled
# conv stack (the VAE decoder's kind of layers) at two shapes, as the warm-up does.
SCRIPT = r"""
import json, sys, time
from avatar.app.serve import use_compile_cache
use_compile_cache(sys.argv[1])
import torch
from torch._dynamo.utils import counters
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 3, padding=1))
compiled = torch.compile(model)
t0 = time.perf_counter()
with torch.no_grad():
    for size in (32, 48):
        compiled(torch.randn(1, 3, size, size))
print(json.dumps({"s": time.perf_counter() - t0, "hit": counters["inductor"]["fxgraph_cache_hit"],
                  "miss": counters["inductor"]["fxgraph_cache_miss"]}))
"""


def _run(cache_dir) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(cache_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(cache_dir.parent)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_start_compiles_from_the_cache(tmp_path):
    cache = tmp_path / "compile-cache"
    first, second = _run(cache), _run(cache)
    print(f"first start {first}, second start {second}")
    assert first["miss"] >= 1 and first["hit"] == 0  # compiled, and stored
    assert (cache / "inductor").is_dir()
    assert second["miss"] == 0 and second["hit"] == first["miss"]  # every graph from the cache
    assert second["s"] < first["s"]
