"""Reference figures from torch.distributed (Gloo) for the same collectives bt-dist-probe times.

Usage: python3 bench/dist_bench.py RANK WORLD PORT [REPS]; rank 0 prints the figures.
"""
import statistics
import sys
import time

import torch
import torch.distributed as dist


def median_ms(reps, fn):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    reps = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    torch.set_num_threads(1)
    t = time.perf_counter()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    join_ms = (time.perf_counter() - t) * 1e3
    rows = []
    for mb in (25, 100):
        x = torch.ones((mb << 20) // 4)
        ms = median_ms(reps, lambda: dist.all_reduce(x))
        rows.append((f"all_reduce {mb} MB", ms, f" ({(mb << 20) / (ms / 1e3) / 1e9:.2f} GB/s)"))
    e = torch.ones(64, 8192)
    out = torch.empty(64 * world, 8192)
    ms = median_ms(reps, lambda: dist.all_gather_into_tensor(out, e))
    rows.append(("all_gather 64x8192 fp32 per rank", ms, f" ({e.numel() * 4 / (ms / 1e3) / 1e9:.2f} GB/s)"))
    ms = median_ms(reps * 10, dist.barrier)
    rows.append(("barrier", ms, ""))
    if rank == 0:
        print(f"torch.distributed W={world} rendezvous: {join_ms:.1f} ms")
        for name, ms, bw in rows:
            print(f"torch.distributed W={world} {name}: {ms:.2f} ms{bw}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
