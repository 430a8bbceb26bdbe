"""Training throughput (target tokens/s) and model FLOPs utilisation (MFU) of the head-selection encoder-decoder.

    python benchmarks/train_throughput.py --quick                        # CPU, ~1 min
    python benchmarks/train_throughput.py --d-model 1024 --layers 24 --bf16 --backend auto --device cuda \\
        --compare-dense --mixed-tasks 4 --json out.json                  # what benchmarks/gpu/run.sh runs

Single process, one device: forward + backward + AdamW step on synthetic S2T batches (task-homogeneous micro-batch,
every attention type selecting H of H' heads). --compare-dense also times a dense model with the same H active
heads (no pool, no selector): `hs_vs_dense_tokens_per_s` is hs_scale's tokens/s over the dense model's (target on
one H200: >= 0.93). --mixed-tasks N also times the head-selection model on batches mixing N tasks.

FLOPs per training step, counted analytically (multiply-add = 2 FLOPs, backward = 2x forward, so x3 overall):
    FLOPs = 6 * N_enc * S_tok + 6 * N_dec * L_tok + 6 * D * V * L_tok
          + 3 * [ 4 * B * S^2 * H_sel * d * E            (encoder self-attention scores + attn x V)
                + 2 * B * L^2 * H_sel * d * Dl           (decoder causal self-attention: half of 4*B*L^2)
                + 4 * B * L * S * H_sel * d * Dl ]       (cross-attention)
          + 6 * N_conv * S_frames                         (conv subsampler, per output frame of each conv)
where N_enc / N_dec are the *active* parameters of one encoder / decoder layer: the Q/K/V projections count only
the H selected heads (H * d rows, not the H' pool), so H_sel = H and the numbers do not depend on H'; S_tok = B * S
encoder positions, L_tok = B * L target positions (padding included: it is computed), d = D / H, E / Dl layer
counts. Selector, layer-norm and softmax FLOPs are left out (< 1%).
MFU = FLOPs per step / step time / peak. Peak: --peak-tflops, else known GPU peaks (dense bf16/fp32), else on CPU a
measured fp32/bf16 matmul peak (4096^2 GEMMs), which the output says. No GPU was available when this was
written: benchmarks/gpu/run.sh runs the cuda path (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from hs_scale.selection.backends import resolve_backend

GPU_PEAK_TFLOPS = {  # dense, no sparsity: (bf16, fp32/tf32)
    "H100": (989.0, 494.0),
    "H200": (989.0, 494.0),
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
}


def build(args, dense: bool = False):
    """(config, model): head selection over a pool of 2H heads, or (dense) an ordinary model with the same H."""
    from hs_scale.models import ModelConfig, build_model
    from hs_scale.selection.config import SelectionConfig

    cfg = ModelConfig(
        arch="s2t", d_model=args.d_model, encoder_layers=args.layers,
        decoder_layers=args.decoder_layers or args.layers // 2,
        num_heads=args.heads, ffn_dim=args.ffn or 4 * args.d_model, vocab_size=args.vocab, dropout=0.0,
        conv_channels=args.conv_channels, attention_backend=args.backend,
    )
    sel = None if dense else SelectionConfig(strategy="group", pool_heads=2 * args.heads)
    return cfg, build_model(cfg, sel, num_tasks=4)


def step_flops(cfg, B: int, T: int, L: int) -> float:
    """Analytic training FLOPs of one step (module docstring)."""
    D, F, H, V = cfg.d_model, cfg.ffn_dim, cfg.num_heads, cfg.vocab_size
    d = D // H
    S = T
    for _ in cfg.conv_kernel_sizes:
        S = (S - 1) // 2 + 1
    attn = 4 * D * (H * d) + 4 * D  # q, k, v of H selected heads + out_proj (weights + biases)
    ffn = 2 * D * F + F + D
    n_enc, n_dec = attn + ffn, 2 * attn + ffn
    dense = 6 * n_enc * B * S * cfg.encoder_layers + 6 * n_dec * B * L * cfg.decoder_layers + 6 * D * V * B * L
    scores = (
        4 * B * S * S * H * d * cfg.encoder_layers
        + 2 * B * L * L * H * d * cfg.decoder_layers
        + 4 * B * L * S * H * d * cfg.decoder_layers
    )
    conv, frames, c_in = 0, T, cfg.input_feat_per_channel
    for i, k in enumerate(cfg.conv_kernel_sizes):
        frames = (frames - 1) // 2 + 1
        c_out = cfg.conv_channels if i < len(cfg.conv_kernel_sizes) - 1 else 2 * D
        conv += 6 * c_in * c_out * k * frames * B
        c_in = c_out // 2
    return dense + 3 * scores + conv


def measured_peak(device: torch.device, dtype: torch.dtype, n: int = 4096, reps: int = 5) -> float:
    """Best achieved TFLOP/s of an n x n x n matmul on `device` (the practical peak on CPU)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def peak_tflops(args, device, dtype) -> tuple[float, str]:
    if args.peak_tflops:
        return args.peak_tflops, "given (--peak-tflops)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, fp32) in GPU_PEAK_TFLOPS.items():
            if key in name:
                return (bf16 if dtype == torch.bfloat16 else fp32), f"datasheet {key} dense"
    n = 1024 if args.quick else 4096
    return measured_peak(device, dtype, n), f"measured {n}^3 matmul ({dtype}) on {device.type}"


def time_steps(model, cfg, args, device: torch.device, task_B: torch.Tensor) -> float:
    """Mean seconds of one training step (forward, backward, AdamW) after `args.warmup` untimed steps."""
    model.to(device).train()
    # The fused (single-kernel) AdamW on CUDA: the optimizer step is not what this measures.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    B, T, L = args.batch, args.frames, args.target_len
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(B, T, cfg.input_feat_per_channel, generator=gen).to(device)
    lengths = torch.full((B,), T, device=device)
    tgt = torch.randint(4, cfg.vocab_size, (B, L), generator=gen).to(device)
    dec_in = torch.cat([torch.full((B, 1), 2, device=device), tgt[:, :-1]], 1)

    def one_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(feats, lengths, dec_in, task_B, task_B)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / args.steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small CPU config, few steps (~1 min)")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24, help="encoder layers")
    p.add_argument("--decoder-layers", type=int, default=None, help="default: layers // 2")
    p.add_argument("--heads", type=int, default=16, help="H active heads (pool H' = 2H)")
    p.add_argument("--ffn", type=int, default=None, help="default 4 * d")
    p.add_argument("--vocab", type=int, default=10000)
    p.add_argument("--conv-channels", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--frames", type=int, default=1200, help="feature frames per utterance (S = frames / 4)")
    p.add_argument("--target-len", type=int, default=100)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="autocast bf16")
    p.add_argument("--backend", default="sdpa", help="attention backend: sdpa | eager | flash | torch_varlen | auto")
    p.add_argument("--compare-dense", action="store_true", help="also time a dense model with the same H heads")
    p.add_argument("--mixed-tasks", type=int, default=0, help="also time batches mixing this many tasks (<= 4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak; default: datasheet or measured")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # shows the attention backend chosen
    if args.quick:
        args.d_model, args.layers, args.heads, args.conv_channels = 256, 6, 4, 256
        args.batch, args.frames, args.target_len, args.steps, args.warmup = 4, 400, 40, 3, 1
    if not 0 <= args.mixed_tasks <= 4:
        p.error(f"--mixed-tasks {args.mixed_tasks}: the benchmark model has 4 tasks; use 0 to 4")
    device, dtype = torch.device(args.device), torch.bfloat16 if args.bf16 else torch.float32
    B, T, L = args.batch, args.frames, args.target_len
    torch.manual_seed(0)
    cfg, model = build(args)
    homogeneous = torch.zeros(B, dtype=torch.long, device=device)
    step_s = time_steps(model, cfg, args, device, homogeneous)
    extra, errors = {}, {}
    if args.mixed_tasks:
        extra["mixed_tasks"] = args.mixed_tasks
        mixed = torch.arange(B, device=device) % args.mixed_tasks
        try:  # the optional measurements must not cost the main one its numbers
            extra["step_s_mixed"] = time_steps(model, cfg, args, device, mixed)
            extra["target_tokens_per_s_mixed"] = B * L / extra["step_s_mixed"]
        except Exception as err:  # noqa: BLE001 - reported in the output and the JSON
            errors["mixed"] = f"{type(err).__name__}: {err}"
    params_M = sum(p.numel() for p in model.parameters()) / 1e6
    del model
    if args.compare_dense:
        torch.manual_seed(0)
        _, dense = build(args, dense=True)
        try:
            extra["dense_step_s"] = time_steps(dense, cfg, args, device, homogeneous)
            extra["dense_target_tokens_per_s"] = B * L / extra["dense_step_s"]
            extra["hs_vs_dense_tokens_per_s"] = extra["dense_step_s"] / step_s
            if "step_s_mixed" in extra:
                extra["hs_mixed_vs_dense_tokens_per_s"] = extra["dense_step_s"] / extra["step_s_mixed"]
        except Exception as err:  # noqa: BLE001
            errors["dense"] = f"{type(err).__name__}: {err}"
        del dense
    if errors:
        extra["errors"] = errors
    flops = step_flops(cfg, B, T, L)
    peak, peak_src = peak_tflops(args, device, dtype)
    res = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": str(dtype).replace("torch.", ""), "backend": args.backend,
        "backend_resolved": resolve_backend(args.backend, device, dtype),
        "d_model": cfg.d_model, "encoder_layers": cfg.encoder_layers, "decoder_layers": cfg.decoder_layers,
        "heads": cfg.num_heads, "pool_heads": 2 * cfg.num_heads, "params_M": params_M,
        "batch": B, "frames": T, "target_len": L, "step_s": step_s, "target_tokens_per_s": B * L / step_s,
        "tflops_per_step": flops / 1e12, "achieved_tflops": flops / step_s / 1e12, "peak_tflops": peak,
        "peak_source": peak_src, "mfu": flops / step_s / 1e12 / peak, "threads": torch.get_num_threads(), **extra,
    }
    width = max(map(len, res))
    for k, v in res.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
