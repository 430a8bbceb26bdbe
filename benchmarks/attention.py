"""Forward+backward time of one attention layer: dense vs compute-all-then-gather vs hs_scale.

    python benchmarks/attention.py [--quick] [--json PATH] [--device cuda --dtype bf16 --backend flash]
    python benchmarks/attention.py --case gqa [...]   the decoder-only LM's GQA layer (benchmarks/attention_gqa.py)

Rows (same B, T, d, H; pool H' for the selection rows):
  a  dense       ordinary H-head attention (SDPA)
  b  reference   the public reference code's way: project and attend all H' heads, then gather H per sample
  c  hs_single   hs_scale, task-homogeneous batch (only the H selected heads are projected and attended)
  d  hs_mixed    hs_scale, batch mixing 8 tasks, projections as `mixed_projection="auto"` chooses, and the two
                 ways measured separately: d_hs_mixed_loop (one GEMM per task segment) and d_hs_mixed_grouped
                 (one torch._grouped_mm; left out where this torch or device cannot run it)
  s  selector    the selector draw alone (forward + backward), part of rows b, c, d: a model draws once per
                 forward for all its layers, so per layer it costs s / layers; ratio_single_vs_dense_per_layer_draw
                 is (c - s) / a, the ratio a layer of a deep model sees
Ratios written with --json: ratio_single_vs_dense (c/a), ratio_mixed_vs_dense (d/a), ratio_reference_vs_single (b/c),
ratio_mixed_loop_vs_dense, ratio_mixed_grouped_vs_dense, ratio_single_vs_dense_per_layer_draw.
Targets on one H200 in bf16 (issue 15): c/a <= 1.10, d/a <= 1.30, b/c >= 1.6.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch

from hs_scale.selection.attention import SelectedHeadAttention, TaskSegments, grouped_mm_supported
from hs_scale.selection.backends import KERNELS, resolve_backend
from hs_scale.selection.selector import HeadSelector

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def reference_forward(layer: SelectedHeadAttention, x_BTD, heads_BH, weights_BH, kernel):
    """All P heads projected and attended (one fused QKV GEMM, same kernel), then H gathered per sample."""
    B, T, D = x_BTD.shape
    P, d, H = layer.pool_heads, layer.head_dim, layer.num_heads
    w_qkv = torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight])
    b_qkv = torch.cat([layer.q_proj.bias, layer.k_proj.bias, layer.v_proj.bias])
    qkv = torch.nn.functional.linear(x_BTD, w_qkv, b_qkv).view(B, T, 3, P, d)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    out_BPTd = kernel(q, k, v, None, False, 0.0)
    index = heads_BH[:, :, None, None].expand(B, H, T, d)
    out_BHTd = out_BPTd.gather(1, index) * weights_BH[:, :, None, None].to(out_BPTd.dtype)
    return layer.out_proj(out_BHTd.transpose(1, 2).reshape(B, T, H * d))


def time_fwd_bwd(fn, x, iters: int, warmup: int, device, clock=time.perf_counter) -> float:
    """Median seconds of one forward+backward."""
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        fn(x).float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(clock() - start)
    return statistics.median(times)


def add_timing_arguments(parser: argparse.ArgumentParser, backend: str, quick_help: str) -> None:
    """The options every attention benchmark shares: iterations, device, dtype, kernel, threads, clock, JSON."""
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--backend", default=backend, help="sdpa | eager | flash | torch_varlen | auto")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process: this process's CPU time (CPU only, with --threads 1): robust to other load")
    parser.add_argument("--json", help="write results here")


def timing_setup(parser: argparse.ArgumentParser, args) -> tuple[torch.device, torch.dtype, object]:
    """(device, dtype, clock) from the shared options; seeds torch, sets threads, logs the backend choice."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # shows the attention backend chosen
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.clock == "process" and device.type != "cpu":
        parser.error("--clock process measures CPU time: use it with --device cpu")
    return device, dtype, time.process_time if args.clock == "process" else time.perf_counter


def main(argv=None) -> dict:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--case" in argv:  # --case encdec (this file's rows) | gqa (the LM's GQA rows, with that script's options)
        i = argv.index("--case")
        case, argv = argv[i + 1] if i + 1 < len(argv) else "", argv[:i] + argv[i + 2:]
        if case == "gqa":
            import attention_gqa

            return attention_gqa.main(argv)
        if case != "encdec":
            raise SystemExit(f"--case {case!r}: use encdec or gqa")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--pool", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=8, help="tasks mixed in row d")
    add_timing_arguments(parser, backend="sdpa", quick_help="fewer iterations (< 1 minute on 2 CPU cores)")
    args = parser.parse_args(argv)
    if args.quick:
        args.iters, args.warmup = 3, 1
    device, dtype, clock = timing_setup(parser, args)
    B, T, D, H, P = args.batch, args.seq, args.dim, args.heads, args.pool
    backend = resolve_backend(args.backend, device, dtype)
    kernel = KERNELS[backend]

    dense = SelectedHeadAttention(D, H, pool_heads=H, backend=backend).to(device, dtype)
    pooled = SelectedHeadAttention(D, H, pool_heads=P, backend=backend).to(device, dtype)
    selector = HeadSelector(args.tasks, 1, P, H, strategy="group").to(device)
    single_task = torch.zeros(B, dtype=torch.long, device=device)
    mixed_task = torch.arange(B, device=device) % args.tasks
    single_segments, mixed_segments = TaskSegments(single_task), TaskSegments(mixed_task)
    x = torch.randn(B, T, D, device=device, dtype=dtype, requires_grad=True)

    def run_reference(inp):
        choice = selector()[0]
        return reference_forward(pooled, inp, choice.heads[single_task], choice.weights[single_task], kernel)

    def run_mixed(mode):
        def run(inp):
            pooled.mixed_projection = mode
            return pooled(inp, choice=selector()[0], task_B=mixed_segments)

        return run

    rows = {
        "a_dense": lambda inp: dense(inp),
        "b_reference": run_reference,
        "c_hs_single": lambda inp: pooled(inp, choice=selector()[0], task_B=single_segments),
        "d_hs_mixed": run_mixed("auto"),
        "d_hs_mixed_loop": run_mixed("loop"),
    }
    def run_selector(inp):  # the draw alone; returns something shaped like inp for time_fwd_bwd
        return inp.detach()[:1, :1, :1] * selector()[0].weights.sum()

    rows["s_selector"] = run_selector
    # The CPU grouped GEMM exists from torch 2.9 on; on CUDA it is a bf16 (Hopper) kernel.
    if hasattr(torch, "_grouped_mm") and (device.type == "cpu" or grouped_mm_supported(device, dtype)):
        rows["d_hs_mixed_grouped"] = run_mixed("grouped")
    seconds, errors = {}, {}
    for name, fn in rows.items():
        try:  # one failing row (a kernel this GPU lacks) must not cost the others' numbers
            seconds[name] = time_fwd_bwd(fn, x, args.iters, args.warmup, device, clock)
        except Exception as err:  # noqa: BLE001 - reported in the output and the JSON
            errors[name] = f"{type(err).__name__}: {err}"
            print(f"row {name} failed: {errors[name]}")
    pooled.mixed_projection = "auto"

    def ratio(num: str, den: str, minus: str | None = None) -> float | None:
        if num not in seconds or den not in seconds or (minus and minus not in seconds):
            return None
        return (seconds[num] - (seconds[minus] if minus else 0.0)) / seconds[den]

    result = {
        "config": dict(B=B, T=T, d=D, H=H, H_pool=P, tasks_mixed=args.tasks, device=str(device),
                       dtype=args.dtype, backend=backend, threads=torch.get_num_threads(), iters=args.iters,
                       clock=args.clock),
        "ms_fwd_bwd": {name: 1000 * s for name, s in seconds.items()},
        "errors": errors,
        "ratio_single_vs_dense": ratio("c_hs_single", "a_dense"),
        "ratio_mixed_vs_dense": ratio("d_hs_mixed", "a_dense"),
        "ratio_reference_vs_single": ratio("b_reference", "c_hs_single"),
        "ratio_mixed_loop_vs_dense": ratio("d_hs_mixed_loop", "a_dense"),
        "ratio_mixed_grouped_vs_dense": ratio("d_hs_mixed_grouped", "a_dense"),
        "ratio_single_vs_dense_per_layer_draw": ratio("c_hs_single", "a_dense", minus="s_selector"),
        "mixed_projection_auto": "grouped" if pooled._use_grouped(x) else "loop",
    }
    print(f"attention fwd+bwd  B={B} T={T} d={D} H={H} H'={P} {args.dtype} {device} backend={backend}")
    print(f"{'row':<20}{'ms':>10}{'vs dense':>10}")
    dense_s = seconds.get("a_dense", float("nan"))
    for name, s in seconds.items():
        print(f"{name:<20}{1000 * s:>10.2f}{s / dense_s:>10.2f}")
    for key, value in result.items():
        if key.startswith("ratio_"):
            print(f"{key:<40}{'-' if value is None else f'{value:.3f}'}")
    print(f"mixed_projection auto -> {result['mixed_projection_auto']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
