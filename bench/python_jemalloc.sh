#!/bin/sh
# The PyTorch recipe's Python with the allocator bt uses: jemalloc preloaded, freed pages kept
# (`dirty_decay_ms:-1`). `BT_PYTHON=bench/python_jemalloc.sh bt-bench step --against-torch ...`
# compares bt with the recipe on the same allocator policy (README, "Benchmarks").
# Needs Debian's libjemalloc2 (or JEMALLOC_LIB pointing at a libjemalloc.so); runs python3 from
# PATH, or BT_PYTHON_REAL.
lib="${JEMALLOC_LIB:-/usr/lib/x86_64-linux-gnu/libjemalloc.so.2}"
if [ ! -e "$lib" ]; then
  echo "python_jemalloc.sh: $lib not found (apt-get install libjemalloc2, or set JEMALLOC_LIB)" >&2
  exit 2
fi
LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}" MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1" \
  exec "${BT_PYTHON_REAL:-python3}" "$@"
