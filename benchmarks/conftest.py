"""Shared benchmark fixtures: the device, a synchronising timer and the copy bandwidth of this run.

Every benchmark reports time (pytest-benchmark: warm-up rounds first, median in the table), and in
`extra_info` the floor bytes of the op, the effective bandwidth floor_bytes / median and that as a
per cent of the device-to-device copy bandwidth measured in the same session.
"""
import statistics
import time

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def _measure_copy_bandwidth() -> float:
    """Bytes per second of a large tensor copy (read + write), median of several runs."""
    nbytes = (512 if ON_GPU else 64) * 2**20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    times = []
    for _ in range(10 if ON_GPU else 5):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    return _measure_copy_bandwidth()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


def report_bandwidth(benchmark, floor_bytes: int, copy_bw: float) -> None:
    """Adds floor bytes, effective GB/s and % of copy bandwidth to the benchmark's JSON row."""
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None and getattr(stats, "stats", None) is not None else None
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if ON_GPU else "cpu"
    benchmark.extra_info["floor_bytes"] = int(floor_bytes)
    benchmark.extra_info["copy_GBps"] = round(copy_bw / 1e9, 1)
    if median:
        bw = floor_bytes / median
        benchmark.extra_info["effective_GBps"] = round(bw / 1e9, 2)
        benchmark.extra_info["pct_of_copy"] = round(100 * bw / copy_bw, 2)


def host_and_wall_us(step, reps: int = 20):
    """Median host time of one step() (the time it takes to return, i.e. to queue its launches) and
    median wall time of a synchronised step, in microseconds. Host near wall: the step is host-bound,
    the GPU waits for launches and a faster kernel would not show."""
    host, wall = [], []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        sync()
        host.append(t1 - t0)
        wall.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(host), 1e6 * statistics.median(wall)


def record_host_time(benchmark, work, reps: int = 10) -> None:
    """GPU rows: host_and_wall_us's host time of `work()` (one step without its final sync) as
    extra_info["host_us"], to read against the row's median (the adapter at B = 1 in runs 3-4 read
    as host-bound)."""
    if ON_GPU:
        benchmark.extra_info["host_us"] = round(host_and_wall_us(work, reps)[0], 1)


def bench_host_overhead(benchmark, work, group: str) -> None:
    """The host-overhead rows (test_host_overhead in the op files): `work()` is a step whose kernels do
    next to nothing, timed synchronised in many short iterations, with its host time beside it."""
    def run():
        work()
        sync()

    benchmark.group = group
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if ON_GPU else "cpu"
    benchmark.pedantic(run, rounds=30, warmup_rounds=3, iterations=20)
    record_host_time(benchmark, work)
