"""Attention kernels on one GPU: torch SDPA, FlexAttention, eager, and mmattn's Triton kernels with edits.

Prefill: B=1, 32 heads, head dim 128, bf16, causal, n in {640, 2880, 8192}; TFLOP/s count the causal forward
only (4 n^2 d H / 2), for every variant, so extra passes show as lower TFLOP/s. Decode: one query against
KV in {640, 2880, 8192, 32768}; latency per call (a) launched back to back from Python and timed with CUDA
events (includes host launch overhead when that dominates), (b) replayed from a CUDA graph (device time).
KV buffers rotate so the cache is not served from L2.

    python benchmarks/attention.py --out DIR [--sweep] [--quick]

Writes DIR/attention.json and DIR/attention.md (GPU name, date, versions).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mmattn.edits import AttentionEdit, MassTransfer  # noqa: E402
from mmattn.kernels.exact import exact_attention  # noqa: E402
from mmattn.kernels.triton_attention import triton_attention  # noqa: E402

DEV = "cuda"
H, D = 32, 128
DT = torch.bfloat16


def bench_ms(fn, reps=20, warm=5):
    """Median of per-call CUDA-event timings (ms)."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def bench_stream_us(fns, calls=200, warm=10):
    """Mean time per call of back-to-back launches cycling over ``fns`` (us), CUDA events around the batch."""
    for i in range(warm):
        fns[i % len(fns)]()
    torch.cuda.synchronize()
    out = []
    for _ in range(3):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for i in range(calls):
            fns[i % len(fns)]()
        e.record()
        torch.cuda.synchronize()
        out.append(s.elapsed_time(e) * 1e3 / calls)
    return min(out)


def bench_graph_us(fns, per_graph=40, replays=10):
    """Mean time per call replaying a CUDA graph of ``per_graph`` calls cycling over ``fns`` (us)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(per_graph):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(3):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(replays):
            graph.replay()
        e.record()
        torch.cuda.synchronize()
        out.append(s.elapsed_time(e) * 1e3 / (replays * per_graph))
    return min(out)


def layout(n, g):
    """LLaVA-like key groups: 0 other, 1 image, 2 image sink, 3 text sink (BOS); image = [35, n - 40)."""
    img0, img1 = 35, max(36, n - 40)
    groups = torch.zeros(1, n, dtype=torch.int32, device=DEV)
    groups[:, img0:img1] = 1
    sinks = torch.randint(img0, img1, (1, 6), device=DEV, generator=g)
    groups.scatter_(1, sinks.to(torch.int64), 2)
    groups[:, 0] = 3
    return groups, img0, img1


def edits_for(n, q_len, g):
    groups, img0, img1 = layout(n, g)
    bias = AttentionEdit(key_groups=groups, num_groups=4, group_bias=torch.randn(1, H, 4, device=DEV, generator=g))
    key_bias = AttentionEdit(key_bias=torch.randn(1, 1, n, device=DEV, generator=g) * 0.5)

    def transfer(rows_from):
        return AttentionEdit(
            key_groups=groups,
            num_groups=4,
            row_start=torch.tensor([rows_from], device=DEV),
            mass_transfer=MassTransfer(
                source_groups=(2, 3), target_groups=(1,), retain=0.6,
                heads=torch.rand(1, H, device=DEV, generator=g) > 0.2,
                condition_groups=(1, 2), min_condition_mass=0.2, ratio_groups=(2,), max_ratio=0.5,
                ratio_eps=(img1 - img0) * 1e-6,
            ),
        )

    var_rows = transfer(img1)  # VAR: rows after the image
    var_all = transfer(0)  # stress: every row
    stats = AttentionEdit(
        key_groups=groups, num_groups=4, return_lse=True, return_group_mass=True,
        key_mass_rows=torch.arange(q_len, device=DEV)[None] >= q_len - 40,  # IGA-like: last 40 rows
    )
    stats_all = AttentionEdit(key_mass_rows=torch.ones(1, q_len, dtype=torch.bool, device=DEV), return_lse=True)
    return groups, {
        "mmattn": None,
        "mmattn+group_bias": bias,
        "mmattn+key_bias": key_bias,
        "mmattn+mass_transfer(VAR rows)": var_rows,
        "mmattn+mass_transfer(all rows)": var_all,
        "mmattn+stats(lse,group_mass,key_mass last 40)": stats,
        "mmattn+key_mass(all rows)": stats_all,
    }


def prefill(sizes, with_flex=True, with_eager=True):
    res = {}
    flex = None
    if with_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            flex = torch.compile(flex_attention)
        except Exception as error:  # pragma: no cover
            print("flex unavailable:", error)
    for n in sizes:
        g = torch.Generator(device=DEV).manual_seed(n)
        q, k, v = (torch.randn(1, H, n, D, device=DEV, dtype=DT, generator=g) for _ in range(3))
        flops = 4 * n * n * D * H / 2
        row = {}

        def record(name, ms, fn=None):
            row[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
            line = f"  n={n:5d} {name:48s} {ms:8.4f} ms {flops / ms / 1e9:7.1f} TFLOP/s"
            if fn is not None:
                # Back-to-back launches hide the host's launch cost behind the previous call's GPU work, as inside
                # a model; a lone timed call (the "ms" column) includes it.
                queued = bench_stream_us([fn], calls=50) / 1e3
                row[name].update(ms_queued=round(queued, 4), tflops_queued=round(flops / queued / 1e9, 1))
                line += f" | queued {queued:8.4f} ms {flops / queued / 1e9:7.1f} TFLOP/s"
            print(line, flush=True)

        sdpa_fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        record("sdpa", bench_ms(sdpa_fn), sdpa_fn)
        groups, variants = edits_for(n, n, g)
        if flex is not None:
            gb = variants["mmattn+group_bias"].group_bias[0]
            grp = groups[0]
            bm = create_block_mask(lambda b, hh, qi, kj: qi >= kj, None, None, n, n, device=DEV)
            try:
                record("flex(causal block mask + group bias score_mod)",
                       bench_ms(lambda: flex(q, k, v, block_mask=bm, score_mod=lambda s, b, hh, qi, kj: s + gb[hh, grp[kj]])))
            except Exception as error:  # pragma: no cover
                print("flex failed:", repr(error)[:300])
        if with_eager:
            def eager():
                s = (q @ k.transpose(-1, -2)) * D**-0.5
                s = s + torch.full((n, n), float("-inf"), device=DEV, dtype=s.dtype).triu(1)
                return s.float().softmax(-1).to(q.dtype) @ v

            record("eager", bench_ms(eager, reps=5, warm=1))
        for name, edit in variants.items():
            try:
                fn = lambda edit=edit: triton_attention(q, k, v, scale=D**-0.5, causal=True, edit=edit)  # noqa: E731
                record(name, bench_ms(fn), fn)
            except Exception as error:  # keep going: one broken variant must not cost the whole run
                row[name] = {"error": repr(error)[:300]}
                print(f"  n={n} {name} FAILED: {repr(error)[:300]}", flush=True)
        sdpa = row["sdpa"]["tflops"]
        for name in row:
            if "tflops" in row[name]:
                row[name]["vs_sdpa"] = round(row[name]["tflops"] / sdpa, 3)
            if "tflops_queued" in row[name]:
                row[name]["vs_sdpa_queued"] = round(row[name]["tflops_queued"] / row["sdpa"]["tflops_queued"], 3)
        res[n] = row
        del q, k, v
        torch.cuda.empty_cache()
    return res


def decode(kv_sizes):
    res = {}
    for n in kv_sizes:
        g = torch.Generator(device=DEV).manual_seed(n)
        per_buf = 2 * H * n * D * 2
        n_buf = max(2, min(8, math.ceil(4 * 60e6 / per_buf)))  # several times the 60 MB L2
        q = torch.randn(1, H, 1, D, device=DEV, dtype=DT, generator=g)
        kvs = [(torch.randn(1, H, n, D, device=DEV, dtype=DT, generator=g), torch.randn(1, H, n, D, device=DEV, dtype=DT, generator=g)) for _ in range(n_buf)]
        groups, variants = edits_for(n, 1, g)
        bias = variants["mmattn+group_bias"]
        var = AttentionEdit(**{**variants["mmattn+mass_transfer(VAR rows)"].__dict__, "row_start": None})
        var.group_bias = bias.group_bias
        var.head_scale = 0.5 + torch.rand(1, H, device=DEV, generator=g)
        cases = {
            "sdpa": lambda k, v: F.scaled_dot_product_attention(q, k, v),
            "eager": lambda k, v: ((q @ k.transpose(-1, -2)) * D**-0.5).float().softmax(-1).to(q.dtype) @ v,
            "mmattn": lambda k, v: triton_attention(q, k, v, scale=D**-0.5, causal=True),
            "mmattn+group_bias": lambda k, v: triton_attention(q, k, v, scale=D**-0.5, causal=True, edit=bias),
            "mmattn+VAR(transfer+bias+head_scale)": lambda k, v: triton_attention(q, k, v, scale=D**-0.5, causal=True, edit=var),
        }
        row = {}
        for name, fn in cases.items():
            fns = [(lambda f=fn, kk=kk, vv=vv: f(kk, vv)) for kk, vv in kvs]
            try:
                launch = bench_stream_us(fns)
            except Exception as error:
                row[name] = {"error": repr(error)[:300]}
                print(f"  kv={n} {name} FAILED: {repr(error)[:300]}", flush=True)
                continue
            try:
                graph = bench_graph_us(fns)
            except Exception as error:  # pragma: no cover
                print(f"  graph capture failed for {name}: {repr(error)[:200]}")
                graph = float("nan")
            row[name] = {"us_launch": round(launch, 2), "us_graph": round(graph, 2),
                         "GBps_graph": round(per_buf / graph / 1e3, 1) if graph == graph else None}
            print(f"  kv={n:6d} {name:40s} launch {launch:8.2f} us  graph {graph:8.2f} us  "
                  f"{per_buf / graph / 1e3:7.1f} GB/s", flush=True)
        for name in [x for x in row if "us_launch" in row[x]]:
            row[name]["vs_sdpa_launch"] = round(row[name]["us_launch"] / row["sdpa"]["us_launch"], 3)
            row[name]["vs_sdpa_graph"] = round(row[name]["us_graph"] / row["sdpa"]["us_graph"], 3)
        res[n] = row
        del kvs
        torch.cuda.empty_cache()
    return res


def parity(n=640):
    """Check every benchmarked variant against the exact path once (max abs error of the output)."""
    g = torch.Generator(device=DEV).manual_seed(1)
    q, k, v = (torch.randn(1, H, n, D, device=DEV, dtype=DT, generator=g) for _ in range(3))
    _, variants = edits_for(n, n, g)
    out = {}
    for name, edit in variants.items():
        a, sa = triton_attention(q, k, v, scale=D**-0.5, causal=True, edit=edit)
        b, sb = exact_attention(q, k, v, scale=D**-0.5, causal=True, edit=edit)
        err = (a.float() - b.float()).abs().max().item()
        if edit is not None and edit.key_mass_rows is not None:
            err_km = ((sa.key_mass - sb.key_mass).abs().max() / sb.key_mass.abs().max()).item()
            out[name] = {"out_max_abs": err, "key_mass_rel": err_km}
        else:
            out[name] = {"out_max_abs": err}
        print(f"  parity {name:48s} {out[name]}", flush=True)
    return out


SWEEP = ["128,64,8,3", "128,128,8,3", "128,64,4,3", "128,128,8,2", "64,64,4,3", "128,64,8,4"]


def sweep(sizes):
    res = {}
    for n in sizes:
        g = torch.Generator(device=DEV).manual_seed(n)
        q, k, v = (torch.randn(1, H, n, D, device=DEV, dtype=DT, generator=g) for _ in range(3))
        flops = 4 * n * n * D * H / 2
        for cfg in SWEEP:
            os.environ["MMATTN_TRITON_PREFILL_CONFIG"] = cfg
            try:
                ms = bench_ms(lambda: triton_attention(q, k, v, scale=D**-0.5, causal=True))
                res[f"{n}:{cfg}"] = round(flops / ms / 1e9, 1)
            except Exception as error:
                res[f"{n}:{cfg}"] = repr(error)[:120]
            print(f"  sweep n={n} cfg={cfg}: {res[f'{n}:{cfg}']}", flush=True)
        os.environ.pop("MMATTN_TRITON_PREFILL_CONFIG", None)
    return res


def markdown(res):
    lines = [
        f"GPU: {res['gpu']}; date {res['date']}; torch {res['torch']}; triton {res['triton']}; "
        f"bf16, B=1, {H} heads, head dim {D}, causal. Median of 20 CUDA-event timings. "
        f"Prefill tiles (BLOCK_M,BLOCK_N,warps,stages): {res.get('prefill_config', 'library default')}.",
        "",
        "Prefill (TFLOP/s of the causal forward, 4·n²·d·H/2; ratio to SDPA in parentheses)",
        "",
    ]
    sizes = list(res["prefill"])
    names = list(res["prefill"][sizes[0]])
    lines.append("| variant | " + " | ".join(f"n={n}" for n in sizes) + " |")
    lines.append("|---|" + "---|" * len(sizes))
    for name in names:
        cells = []
        for n in sizes:
            r = res["prefill"][n].get(name)
            cells.append("—" if r is None or "tflops" not in r else f"{r['tflops']} ({r['vs_sdpa']:.2f}×) {r['ms']:.3f} ms")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if res.get("decode"):
        lines += ["", "Decode (one query, KV cache of n keys; µs per call: launched back to back / CUDA-graph replay; "
                  "ratio to SDPA in parentheses)", ""]
        kvs = list(res["decode"])
        names = list(res["decode"][kvs[0]])
        lines.append("| variant | " + " | ".join(f"KV={n}" for n in kvs) + " |")
        lines.append("|---|" + "---|" * len(kvs))
        for name in names:
            cells = []
            for n in kvs:
                r = res["decode"][n].get(name, {})
                if "us_launch" not in r:
                    cells.append("—")
                    continue
                cells.append(f"{r['us_launch']} ({r['vs_sdpa_launch']:.2f}×) / {r['us_graph']} ({r['vs_sdpa_graph']:.2f}×)")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep", action="store_true", help="also time a few prefill tile configurations")
    ap.add_argument("--quick", action="store_true", help="n=2880 prefill and KV=2880 decode only")
    ap.add_argument("--no-flex", action="store_true")
    args = ap.parse_args()
    import triton

    res = {
        "gpu": torch.cuda.get_device_name(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": " ".join(sys.argv),
    }
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)

    def save():
        with open(os.path.join(args.out, "attention.json"), "w") as f:
            json.dump(res, f, indent=1)

    res["parity"] = parity()
    save()
    if args.sweep:
        res["sweep_tflops"] = sweep([2880, 8192])
        scores = {}
        for key, val in res["sweep_tflops"].items():
            if isinstance(val, float):
                scores.setdefault(key.split(":", 1)[1], []).append(val)
        best = max((c for c in scores if len(scores[c]) == 2), key=lambda c: sum(scores[c]), default=None)
        if best is not None:
            os.environ["MMATTN_TRITON_PREFILL_CONFIG"] = best
        save()
    res["prefill_config"] = os.environ.get("MMATTN_TRITON_PREFILL_CONFIG", "library default")
    print("prefill config:", res["prefill_config"], flush=True)
    sizes = [2880] if args.quick else [640, 2880, 8192]
    res["prefill"] = prefill(sizes, with_flex=not args.no_flex)
    save()
    res["decode"] = decode([2880] if args.quick else [640, 2880, 8192, 32768])
    res["seconds"] = round(time.time() - t0, 1)
    save()
    md = markdown(res)
    with open(os.path.join(args.out, "attention.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
