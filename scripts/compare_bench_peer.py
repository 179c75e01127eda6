#!/usr/bin/env python3
"""The table of docs/PERFORMANCE.md from one GPU session's logs:
    compare_bench_peer.py BENCH_TRAIN_LOG PEER_LOG
BENCH_TRAIN_LOG: the output of `decotron bench train --all-variants` (its markdown table);
PEER_LOG: the output of ../shared/peers/torch_deco.py --mode train (one JSON line per model,
dense twin then DECO). Prints each variant's tokens/s and peak memory beside the peer's, the
ratio, and whether the target of performance-targets.md is met (DECO sparse >= 1.5x the peer's
DECO, dense >= 1.1x the peer's dense, peak memory no more than the peer's). Exits 1 when a log
lacks what it needs."""
import json
import sys

TARGETS = {"deco-sparse": (True, 1.5), "deco-dense-masked": (True, None), "dense": (False, 1.1)}


def read_lines(path):
    try:
        with open(path) as f:
            return f.read().splitlines()
    except OSError as e:
        sys.exit(f"compare_bench_peer: cannot read {path}: {e.strerror}")


def bench_rows(path):
    rows = {}
    for line in read_lines(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in TARGETS and cells[5].endswith("MiB"):
            rows[cells[0]] = (float(cells[1]), float(cells[5].split()[0]) / 1024)
    if not rows:
        sys.exit(f"compare_bench_peer: {path} holds no bench train table (did the run finish?)")
    return rows


def peer_rows(path):
    rows = {}
    for line in read_lines(path):
        if line.startswith("{") and '"tokens_per_s"' in line:
            r = json.loads(line)
            rows[bool(r["deco"])] = (r["tokens_per_s"], r["peak_mem_gib"])
    if not rows:
        sys.exit(f"compare_bench_peer: {path} holds no peer result line (did the peer run finish?)")
    return rows


if len(sys.argv) != 3:
    sys.exit("usage: compare_bench_peer.py BENCH_TRAIN_LOG PEER_LOG")
ours, peer = bench_rows(sys.argv[1]), peer_rows(sys.argv[2])
print("| variant | tokens/s | peer tokens/s | ratio | target | peak memory | peer peak | verdict |")
print("|---|---|---|---|---|---|---|---|")
for name, (deco, target) in TARGETS.items():
    if name not in ours or deco not in peer:
        continue
    (tps, mem), (ptps, pmem) = ours[name], peer[deco]
    ratio = tps / ptps
    ok = (target is None or ratio >= target) and mem <= pmem
    verdict = "-" if target is None else ("met" if ok else "missed")
    print(f"| {name} | {tps:,.0f} | {ptps:,.0f} ({'DECO' if deco else 'dense'}) | {ratio:.2f}x | "
          f"{'-' if target is None else f'>= {target}x'} | {mem:.1f} GiB | {pmem:.1f} GiB | {verdict} |")
