#!/usr/bin/env python3
"""Turns criterion's output into BENCHMARKS.md tables and a throughput chart.

Usage: python3 benches/report.py CRITERION_DIR OUT_PNG > table.md
CRITERION_DIR is $CARGO_TARGET_DIR/criterion after
`cargo bench -p keyfold-benches --bench records [--features peers]`.
"""
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1])
out_png = sys.argv[2] if len(sys.argv) > 2 else None

rows = {}  # (group, function, size) -> mean ns
for bench in root.glob("*/*/*/new/benchmark.json"):
    meta = json.loads(bench.read_text())
    est = json.loads((bench.parent / "estimates.json").read_text())
    group = meta["group_id"]
    function = meta["function_id"]
    size = int(meta["value_str"])
    rows[(group, function, size)] = est["mean"]["point_estimate"]


def fmt_time(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"


def mbps(size, ns):
    return size / ns * 1e3  # bytes/ns -> MB/s


sizes = sorted({k[2] for k in rows if k[0] in ("seal", "open")})
for group in ("seal", "open"):
    functions = sorted({k[1] for k in rows if k[0] == group})
    if not functions:
        continue
    print(f"\n### {group}\n")
    print("| implementation | " + " | ".join(f"{s} B" for s in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for f in functions:
        cells = []
        for s in sizes:
            ns = rows.get((group, f, s))
            cells.append("" if ns is None else f"{fmt_time(ns)} ({mbps(s, ns):,.0f} MB/s)")
        print(f"| {f} | " + " | ".join(cells) + " |")

    # Ratios the performance issue sets as targets.
    print(f"\nRatios ({group}):\n")
    for suite in ("aes-256-gcm", "chacha20-poly1305"):
        for backend in ("aws-lc", "rustcrypto"):
            k = rows.get((group, f"keyfold/{suite}/{backend}", 1048576))
            r = rows.get((group, f"raw/{suite}/{backend}", 1048576))
            if k and r:
                print(f"- 1 MiB, {suite}, {backend}: keyfold runs at {r / k:.2f} of the raw AEAD's speed")
            ra = rows.get((group, f"raw-alloc/{suite}/{backend}", 1048576))
            if k and ra:
                print(f"- 1 MiB, {suite}, {backend}: keyfold runs at {ra / k:.2f} of the raw AEAD's speed into a new buffer")
            k = rows.get((group, f"keyfold-in-place/{suite}/{backend}", 1048576))
            if k and r:
                print(f"- 1 MiB, {suite}, {backend}, in place: keyfold runs at {r / k:.2f} of the raw AEAD's speed")
    k1 = rows.get((group, "keyfold/aes-256-gcm/aws-lc", 1024))
    t1 = rows.get((group, "tink-rust/aes256-gcm", 1024))
    e1 = rows.get((group, "aws-esdk/commit", 1024))
    if k1 and t1:
        print(f"- 1 KiB: keyfold {fmt_time(k1)} vs tink-rust {fmt_time(t1)}: {t1 / k1:.2f}x")
    ki = rows.get((group, "keyfold-in-place/aes-256-gcm/aws-lc", 1024))
    if ki and t1:
        print(f"- 1 KiB, keyfold in place vs tink-rust allocating: {fmt_time(ki)} vs {fmt_time(t1)}: {t1 / ki:.2f}x")
    if k1 and e1:
        print(f"- 1 KiB: keyfold is {e1 / k1:.0f}x faster than aws-esdk's committing suite")

rot = {k: v for k, v in rows.items() if k[0] == "rotate"}
if rot:
    print("\n### rotate (per record)\n")
    print("| operation | 1 KiB | 1 MiB | records/s per core (1 KiB) |")
    print("|---|---:|---:|---:|")
    for f in sorted({k[1] for k in rot}):
        a, b = rot.get(("rotate", f, 1024)), rot.get(("rotate", f, 1048576))
        print(f"| {f} | {fmt_time(a)} | {fmt_time(b)} | {1e9 / a:,.0f} |")
    a = rot.get(("rotate", "rewrap-header-in-place", 1024))
    b = rot.get(("rotate", "rewrap-header-in-place", 1048576))
    if a and b:
        print(f"\nHeader-only rewrap: 1 MiB costs {b / a:.2f}x what 1 KiB costs.")

if out_png:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, group in zip(axes, ("seal", "open")):
        # 20 distinct colours: the default cycle of 10 repeats with 17 lines.
        for i, f in enumerate(sorted({k[1] for k in rows if k[0] == group})):
            xs = [s for s in sizes if (group, f, s) in rows]
            ys = [mbps(s, rows[(group, f, s)]) for s in xs]
            style = "--" if f.startswith("raw") else ("-" if f.startswith("keyfold") else ":")
            ax.plot(xs, ys, style, marker="o", label=f, color=plt.cm.tab20(i % 20))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("record size (bytes)")
        ax.set_title(group)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("MB/s")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
