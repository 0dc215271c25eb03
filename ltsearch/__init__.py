"""ltsearch: search long-tailed recognition methods and their hyper-parameters."""
import os

# PyTorch's own switch (c10's CPU allocator, read at its first allocation, hence here, before
# torch is imported): tensors of 2 MB and more on transparent huge pages. A batch of 128
# float images at 224 px is 77 MB, newly allocated every step; its 19,000 page faults took
# 27 of the CPU's ~100 ms per batch on this project's 2-core machine, its 37 huge ones almost
# nothing (scripts/bench_data.py: 4.2–4.7x → 5.1–5.8x the DataLoader). Set it to 0 to keep
# 4 kB pages.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
