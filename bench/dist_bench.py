"""Reference figures from torch.distributed (Gloo) for the same collectives bt-dist-probe times,
under the same names (bench/dist_compare.py joins the two).

Usage: python3 bench/dist_bench.py RANK WORLD PORT [REPS]; rank 0 prints the figures.
"""
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def median_ms(reps, fn):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def grad_buckets(grads, bucket_bytes):
    """Consecutive runs of grads of at most bucket_bytes (a larger one alone), as bt packs them."""
    out, cur, size = [], [], 0
    for g in grads:
        nb = g.numel() * g.element_size()
        if cur and size + nb > bucket_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append(g)
        size += nb
    if cur:
        out.append(cur)
    return out


def main():
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    reps = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    torch.set_num_threads(1)
    t = time.perf_counter()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    join_ms = (time.perf_counter() - t) * 1e3
    rows = []

    def row(name, ms, nbytes):
        rows.append((name, ms, f" ({nbytes / (ms / 1e3) / 1e9:.2f} GB/s)" if nbytes else ""))

    for mb in (25, 100):
        x = torch.ones((mb << 20) // 4)
        row(f"all_reduce {mb} MB", median_ms(reps, lambda: dist.all_reduce(x)), mb << 20)

    # The same parameter-shaped gradient list as bt-dist-probe: 100 MB in ResNet-like sizes.
    sizes = [64, 256, 4096, 65536, 147456, 589824, 2359296]
    total, used, grads = (100 << 20) // 4, 0, []
    while used < total:
        s = min(sizes[len(grads) % len(sizes)], total - used)
        used += s
        grads.append(torch.zeros(s))
    buckets = grad_buckets(grads, 25 << 20)
    what = f"grads 100 MB in {len(grads)} tensors, 25 MB buckets"

    def packed():  # flatten, reduce, copy back (what bt's allreduce_grads does per call)
        for b in buckets:
            flat = _flatten_dense_tensors(b)
            dist.all_reduce(flat)
            for g, r in zip(b, _unflatten_dense_tensors(flat, b)):
                g.copy_(r)

    row(f"{what}, packed", median_ms(reps, packed), used * 4)
    # DDP's gradient_as_bucket_view: grads live in the flat buckets; one all-reduce per bucket.
    flats = [_flatten_dense_tensors(b) for b in buckets]
    row(f"{what}, aliased", median_ms(reps, lambda: [dist.all_reduce(f) for f in flats]), used * 4)

    e = torch.ones(64, 8192)
    row("all_gather 64x8192, new output",
        median_ms(reps * 4, lambda: dist.all_gather_into_tensor(torch.empty(64 * world, 8192), e)), e.numel() * 4)
    out = torch.empty(64 * world, 8192)
    row("all_gather 64x8192, into buffer",
        median_ms(reps * 4, lambda: dist.all_gather_into_tensor(out, e)), e.numel() * 4)
    rows.append(("barrier", median_ms(reps * 10, dist.barrier), ""))
    if rank == 0:
        print(f"torch.distributed W={world} rendezvous: {join_ms:.1f} ms")
        for name, ms, bw in rows:
            print(f"torch.distributed W={world} {name}: {ms:.2f} ms{bw}")
    dist.destroy_process_group()


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    main()
