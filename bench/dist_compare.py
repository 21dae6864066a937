"""Joins the figures of bt-dist-probe (rust-c10d) and dist_bench.py (torch.distributed) printed by
bench/dist_bench.sh: per world size and collective, the median over rounds of each side's median,
and the ratio rust / torch (the target is ≤ 1.10).

Usage: python3 bench/dist_compare.py LOG
"""
import re
import statistics
import sys
from collections import defaultdict

LINE = re.compile(r"^(rust-c10d|torch\.distributed) W=(\d+) (.+): ([0-9.]+) ms")


def main():
    runs = defaultdict(list)  # (world, name, impl) -> [ms per round]
    order = []
    for line in open(sys.argv[1]):
        m = LINE.match(line.strip())
        if not m:
            continue
        impl, world, name, ms = m.group(1), int(m.group(2)), m.group(3), float(m.group(4))
        if (world, name) not in order:
            order.append((world, name))
        runs[(world, name, impl)].append(ms)
    print(f"{'W':>2}  {'collective':<52} {'bt (ms)':>9} {'torch (ms)':>10} {'bt/torch':>8}")
    for world, name in order:
        r = runs.get((world, name, "rust-c10d"))
        t = runs.get((world, name, "torch.distributed"))
        fr = f"{statistics.median(r):9.2f}" if r else f"{'-':>9}"
        ft = f"{statistics.median(t):10.2f}" if t else f"{'-':>10}"
        ratio = ""
        if r and t and name != "rendezvous":
            q = statistics.median(r) / statistics.median(t)
            ratio = f"{q:8.2f}" + ("" if q <= 1.10 else "  (over 10%)")
        print(f"{world:>2}  {name:<52} {fr} {ft} {ratio}")


if __name__ == "__main__":
    main()
