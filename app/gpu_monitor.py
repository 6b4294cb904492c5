"""`avatar gpu-monitor`: GPU memory, utilisation, temperature and power over time, like an
nvidia-smi query loop, printed as a table or written as CSV. Needs NVML (an NVIDIA driver)."""

import argparse
import csv
import datetime as dt
import os
import sys
import time

FIELDS = (
    "timestamp",
    "gpu",
    "name",
    "utilization_gpu_pct",
    "utilization_mem_pct",
    "memory_used_mib",
    "memory_total_mib",
    "temperature_c",
    "power_w",
)
EXIT_NO_NVML = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between samples (default 1)")
    p.add_argument("--csv", metavar="FILE", help="append CSV rows to FILE instead of printing a table")
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N samples (default: until Ctrl-C)")


def _open_nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception as e:  # noqa: BLE001 - missing library, driver or device: same answer
        raise RuntimeError(f"no NVIDIA GPU monitoring here (NVML unavailable: {e})") from None


def sample(nv) -> list[dict]:
    """One row per GPU; readings a board does not support are left empty."""
    now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
    rows = []
    for i in range(nv.nvmlDeviceGetCount()):
        h = nv.nvmlDeviceGetHandleByIndex(i)
        name = nv.nvmlDeviceGetName(h)
        row = {"timestamp": now, "gpu": i, "name": name.decode() if isinstance(name, bytes) else name}
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        row["memory_used_mib"] = mem.used // 2**20
        row["memory_total_mib"] = mem.total // 2**20
        for key, read in (
            ("utilization_gpu_pct", lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu),
            ("utilization_mem_pct", lambda: nv.nvmlDeviceGetUtilizationRates(h).memory),
            ("temperature_c", lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            ("power_w", lambda: round(nv.nvmlDeviceGetPowerUsage(h) / 1000.0, 1)),
        ):
            try:
                row[key] = read()
            except nv.NVMLError:
                row[key] = ""
        rows.append(row)
    return rows


def run(args) -> int:
    if args.interval <= 0:
        print("avatar gpu-monitor: --interval must be positive", file=sys.stderr)
        return EXIT_NO_NVML
    try:
        nv = _open_nvml()
    except RuntimeError as e:
        print(f"avatar gpu-monitor: {e}", file=sys.stderr)
        return EXIT_NO_NVML
    out, writer = None, None
    if args.csv:
        new = not os.path.exists(args.csv) or os.path.getsize(args.csv) == 0
        out = open(args.csv, "a", newline="")
        writer = csv.DictWriter(out, FIELDS)
        if new:
            writer.writeheader()
    else:
        print(
            "{:<24} {:>3} {:<22} {:>5} {:>5} {:>9} {:>9} {:>5} {:>7}".format(
                "time", "gpu", "name", "util%", "mem%", "used MiB", "total MiB", "temp", "power W"
            ),
            flush=True,
        )
    n = 0
    try:
        while True:
            for row in sample(nv):
                if writer:
                    writer.writerow(row)
                else:
                    print(
                        "{timestamp:<24} {gpu:>3} {name:<22.22} {utilization_gpu_pct:>5} {utilization_mem_pct:>5} "
                        "{memory_used_mib:>9} {memory_total_mib:>9} {temperature_c:>5} {power_w:>7}".format(**row),
                        flush=True,
                    )
            if out:
                out.flush()  # a reader (or a crash) sees every finished sample
            n += 1
            if args.count and n >= args.count:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        if out:
            out.close()
        try:
            nv.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="avatar gpu-monitor", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
