"""Forward+backward time of one GQA attention layer of the decoder-only LM: dense vs selected heads.

    python benchmarks/attention_gqa.py [--quick] [--json PATH] [--device cuda --dtype bf16 --backend auto]

Every row runs the same packed batch (each row of the batch holds `--docs` documents; attention causal and
within-document: one SDPA call with a block-diagonal mask, or the varlen kernel with cu_seqlens on CUDA):
  a  dense        ordinary GQA layer (r = 1, no selection), the LlamaAttention layout
  c  hs_single    r candidates per slot, every document of one task (only H query heads projected)
  d  hs_packed    r candidates per slot, the documents of each row belong to `--tasks` different tasks
  s  selector     the selector draw alone (part of rows c and d; a model draws once per forward for all layers)
Ratios: ratio_single_vs_dense (c/a), ratio_packed_vs_dense (d/a). Issue 12's targets (H200, bf16): <= 1.10 and
<= 1.30, as for the encoder-decoders (benchmarks/attention.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import add_timing_arguments, time_fwd_bwd, timing_setup  # noqa: E402

from hs_scale.models.lm.model import rope_tables  # noqa: E402
from hs_scale.selection.attention import TaskSegments  # noqa: E402
from hs_scale.selection.backends import resolve_backend  # noqa: E402
from hs_scale.selection.gqa import DocumentLayout, GQASelectedAttention, positions_in_documents  # noqa: E402
from hs_scale.selection.selector import HeadSelector  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=2, help="r: candidates per query-head slot")
    parser.add_argument("--docs", type=int, default=8, help="documents packed in each row")
    parser.add_argument("--tasks", type=int, default=8, help="tasks mixed in row d")
    add_timing_arguments(parser, backend="auto", quick_help="a small CPU-sized layer, few iterations")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.dim, args.heads, args.kv_heads = 2, 512, 256, 8, 2
        args.iters, args.warmup = 5, 1
    device, dtype, clock = timing_setup(parser, args)
    B, T, D, H, G, r = args.batch, args.seq, args.dim, args.heads, args.kv_heads, args.candidates
    d = D // H
    backend = resolve_backend(args.backend, device, dtype)
    doc_len = T // args.docs
    docs_BT = (torch.arange(T, device=device) // doc_len).clamp(max=args.docs - 1).expand(B, T).contiguous()
    layout = DocumentLayout.build(docs_BT, T, backend)
    cos, sin = rope_tables(positions_in_documents(docs_BT), d, 10000.0, dtype)
    packed_tasks_BT = ((docs_BT + torch.arange(B, device=device)[:, None]) % args.tasks).reshape(-1)
    single = TaskSegments(torch.zeros(B * T, dtype=torch.long, device=device))
    packed = TaskSegments(packed_tasks_BT)

    dense = GQASelectedAttention(D, H, G, d).to(device, dtype)
    pooled = GQASelectedAttention(D, H, G, d, candidates=r).to(device, dtype)
    selector = HeadSelector(args.tasks, 1, H * r, H, strategy="group", partitions=G).to(device)
    x = torch.randn(B, T, D, device=device, dtype=dtype, requires_grad=True)

    rows = {
        "a_dense": lambda inp: dense(inp, cos, sin, layout),
        "c_hs_single": lambda inp: pooled(inp, cos, sin, layout, selector()[0], single),
        "d_hs_packed": lambda inp: pooled(inp, cos, sin, layout, selector()[0], packed),
        "s_selector": lambda inp: inp.detach()[:1, :1, :1] * selector()[0].weights.sum(),
    }
    seconds = {name: time_fwd_bwd(fn, x, args.iters, args.warmup, device, clock) for name, fn in rows.items()}
    result = {
        "config": dict(B=B, T=T, D=D, H=H, G=G, r=r, docs_per_row=args.docs, tasks=args.tasks, device=str(device),
                       dtype=args.dtype, backend=layout.backend, threads=torch.get_num_threads(), iters=args.iters,
                       clock=args.clock),
        "ms_fwd_bwd": {name: 1000 * s for name, s in seconds.items()},
        "ratio_single_vs_dense": seconds["c_hs_single"] / seconds["a_dense"],
        "ratio_packed_vs_dense": seconds["d_hs_packed"] / seconds["a_dense"],
    }
    print(f"GQA attention fwd+bwd  B={B} T={T} D={D} H={H} G={G} r={r} {args.dtype} {device} "
          f"kernel={layout.backend}")
    for name, s in seconds.items():
        print(f"{name:<14}{1000 * s:>10.2f} ms{s / seconds['a_dense']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
