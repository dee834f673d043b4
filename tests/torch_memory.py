"""Peak memory of torch's CPU allocator during a call (shared by the tests and
benchmarks/bench_kernels.py)."""
from __future__ import annotations


def peak_extra_bytes(fn):
    """Peak bytes torch's CPU allocator held during ``fn()`` above the level before it,
    and the number of allocation/free events seen (torch.profiler with
    ``profile_memory=True``: every allocation and free in order)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak, len(events)
