"""Timing for the Python peer scripts (softmax_sdpa.py, fla_peers.py): CUDA events around each call,
the median after a warm-up, the way bench/cuda_timing.hpp times hla's own kernels."""


def median_ms(fn, reps, warmup=3):
    import torch  # imported here so that a script can report a missing torch before timing anything

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]
