"""The GPU's SM clock and power while a bench runs: whether the card held its clock or its power
limit pulled it down (which changes every time measured on it, and differs between cards).

Why: in run V4 (H100, docs/performance.md) upstream's DiT ran its timed blocks at 1980 MHz, ~630
W, never capped, while this project's engine ran at a median 1770 MHz (down to 1680) with the
software power cap active in 50 of its 51 busy samples: the denser GPU work pays in clock.

As a sampler in Python (bench_attention_data.py):

    with GpuSampler(device) as sampler:
        ...
    sampler.summary()

Around any command (bench/engine_ab_gpu.sh):

    nvidia-smi $(python3 bench/gpu_clocks.py --query) -lms 200 > smi.csv &  ...  kill $!
    python3 bench/gpu_clocks.py smi.csv          # one JSON line: the busy samples' clock and power
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading

QUERY = "clocks.sm,power.draw,power.limit,clocks_throttle_reasons.active"
SW_POWER_CAP = 0x4  # nvmlClocksThrottleReasonSwPowerCap
BUSY_SHARE = 0.6  # a sample is "busy" at 60% of the power limit or more (compiles and waits are not)


def nvidia_smi_args() -> list[str]:
    return [f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"]


def parse(lines) -> list[tuple[float, float, float, int]]:
    """(clock MHz, power W, power limit W, throttle reasons) per line of nvidia-smi's CSV; lines
    that are not samples (a header, '[N/A]', a cut last line) are skipped."""
    samples = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            samples.append((float(parts[0]), float(parts[1]), float(parts[2]), int(parts[3], 16)))
        except ValueError:
            continue
    return samples


def summarize(samples: list[tuple[float, float, float, int]]) -> dict:
    """The busy samples' clock and power, and the share of them under the software power cap."""
    busy = [s for s in samples if s[1] >= BUSY_SHARE * s[2]]
    res: dict = {"samples": len(samples), "busy_samples": len(busy)}
    if busy:
        clocks, powers = [s[0] for s in busy], [s[1] for s in busy]
        res |= {
            "clock_mhz_median": statistics.median(clocks),
            "clock_mhz_min": min(clocks),
            "power_w_median": statistics.median(powers),
            "power_limit_w": busy[0][2],
            "power_capped_share": sum(1 for s in busy if s[3] & SW_POWER_CAP) / len(busy),
        }
    return res


class GpuSampler:
    """nvidia-smi's samples every 100 ms while in a `with` (none off CUDA or without nvidia-smi)."""

    def __init__(self, device, interval_ms: int = 100):
        import torch  # here: the command line runs without torch

        self.device = torch.device(device)
        self.on = self.device.type == "cuda"
        self.interval_ms = interval_ms
        self.lines: list[str] = []
        self.proc = None

    def __enter__(self):
        if self.on:
            import torch

            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            try:
                self.proc = subprocess.Popen(
                    ["nvidia-smi", f"--id={index}", *nvidia_smi_args(), "-lms", str(self.interval_ms)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            except FileNotFoundError:
                return self
            self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
            self.reader.start()
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.reader.join(timeout=2)

    def summary(self) -> dict:
        return summarize(parse(self.lines)) if self.lines else {}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--query"]:
        print(" ".join(nvidia_smi_args()))
        return 0
    if len(argv) != 1:
        print("usage: python3 bench/gpu_clocks.py SMI.csv | --query", file=sys.stderr)
        return 2
    try:
        with open(argv[0]) as f:
            print(json.dumps(summarize(parse(f))))
    except OSError as e:
        print(f"gpu_clocks: {e.strerror}: {argv[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
