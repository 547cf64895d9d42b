"""The benchmark application: `scc bench`, per-image latency of defenses x backends x dtypes (the paper's Table 4),
with the machine's measured limits beside every row.

    latency.py   images and models for a benchmark, the interleaved timing of every runner, the Table 4 table
    roofline.py  FLOPs counted in a real run, the measured matmul peak and memory bandwidth
    explain.py   `scc bench --explain`: encoder passes per image, counted, against each defense's record
"""
