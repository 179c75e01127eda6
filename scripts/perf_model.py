#!/usr/bin/env python3
"""Performance model of a DECO training step on H100s (docs/performance-model.md).

Pure Python 3, no dependencies.

  perf_model.py [model] [--config configs/deco-1.2b.yaml] [--tflops 374] [--global-batch 512] ...
      Step time, communication and memory per GPU of each parallel layout on 8 H100s (one node,
      NVLink) and 64 H100s (8 nodes, InfiniBand NDR), as Markdown tables (--detail: every
      collective of every layout).

  perf_model.py volumes RUN_DIR --np N
      The bytes per optimizer step of each group and collective that the volume formulas give for
      the run's resolved config (RUN_DIR/config.yaml) and layout (tensor, data, expert, sequence
      parallelism, distributed optimizer), against what the communicators measured
      (RUN_DIR/metrics.jsonl, "comm_bytes_by_op"). The expert-parallel all-to-all depends on the
      routing: it is compared per step with the formula at that step's measured activation ratios.
      Exit status 1 when an exact row differs or the all-to-all is off by more than --ep-tolerance.
  perf_model.py volumes --config FILE [--set k=v ...] --np N
      The formula alone.

The volume formulas are one function, step_collectives(): the communication of the layers as
they are in this checkout (checked byte for byte against measured runs by `volumes` and, for DP,
TP and TP x DP, tests/test_parallel_mpi.cpp; the expert-parallel all-to-all is an expectation
over the routing).
"""
import argparse
import json
import math
import os
import sys

# ---------------------------------------------------------------------------------------------
# Configs: a small reader for Decotron's block-style YAML (the shipped configs and the resolved
# config.yaml of a run directory), with the defaults of the keys the model uses.

DEFAULTS = {
    "model": {"arch": "deco", "vocab_size": 73448, "seq_len": 4096, "hidden": 768, "layers": 16, "heads": 6,
              "kv_heads": 0, "ffn_hidden": 1920, "experts": 42, "expert_width": 64, "shared_expert_width": 128,
              "dense_layers": 1, "expert_scaling": "expert", "gated_experts": False},
    "train": {"micro_batch": 8, "global_batch": 64, "target_ratio": 0.2},
    "parallel": {"tensor": 1, "data": 0, "expert": 1, "sequence": False},
}


def parse_scalar(v):
    v = v.strip()
    if v.startswith("[") and v.endswith("]"):
        return [parse_scalar(x) for x in v[1:-1].split(",") if x.strip()]
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
        return v[1:-1]
    if v in ("true", "false"):
        return v == "true"
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def strip_comment(line):
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def read_config(path, sets=()):
    cfg = {s: dict(v) for s, v in DEFAULTS.items()}
    section = None
    with open(path) as f:
        for n, raw in enumerate(f, 1):
            line = strip_comment(raw).rstrip()
            if not line.strip():
                continue
            key, sep, val = line.strip().partition(":")
            if not sep:
                sys.exit(f"{path}:{n}: not a 'key: value' line (perf_model.py reads block-style YAML)")
            if not line.startswith((" ", "\t")):
                if val.strip():
                    sys.exit(f"{path}:{n}: flow-style sections are not read here; use `decotron config {path}` "
                             "to write the resolved block-style config")
                section = key
                cfg.setdefault(section, {})
            elif section is not None:
                cfg[section][key] = parse_scalar(val)
    for s in sets:
        k, _, v = s.partition("=")
        sec, _, key = k.partition(".")
        cfg.setdefault(sec, {})[key] = parse_scalar(v)
    return cfg


# ---------------------------------------------------------------------------------------------
# The parameters, as the model creates them (model/*.cpp): name, shape, partition, expert block,
# trainable.

def parameters(m):
    h, V, E, d, s = m["hidden"], m["vocab_size"], m["experts"], m["expert_width"], m["shared_expert_width"]
    kvd = (m["kv_heads"] or m["heads"]) * (h // m["heads"])
    out = [("embedding.weight", (V, h), "vocab", 0, True)]
    for i in range(m["layers"]):
        p = f"layers.{i}."
        out += [(p + "attn_norm.weight", (h,), "replicated", 0, True), (p + "ffn_norm.weight", (h,), "replicated", 0, True),
                (p + "attn.wq", (h, h), "column", 0, True), (p + "attn.wk", (kvd, h), "column", 0, True),
                (p + "attn.wv", (kvd, h), "column", 0, True), (p + "attn.wo", (h, h), "row", 0, True)]
        if m["arch"] == "deco" and i >= m["dense_layers"]:
            f = p + "ffn."
            out += [(f + "w_router", (E, h), "replicated", 0, True), (f + "w_up", (E * d, h), "expert_rows", d, True),
                    (f + "gamma", (d,), "replicated", 0, True), (f + "w_down", (h, E * d), "expert_cols", d, True)]
            scaling = m["expert_scaling"]
            if scaling in ("expert", "fixed"):
                out.append((f + "g", (E,), "expert_entries", 1, scaling == "expert"))
            elif scaling == "scalar":
                out.append((f + "g", (1,), "replicated", 0, True))
            if m["gated_experts"]:
                out.append((f + "w_gate", (E * d, h), "expert_rows", d, True))
            if s > 0:
                out += [(f + "shared.w_gate", (s, h), "column", 0, True), (f + "shared.w_up", (s, h), "column", 0, True),
                        (f + "shared.w_down", (h, s), "row", 0, True)]
        else:
            F = m["ffn_hidden"]
            out += [(p + "ffn.w_gate", (F, h), "column", 0, True), (p + "ffn.w_up", (F, h), "column", 0, True),
                    (p + "ffn.w_down", (h, F), "row", 0, True)]
    out += [("final_norm.weight", (h,), "replicated", 0, True), ("lm_head.weight", (V, h), "vocab", 0, True)]
    return out


# Split by whole experts over tensor x expert ranks, gradients summed over `edp`
# (parallel/grad_sync.cpp: is_expert_parameter). The expert scaling g ("expert_entries") is whole
# on every rank and its gradient is averaged over `dp` like the router's.
EXPERT = ("expert_rows", "expert_cols")


def local_numel(shape, partition, block, tp, ep=1):
    """Elements one rank holds: tensor parallelism splits column/row/vocab/expert_rows/expert_cols
    partitions (parallel/tensor_parallel.cpp), expert parallelism whole experts (the busiest rank:
    ceil, for layouts decotron refuses)."""
    n = math.prod(shape)
    if partition == "expert_entries":  # g: one entry per expert, whole on every rank
        return n
    if partition in ("column", "vocab", "expert_rows"):
        dim = 0
    elif partition in ("row", "expert_cols"):
        dim = 1
    else:
        return n
    unit = block if partition in ("expert_rows", "expert_cols") else 1
    units = shape[dim] // unit
    if partition in ("expert_rows", "expert_cols"):  # whole experts over tensor x expert ranks
        assert ep > 1 or units % tp == 0, f"{units} experts do not split over tensor {tp}"
        per = math.ceil(units / (tp * ep))
    else:
        assert units % tp == 0, f"{units} rows/columns do not split over tensor {tp}"
        per = units // tp
    return n // shape[dim] * per * unit


def param_counts(m, tp=1, ep=1):
    """(non-expert, expert) trainable elements on one rank."""
    ne = ex = 0
    for name, shape, part, block, trainable in parameters(m):
        if not trainable:
            continue
        k = local_numel(shape, part, block, tp, ep)
        if part in EXPERT:
            ex += k
        else:
            ne += k
    return ne, ex


def flops_per_token(m, ratio=1.0):
    """Model FLOPs per token, forward + backward: Transformer::train_flops_per_token (ratio 1 is
    the peer's formula, performance-targets.md)."""
    h, E, d, s = m["hidden"], m["experts"], m["expert_width"], m["shared_expert_width"]
    kvd = (m["kv_heads"] or m["heads"]) * (h // m["heads"])
    matmul = m["vocab_size"] * h
    for i in range(m["layers"]):
        matmul += 2 * h * h + 2 * h * kvd
        if m["arch"] == "deco" and i >= m["dense_layers"]:
            matmul += E * h + 3 * h * s + ratio * (3 if m["gated_experts"] else 2) * h * E * d
        else:
            matmul += 3 * h * m["ffn_hidden"]
    return 6 * matmul + 6.0 * m["layers"] * h * m["seq_len"]


# ---------------------------------------------------------------------------------------------
# The volume formulas: every collective one rank takes part in during one optimizer step, with
# the bytes it sends or contributes (CommTraffic's convention, parallel/communicator.h):
# all_reduce the buffer, reduce_scatter the whole input, all_gather its own part, all_to_all what
# goes to the other ranks.

class Coll:
    def __init__(self, group, op, nbytes, calls, what, overlap=None):
        self.group, self.op, self.bytes, self.calls, self.what, self.overlap = group, op, nbytes, calls, what, overlap


def ep_rows_per_token(rho, E, tp, ep):
    """Rows of h values a token sends to other expert-parallel ranks in one dispatch ("dedup"): one
    per other rank holding at least one of its active experts, each of the E/(tp ep) experts of a
    rank active independently with probability rho."""
    return (ep - 1) * (1 - (1 - rho) ** (E / (tp * ep)))


def ep_pairs_per_token(rho, E, tp, ep):
    """Active (token, expert) pairs of a token's tensor-parallel slice that live on other ranks."""
    return rho * (E / tp) * (ep - 1) / ep


def step_collectives(m, t, lay, act_bytes=4, grad_bytes=4, dp_scheme="allreduce",
                     ep_dispatch="dedup", ratio=None, bucket_bytes=25 << 20, weight_bytes=2):
    """lay: dict tp, dp, ep, micro (sequences per micro-batch), sp (sequence parallelism, optional).
    Expert parallelism: expected bytes at activation ratio rho (per-token activations of the
    experts independent); the exact bytes depend on the routing."""
    tp, dp, ep, mb, sp = lay["tp"], lay["dp"], lay["ep"], lay["micro"], lay.get("sp", False)
    S, h, L, V = m["seq_len"], m["hidden"], m["layers"], m["vocab_size"]
    E, d = m["experts"], m["expert_width"]
    D = m["layers"] - m["dense_layers"] if m["arch"] == "deco" else 0
    micro = t["global_batch"] // (mb * dp)  # micro-steps per rank
    T = mb * S  # tokens per micro-batch
    rho = t["target_ratio"] if ratio is None else ratio
    if m.get("expert_compute", "sparse") == "dense":
        rho = 1.0  # the dense-masked path dispatches every pair of the slice
    out = []
    if tp > 1:
        # Per micro-batch, the embedding's output and the LM head's dh, and per layer attention and
        # FFN, forward (the row-parallel output) and backward (dx): an all-reduce of [T, h] each, or
        # with sequence parallelism a reduce-scatter (counted: the whole [T, h] input) and an
        # all-gather (counted: this rank's [T/tp, h]) each; the same wire traffic.
        n_act = micro * (2 + 4 * L)
        what = "activations [T,h]: embedding, LM head dh, 4 per layer"
        if sp:
            out.append(Coll("tp", "reduce_scatter", n_act * T * h * act_bytes, n_act, what + " (SP)"))
            out.append(Coll("tp", "all_gather", n_act * (T // tp) * h * act_bytes, n_act, what + " (SP)"))
        else:
            out.append(Coll("tp", "all_reduce", n_act * T * h * act_bytes, n_act, what))
        # The vocabulary-parallel cross-entropy: one all-gather of each rank's per-token log-sum-exp
        # and target logit [2, T] (fp64).
        out.append(Coll("tp", "all_gather", micro * 2 * T * 8, micro, "vocab-parallel cross-entropy [2,T] fp64"))
        if D:
            # NormSiLU's mean is x . w_bar: w_bar and the mean's rank-one gradient gx (h each) and
            # gamma's gradient (d) are all-reduced, and ds [T, E] for the replicated router: fp32
            # under bf16 compute too (summed from the masters, gradients, the router's dtype).
            out.append(Coll("tp", "all_reduce", micro * D * (2 * h + d + T * E) * 4, micro * D * 4,
                            "DECO w_bar, gx [h], d gamma [d], ds [T,E]"))
        if sp:
            # Backward gathers each region's input again from this rank's tokens (Megatron's: the
            # regions keep only the token slice): 2 all-gathers per layer.
            out.append(Coll("tp", "all_gather", micro * 2 * L * (T // tp) * h * act_bytes, micro * 2 * L,
                            "SP: the regions' inputs gathered again in backward"))
            # The RMSNorm weights' gradients (each rank's tokens only), summed once per step.
            out.append(Coll("tp", "all_reduce", (2 * L + 1) * h * grad_bytes, 1, "SP norm weight gradients"))
        out.append(Coll("tp", "all_reduce", 8, 1, "gradient norm of split parameters (fp64)"))
    if ep > 1 and D:
        # Per DECO layer: forward dispatch (x) and combine (expert outputs), backward dispatch (dy)
        # and combine (dx); each tensor rank moves the pairs of its own experts (E/tp).
        tokens = micro * T
        if ep_dispatch == "pairs":  # one h-vector per active (token, expert) pair on another rank
            per_token = ep_pairs_per_token(rho, E, tp, ep)
        else:  # one h-vector per (token, other rank holding at least one of its active experts)
            per_token = ep_rows_per_token(rho, E, tp, ep)
        out.append(Coll("ep", "all_to_all", 4 * D * tokens * per_token * h * act_bytes, 4 * D * micro,
                        f"dispatch + combine, forward and backward ({ep_dispatch})"))
        # model/expert_dispatch.cpp, per DECO layer and micro-batch: the counts (rows, then pairs per
        # expert: E/(tp ep) + 1 i64 per peer), each pair's row (i64) and score (fp32) forward, and its
        # score gradient (fp32) backward.
        pairs = ep_pairs_per_token(rho, E, tp, ep)
        header = D * micro * (ep - 1) * (E // (tp * ep) + 1) * 8 + D * tokens * pairs * (8 + 4 + 4)
        out.append(Coll("ep", "all_to_all", header, 4 * D * micro, "counts, pair rows (i64), scores, score grads"))
        # w_bar and gx (h each, fp32 in every dtype) summed over the expert ranks too; the gradient
        # norm of expert shards.
        out.append(Coll("ep", "all_reduce", micro * D * 2 * h * 4, micro * D * 2, "DECO w_bar, gx [h]"))
        out.append(Coll("ep", "all_reduce", 8, 1, "gradient norm of expert shards (fp64)"))
    if dp > 1:
        ne, ex = param_counts(m, tp, ep)
        groups = [("dp", ne + (ex if ep == 1 else 0), dp)]
        if ep > 1 and dp // ep > 1:
            groups.append(("edp", ex, dp // ep))
        for g, n, size in groups:
            if size <= 1 or n == 0:
                continue
            b = n * grad_bytes
            calls = max(1, math.ceil(b / bucket_bytes))
            if dp_scheme == "allreduce":
                out.append(Coll(g, "all_reduce", b, calls, "gradients (bucketed)", "backward"))
            else:  # distributed optimizer (parallel/grad_buffer.cpp): each bucket padded to a multiple
                # of the group size and reduce-scattered; the updated weights' own shard all-gathered
                # (fp32 today, bf16 once the GPU's bf16 path gathers its copy: weight_bytes); the
                # gradient norm's sums of squares of the shards (3 fp64) all-reduced. Padding per
                # bucket, modelled here per group: exact with one bucket, else up to calls x (size-1)
                # elements short.
                npad = -(-n // size) * size
                out.append(Coll(g, "reduce_scatter", npad * grad_bytes, calls, "gradients (bucketed)", "backward"))
                # Run right after the update, not overlapped with the next forward (Megatron's
                # overlap_param_gather is not implemented: docs/parallelism.md, "What is not done").
                out.append(Coll(g, "all_gather", npad // size * weight_bytes, calls,
                                "updated weights (own shard)"))
                out.append(Coll(g, "all_reduce", 3 * 8, 1, "gradient norm of shards (fp64)"))
        # The step's statistics (trainer.cpp): {lm, reg, entropy} sums (fp64) and {tokens, tokens
        # without expert, active pairs per DECO layer, active tokens per layer and expert} (i64).
        out.append(Coll("dp", "all_reduce", 3 * 8, 1, "loss sums (fp64)"))
        out.append(Coll("dp", "all_reduce", (2 + D + D * E) * 8, 1, "routing counts (i64)"))
    if D and tp * dp > 1:
        out.append(Coll("world", "all_reduce", 8 * tp * dp, 1,
                        "pairs each rank's experts computed (load metric: one-hot i64 vectors summed)"))
    return out


def by_group_op(colls):
    r = {}
    for c in colls:
        r.setdefault(c.group, {}).setdefault(c.op, 0)
        r[c.group][c.op] += c.bytes
    return r


# ---------------------------------------------------------------------------------------------
# `volumes`: formula vs measured

ROUTING_DEPENDENT = {("ep", "all_to_all")}  # bytes depend on the routing: compared at the step's act_ratio


def cmd_volumes(a):
    if a.run_dir:
        cfg_path = os.path.join(a.run_dir, "config.yaml")
    elif a.config:
        cfg_path = a.config
    else:
        sys.exit("volumes: give RUN_DIR or --config FILE")
    cfg = read_config(cfg_path, a.set or [])
    par = cfg["parallel"]
    tp = a.tp or par["tensor"]
    if a.np is None:
        sys.exit("volumes: give --np (the number of ranks the run was launched with)")
    dp = par["data"] or a.np // tp
    if tp * dp != a.np:
        sys.exit(f"volumes: tensor {tp} x data {dp} != --np {a.np}")
    ep = par["expert"]
    lay = {"tp": tp, "dp": dp, "ep": ep, "micro": cfg["train"]["micro_batch"], "sp": bool(par.get("sequence"))}
    scheme = "distopt" if par.get("distributed_optimizer") else "allreduce"
    # The CPU runs: fp32 activations, gradients and weights.
    def formula(ratio=None):
        return by_group_op(step_collectives(cfg["model"], cfg["train"], lay, 4, 4, scheme, "dedup", ratio,
                                            int(par.get("grad_bucket_mb", 25) * (1 << 20)), 4))
    want = formula()
    rows = [(g, op, b) for g, ops in sorted(want.items()) for op, b in sorted(ops.items())]
    name = layout_name(lay).replace("xDP1", "") + (" SP" if lay["sp"] else "") + (" distopt" if scheme == "distopt" else "")
    if not a.run_dir:
        print("| layout | group | collective | formula bytes/step |\n|---|---|---|---|")
        for g, op, b in rows:
            note = f" (at act_ratio {cfg['train']['target_ratio']})" if (g, op) in ROUTING_DEPENDENT else ""
            print(f"| {name} | {g} | {op} | {b:.0f}{note} |")
        return 0
    measured = []
    with open(os.path.join(a.run_dir, "metrics.jsonl")) as f:
        for line in f:
            j = json.loads(line)
            if "comm_bytes_by_op" in j:
                measured.append(j)
    if not measured:
        sys.exit(f"{a.run_dir}/metrics.jsonl has no comm_bytes_by_op records")
    ok = True
    print("| layout | group | collective | formula bytes/step | measured bytes/step (rank 0) | equal |")
    print("|---|---|---|---|---|---|")
    keys = set((g, op) for g, op, _ in rows)
    for j in measured:
        keys |= set((g, op) for g, ops in j["comm_bytes_by_op"].items() for op in ops)
    routed = []
    for g, op in sorted(keys):
        if (g, op) in ROUTING_DEPENDENT:
            routed.append((g, op))
            continue
        f_b = want.get(g, {}).get(op, 0)
        vals = sorted(set(j["comm_bytes_by_op"].get(g, {}).get(op, 0) for j in measured))
        same = vals == [f_b]
        ok &= same
        shown = str(vals[0]) if len(vals) == 1 else "varies: " + ", ".join(map(str, vals))
        print(f"| {name} | {g} | {op} | {f_b} | {shown} (all {len(measured)} steps) | {'yes' if same else 'NO'} |")
    if routed:
        # Expert parallelism: the formula is an expectation over the routing (each expert of a
        # rank active independently with probability rho); evaluated per step at the step's
        # measured act_ratio (global batch, all DECO layers), and at its per-layer ratios.
        print()
        print(f"Routing-dependent bytes, per step (formula: expectation with independent expert activations; "
              f"measured / per-layer formula within {a.ep_tolerance:.0%}):")
        print()
        print("| layout | group | collective | iter | act_ratio | formula at act_ratio | formula at per-layer "
              "ratios | measured (rank 0) | measured / formula | measured / per-layer formula |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        m = cfg["model"]
        D = m["layers"] - m["dense_layers"]
        for g, op in routed:
            for j in measured:
                rho = j.get("act_ratio")
                got = j["comm_bytes_by_op"].get(g, {}).get(op, 0)
                if rho is None:
                    print(f"| {name} | {g} | {op} | {j.get('iter')} | - | - | - | {got} | - | - |")
                    ok = False
                    continue
                f_b = formula(rho).get(g, {}).get(op, 0)
                per_layer = j.get("act_ratio_per_layer") or []
                f_l = (sum(formula(r).get(g, {}).get(op, 0) for r in per_layer) / D
                       if len(per_layer) == D and D else float("nan"))
                ratio = got / f_b if f_b else float("inf")
                ratio_l = got / f_l if f_l == f_l and f_l else ratio
                ok &= abs(ratio_l - 1) <= a.ep_tolerance
                print(f"| {name} | {g} | {op} | {j.get('iter')} | {rho:.4f} | {f_b:,.0f} | {f_l:,.0f} | {got:,} | "
                      f"{ratio:.4f} | {ratio_l:.4f} |")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------
# `model`: time and memory of a step on H100s

GPUS_PER_NODE = 8


def placement(lay, group):
    """(members per node g, nodes m) of a group, for ranks laid out tp innermost, then dp, with
    ep consecutive data-parallel ranks (process_groups.h) and 8 GPUs per node."""
    tp, dp, ep = lay["tp"], lay["dp"], lay["ep"]
    per_node_dp = max(1, GPUS_PER_NODE // tp)  # data-parallel ranks of one tensor rank per node
    if group == "tp":
        n, g = tp, min(tp, GPUS_PER_NODE)
    elif group == "dp":
        n, g = dp, min(dp, per_node_dp)
    elif group == "ep":
        n, g = ep, min(ep, per_node_dp)
    elif group == "edp":
        n = dp // ep
        g = max(1, min(n, per_node_dp // ep))
    elif group == "world":
        n = tp * dp
        g = min(n, GPUS_PER_NODE)
    else:
        raise ValueError(group)
    return g, n // g


def coll_time(c, lay, bw):
    """Seconds for one rank's share of collective c (all its calls), with NCCL-style hierarchical
    algorithms: the part inside a node at NVLink bus bandwidth, the part between nodes at the
    per-GPU InfiniBand bandwidth (each GPU its own NIC), plus a latency per call."""
    g, m = placement(lay, c.group)
    n = g * m
    if n <= 1:
        return 0.0
    nv, ib, a2a = bw["nvlink"] * 1e9, bw["ib"] * 1e9, bw["nvlink_a2a"] * 1e9
    lat = c.calls * (bw["lat_intra"] if m == 1 else bw["lat_inter"]) * 1e-6
    if c.op == "all_reduce":
        S = c.bytes
        return 2 * (g - 1) / g * S / nv + 2 * (m - 1) / m * (S / g) / ib + lat
    if c.op in ("reduce_scatter", "all_gather"):
        S = c.bytes if c.op == "reduce_scatter" else c.bytes * n  # the whole buffer
        return (g - 1) / g * S / nv + (m - 1) / m * (S / g) / ib + lat
    if c.op == "all_to_all":  # c.bytes already excludes the own block; spread evenly over the others
        intra = c.bytes * (g - 1) / (n - 1)
        return intra / a2a + (c.bytes - intra) / ib + lat
    raise ValueError(c.op)


def activation_bytes_per_token(m, lay, rho, act_bytes, ep_dispatch):
    """Bytes kept for the backward pass per token of a micro-batch on one GPU (all layers, no
    recomputation, no sequence parallelism, flash attention, sparse expert path storing u, z, y for
    active pairs only). Under tensor parallelism the [T, h] tensors are replicated, the rest split."""
    tp, ep = lay["tp"], lay["ep"]
    h, E, d, s, F = m["hidden"], m["experts"], m["expert_width"], m["shared_expert_width"], m["ffn_hidden"]
    kvd = (m["kv_heads"] or m["heads"]) * (h // m["heads"])
    b = act_bytes
    attn = b * (2 * h + (2 * h + 2 * kvd) / tp) + 4 * m["heads"] / tp  # x, norm out; q, k, v, o; lse
    deco = (b * (2 * h + 3 * rho * E * d / tp + 3 * s / tp)  # x1, norm out; u, z, y of active pairs; shared
            + 8 * E + 4 * (1 + E) + 8 * rho * E / tp)         # r and s (fp32), NormSiLU stats, pair list
    if ep > 1:  # tokens received for the local experts, kept for W_up's gradient
        if ep_dispatch == "pairs":
            deco += b * h * rho * (E / tp) * (ep - 1) / ep
        else:
            deco += b * h * (ep - 1) * (1 - (1 - rho) ** (E / (tp * ep)))
    dense = b * (2 * h + 3 * F / tp)
    D = m["layers"] - m["dense_layers"] if m["arch"] == "deco" else 0
    return m["layers"] * attn + D * deco + (m["layers"] - D) * dense + b * 2 * h


def analyse(m, t, lay, o):
    """One layout: memory, micro-batch, volumes, times."""
    tp, dp, ep = lay["tp"], lay["dp"], lay["ep"]
    world = tp * dp
    rho = t["target_ratio"]
    S, B = m["seq_len"], t["global_batch"]
    ne, ex = param_counts(m, tp, ep)
    edp = dp // ep
    if o.dp_scheme == "allreduce":
        static = (ne + ex) * 18  # bf16 weights 2 + fp32 grads 4 + fp32 master 4 + Adam m, v 8
    else:
        static = (ne + ex) * 6 + ne * 12 / dp + ex * 12 / edp
    per_tok = activation_bytes_per_token(m, lay, rho, o.act_bytes, o.ep_dispatch)
    logits_per_tok = 4 * m["vocab_size"] / tp  # fp32, once (vocabulary-parallel)
    usable = o.gpu_mem * 1e9 - o.reserve * 1e9
    seqs = B // dp  # sequences per data-parallel rank and step
    mb = None
    for cand in range(seqs, 0, -1):
        if seqs % cand == 0 and static + cand * S * (per_tok + logits_per_tok) <= usable:
            mb = cand
            break
    fits = mb is not None
    if mb is None:
        mb = 1
    mem = static + mb * S * (per_tok + logits_per_tok)
    lay = dict(lay, micro=mb)
    colls = step_collectives(m, t, lay, o.act_bytes, o.grad_bytes, o.dp_scheme, o.ep_dispatch)
    f_tok = flops_per_token(m, 1.0 if o.expert_flops == "dense" else rho)
    rate = o.tokens_per_s if o.tokens_per_s else o.tflops * 1e12 / f_tok  # tokens/s of one GPU
    t_compute = B * S / (world * rate)
    n_micro = seqs // mb
    t_bwd_last = t_compute / n_micro * 2 / 3
    t_fwd_first = t_compute / n_micro / 3
    bw = {"nvlink": o.nvlink_busbw, "ib": o.ib_busbw, "nvlink_a2a": o.nvlink_a2a_busbw,
          "lat_intra": o.lat_intra_us, "lat_inter": o.lat_inter_us}
    vol = {"dp": 0.0, "tp": 0.0, "ep": 0.0}
    tcomm = {"dp": 0.0, "tp": 0.0, "ep": 0.0}
    exposed = {"dp": 0.0, "tp": 0.0, "ep": 0.0}
    rows = []
    for c in colls:
        kind = "dp" if c.group in ("dp", "edp", "world") else c.group  # world: the step's small statistics
        tc = coll_time(c, lay, bw)
        if c.overlap:
            # Overlapped with the last micro-batch's backward (reduction) or the next step's first
            # forward (weight all-gather), except the last (first) bucket.
            window = t_bwd_last if c.overlap == "backward" else t_fwd_first
            bucket = tc / c.calls
            ex_t = bucket + max(0.0, tc - bucket - window)
        else:
            ex_t = tc
        vol[kind] += c.bytes
        tcomm[kind] += tc
        exposed[kind] += ex_t
        g, nn = placement(lay, c.group)
        rows.append((c, tc, ex_t, g, nn))
    # The optimizer step, memory-bound: AdamW reads fp32 weight, gradient, m, v and writes weight, m,
    # v (28 bytes per element it updates) and every GPU writes its bf16 copy of the weights (2).
    if o.dp_scheme == "allreduce":
        t_opt = (ne + ex) * 30 / (o.hbm_tbs * 1e12)
    else:
        t_opt = ((ne / dp + ex / edp) * 28 + (ne + ex) * 2) / (o.hbm_tbs * 1e12)
    step = t_compute + t_opt + sum(exposed.values())
    return {"t_opt": t_opt, "lay": lay, "fits": fits, "mb": mb, "n_micro": n_micro, "mem": mem, "static": static,
            "act": mb * S * per_tok, "logits": mb * S * logits_per_tok, "params": ne + ex,
            "t_compute": t_compute, "vol": vol, "tcomm": tcomm, "exposed": exposed, "step": step,
            "eff": t_compute / step, "rows": rows, "tok_s_gpu": B * S / step / world}


def layout_name(lay):
    parts = []
    if lay["tp"] > 1:
        parts.append(f"TP{lay['tp']}")
    parts.append(f"DP{lay['dp']}")
    if lay["ep"] > 1:
        parts.append(f"EP{lay['ep']}")
    return "x".join(parts)


LAYOUTS = [  # (GPUs, tp, dp, ep): EP is carved out of DP
    (8, 1, 8, 1), (8, 2, 4, 1), (8, 2, 4, 2), (8, 1, 8, 2), (8, 1, 8, 8),
    (64, 1, 64, 1), (64, 2, 32, 1), (64, 1, 64, 2), (64, 1, 64, 8), (64, 2, 32, 4), (64, 1, 64, 16),
]


def gb(x):
    return f"{x / 1e9:.2f}"


def cmd_model(a):
    cfg = read_config(a.config, a.set or [])
    m, t = cfg["model"], dict(cfg["train"])
    t["global_batch"] = a.global_batch
    if a.ratio is not None:
        t["target_ratio"] = a.ratio
    rho = t["target_ratio"]
    f_dense, f_sparse = flops_per_token(m, 1.0), flops_per_token(m, rho)
    ne, ex = param_counts(m)
    tok = a.global_batch * m["seq_len"]
    print(f"DECO model from {os.path.relpath(a.config)}: {ne + ex:,} parameters ({ex:,} in routed experts; "
          f"{ne + ex - 2 * m['vocab_size'] * m['hidden']:,} non-embedding)")
    rate = (f"{a.tokens_per_s:,.0f} tokens/s per GPU (given)" if a.tokens_per_s else
            f"FLOPs counted {a.expert_flops} at {a.tflops:g} TFLOP/s per GPU -> "
            f"{a.tflops * 1e12 / (f_dense if a.expert_flops == 'dense' else f_sparse):,.0f} tokens/s per GPU")
    print(f"global batch {a.global_batch} x {m['seq_len']} = {tok:,} tokens per step; model FLOPs per token "
          f"{f_dense / 1e9:.3f} G (experts dense) / {f_sparse / 1e9:.3f} G (experts at rho {rho}); compute: {rate}")
    print(f"links: NVLink {a.nvlink_busbw:g} GB/s bus bandwidth (all-reduce etc.), {a.nvlink_a2a_busbw:g} GB/s "
          f"all-to-all; InfiniBand {a.ib_busbw:g} GB/s per GPU; latency {a.lat_intra_us:g} / {a.lat_inter_us:g} us "
          f"per call; EP dispatch {a.ep_dispatch}, DP {a.dp_scheme}, gradients "
          f"{a.grad_bytes} B, activations {a.act_bytes} B; memory {a.gpu_mem:g} GB - {a.reserve:g} GB reserved, "
          f"{a.hbm_tbs:g} TB/s")
    print()
    results = []
    for gpus, tp, dp, ep in LAYOUTS:
        if a.gpus and gpus not in a.gpus:
            continue
        lay = {"tp": tp, "dp": dp, "ep": ep}
        notes = []
        if m["heads"] % tp:
            notes.append(f"{m['heads']} heads do not split over TP{tp}")
        if m["experts"] % (tp * ep):
            notes.append(f"{m['experts']} experts split unevenly over {tp * ep} ranks: up to "
                         f"{math.ceil(m['experts'] / (tp * ep))} per rank (the busiest rank sets the pace)")
        results.append((gpus, lay, analyse(m, t, lay, a), notes))
    print("| GPUs | layout | micro-batch x steps | memory/GPU GB | compute s | optimizer s | DP GB/GPU | TP GB/GPU "
          "| EP GB/GPU | DP exposed s | TP s | EP s | step s | tokens/s/GPU | efficiency |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for gpus, lay, r, notes in results:
        mem = gb(r["mem"]) + ("" if r["fits"] else " (does not fit)")
        print(f"| {gpus} | {layout_name(lay)} | {r['mb']} x {r['n_micro']} | {mem} | {r['t_compute']:.3f} | "
              f"{r['t_opt']:.3f} | "
              f"{gb(r['vol']['dp'])} | {gb(r['vol']['tp'])} | {gb(r['vol']['ep'])} | {r['exposed']['dp']:.3f} | "
              f"{r['exposed']['tp']:.3f} | {r['exposed']['ep']:.3f} | {r['step']:.3f} | {r['tok_s_gpu']:,.0f} | "
              f"{100 * r['eff']:.1f}% |")
    print()
    print("| GPUs | layout | parameters/GPU | weights+grads+optimizer GB | activations GB (micro-batch) | logits GB "
          "| total GB | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for gpus, lay, r, notes in results:
        print(f"| {gpus} | {layout_name(lay)} | {r['params'] / 1e6:,.0f} M | {gb(r['static'])} | {gb(r['act'])} "
              f"({r['mb']}) | {gb(r['logits'])} | {gb(r['mem'])} | {'; '.join(notes)} |")
    if a.sensitivity:
        print()
        scenarios = [("as above", {}), ("EP one row per pair", {"ep_dispatch": "pairs"}),
                     ("distributed optimizer", {"dp_scheme": "distopt"}),
                     ("bf16 gradients", {"grad_bytes": 2}), (f"{1.5 * a.tflops:g} TFLOP/s", {"tflops": 1.5 * a.tflops}),
                     ("sparse expert FLOPs", {"expert_flops": "sparse"}),
                     ("IB 25 GB/s, NVLink 250", {"ib_busbw": 25.0, "nvlink_busbw": 250.0, "nvlink_a2a_busbw": 200.0})]
        print("Efficiency (step time) when one assumption changes:")
        print()
        print("| GPUs | layout | " + " | ".join(label for label, _ in scenarios) + " |")
        print("|---|---|" + "---|" * len(scenarios))
        for gpus, lay, _, _ in results:
            cells = []
            for _, change in scenarios:
                o = argparse.Namespace(**dict(vars(a), **change))
                r = analyse(m, t, lay, o)
                cells.append(f"{100 * r['eff']:.0f}% ({r['step']:.2f} s){'' if r['fits'] else ', no fit'}")
            print(f"| {gpus} | {layout_name(lay)} | " + " | ".join(cells) + " |")
    if a.detail:
        print()
        print("| GPUs | layout | group | placement | collective | what | calls | GB/GPU | time s | exposed s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for gpus, lay, r, notes in results:
            for c, tc, ex_t, g, nn in r["rows"]:
                if c.bytes < 1e6:
                    continue
                where = f"{g}/node x {nn} nodes" if nn > 1 else f"{g} in a node"
                print(f"| {gpus} | {layout_name(lay)} | {c.group} | {where} | {c.op} | {c.what} | {c.calls} | "
                      f"{gb(c.bytes)} | {tc:.3f} | {ex_t:.3f} |")
    return 0


def main(argv):
    here = os.path.dirname(os.path.abspath(__file__))
    if argv and argv[0] == "volumes":
        p = argparse.ArgumentParser(prog="perf_model.py volumes", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("run_dir", nargs="?", help="run directory (config.yaml, metrics.jsonl)")
        p.add_argument("--config", help="a block-style YAML config instead of a run directory (formula only)")
        p.add_argument("--set", action="append", help="override a key: section.key=value")
        p.add_argument("--np", type=int, help="ranks launched")
        p.add_argument("--tp", type=int, help="tensor-parallel size (default: parallel.tensor of the config)")
        p.add_argument("--ep-tolerance", type=float, default=0.25,
                       help="largest relative difference accepted between the measured expert-parallel all-to-all "
                            "and the formula at the step's per-layer activation ratios (default 0.25: the formula "
                            "assumes independent expert activations; docs/performance-model.md, Validation)")
        return cmd_volumes(p.parse_args(argv[1:]))
    if argv and argv[0] == "model":
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="perf_model.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(here, "..", "configs", "deco-1.2b.yaml"))
    p.add_argument("--set", action="append", help="override a config key: section.key=value")
    p.add_argument("--global-batch", type=int, default=512, help="sequences per optimizer step")
    p.add_argument("--tflops", type=float, default=374.0,
                   help="model TFLOP/s one GPU sustains (default: the PyTorch peer's DECO 0.5B on an H100, "
                        "performance-targets.md; replace with `decotron bench train`'s figure)")
    p.add_argument("--tokens-per-s", type=float,
                   help="training tokens/s one GPU sustains at these shapes (`decotron bench train --config "
                        "configs/deco-1.2b.yaml`, deco-sparse row); replaces --tflops")
    p.add_argument("--expert-flops", choices=["dense", "sparse"], default="dense",
                   help="count expert FLOPs for every expert (the peer's convention, in which --tflops was "
                        "measured) or at the activation ratio (a sparse path sustaining --tflops on fewer FLOPs)")
    p.add_argument("--ratio", type=float, help="activation ratio rho (default: train.target_ratio)")
    p.add_argument("--nvlink-busbw", type=float, default=360.0, help="GB/s, NCCL bus bandwidth inside a node")
    p.add_argument("--nvlink-a2a-busbw", type=float, default=300.0, help="GB/s, all-to-all inside a node")
    p.add_argument("--ib-busbw", type=float, default=40.0, help="GB/s per GPU between nodes (one 400 Gb/s NIC)")
    p.add_argument("--lat-intra-us", type=float, default=10.0, help="latency per collective call inside a node")
    p.add_argument("--lat-inter-us", type=float, default=25.0, help="latency per collective call across nodes")
    p.add_argument("--ep-dispatch", choices=["pairs", "dedup"], default="dedup",
                   help="dedup (this checkout): one row per token and destination rank; pairs: one per active pair")
    p.add_argument("--dp-scheme", choices=["allreduce", "distopt"], default="allreduce")
    p.add_argument("--grad-bytes", type=int, default=4, help="bytes per gradient element reduced (fp32: 4)")
    p.add_argument("--act-bytes", type=int, default=2, help="bytes per activation element (bf16: 2)")
    p.add_argument("--hbm-tbs", type=float, default=3.0,
                   help="TB/s of memory traffic (the optimizer step; performance-targets.md: 3.00 measured)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GB per GPU")
    p.add_argument("--reserve", type=float, default=8.0, help="GB kept for CUDA, NCCL, workspaces, fragmentation")
    p.add_argument("--gpus", type=int, action="append", help="only layouts of this many GPUs (8, 64)")
    p.add_argument("--detail", action="store_true", help="also every collective of every layout")
    p.add_argument("--sensitivity", action="store_true", help="also the efficiency when one assumption changes")
    return cmd_model(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
