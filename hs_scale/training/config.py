"""Configuration of the training loop (the ``train:`` section of a run's YAML)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SCHEDULES = ("inverse_sqrt", "cosine", "constant")
DTYPES = ("fp32", "bf16")
RESUME = ("auto", "never", "must")


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    """Where metrics, checkpoints, the resolved config and reports go."""

    steps: int = 1000
    """Optimizer steps to train."""

    lr: float = 5e-4
    """Peak learning rate (paper: 5e-4 for ASR/ST, 7e-4 for MT)."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """Adam betas (paper: 0.9, 0.98)."""

    eps: float = 1e-6
    """Adam epsilon (paper: 1e-6)."""

    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW); the paper uses none."""

    selector_lr_scale: float = 1.0
    """Learning rate of the head selectors' logits phi as a multiple of `lr` (same schedule). Adam moves phi by
    at most ~lr per step, so at short budgets phi cannot leave its initial range; docs/results.md measures it."""

    schedule: str = "inverse_sqrt"
    """Learning-rate schedule after linear warm-up: "inverse_sqrt" (paper), "cosine" or "constant"."""

    warmup_steps: int = 100
    """Linear warm-up steps (paper: 10k)."""

    min_lr_ratio: float = 0.0
    """cosine only: final lr as a fraction of the peak."""

    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy (paper: 0.1)."""

    clip_norm: float = 10.0
    """Gradient-norm clipping threshold (paper: 10); 0 disables."""

    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""

    dtype: str = "fp32"
    """"fp32" or "bf16" (autocast; parameters and optimizer state stay fp32)."""

    activation_checkpointing: bool = False
    """Recompute each encoder/decoder layer in backward instead of keeping its activations (less memory, about
    one more forward of compute). Applies to the replicated engines (one process, megatron DDP, ZeRO)."""

    max_nonfinite_steps: int = 5
    """A step whose loss or gradient is NaN/inf is skipped and counted; this many in a row stop the run."""

    log_every: int = 10
    """Steps between metric lines (JSONL, TensorBoard, console)."""

    eval_every: int = 0
    """Steps between evaluations (0: only at the end)."""

    eval_decode_utterances: int = 50
    """Each evaluation also decodes this many utterances of each task (the first batches of the eval split that
    hold them) and logs WER (ASR) or BLEU (ST, MT) per task (exact-match accuracy on the synthetic task),
    computed by `hs-scale evaluate`'s search and metrics: `hs-scale evaluate --split dev --beam B --max-len-b M
    --utterances-per-task N` on the checkpoint of that step gives the same numbers. 0: off. Not under pipeline
    parallelism, nor for arch lm (perplexity only); see docs/training.md."""

    eval_decode_beam: int = 1
    """Beam size of those decodes (1: greedy; the paper's final numbers use 5 with `hs-scale evaluate`)."""

    eval_decode_max_len: int = 200
    """At most this many tokens per decoded utterance (`hs-scale evaluate --max-len-b`, with --max-len-a 0)."""

    wandb: str = "off"
    """Weights & Biases logging on rank 0: "off", "offline" (run files under <output_dir>/wandb, no network;
    `wandb sync <dir>` uploads them later) or "online" (needs `wandb login` or WANDB_API_KEY in the environment,
    never in the config). Logs what metrics.jsonl holds (train loss, lr, temperature, per-task losses, eval) and
    the selection table at each evaluation. Needs the `track` extra (pip install wandb)."""

    wandb_project: str = "hs_scale"
    """W&B project of the run (the run's name is its output dir's name)."""

    seed: int = 1
    """Seed of parameter init, dropout and sampling."""

    device: str = "auto"
    """"auto" (cuda when available), "cpu" or "cuda"."""

    threads: int = 0
    """torch intra-op threads on CPU (0: leave torch's default)."""

    save_every: int = 0
    """Steps between checkpoints (0: only at the end). Checkpoints go to <output_dir>/checkpoints."""

    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted once a newer one is complete."""

    resume: bool | str = "auto"
    """Checkpoints already in <output_dir>/checkpoints: "auto" continues from the latest one (a fresh start when
    there is none), "must" refuses to start without one, "never" refuses to start if there is one (a new run
    needs a new output_dir). Old configs' true/false mean auto/never. Resuming checks the checkpoint's config
    against this one and refuses any difference outside the always-safe fields (steps raised, intervals,
    keep_last, progress bar, threads...) and `allow_config_change`."""

    allow_config_change: list[str] = field(default_factory=list)
    """Fields ("train.lr", "selection.temperature_min", ...) that may differ from the checkpoint's config on
    resume, besides the always-safe ones: you take responsibility for continuing with the new values."""

    init_from: str = ""
    """Start a NEW run (step 0, fresh optimizer and schedule) from the weights of a checkpoint (a step folder, a
    checkpoint root or a run's output_dir: its latest), or of an `hs-scale import-hf` output directory. Verified
    like every load; model and selection config must match the weights'. Only for a fresh run: once output_dir
    holds checkpoints (e.g. after a preemption), they are resumed instead."""

    force_unlock: bool = False
    """Take over the output dir's lock even though its holder cannot be proven gone (it ran on another host):
    only when you know that run is dead (see docs/reliability.md)."""

    on_corrupt: str = "fallback"
    """A corrupt or half-written latest checkpoint: "fallback" to the previous one with a warning, or "raise"."""

    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device, to report model FLOPs utilisation (0: MFU is not reported)."""

    progress_bar: bool = True
    """A tqdm progress bar (loss, lr, tokens/s, ETA) on rank 0."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule={self.schedule!r} is unknown; use one of {SCHEDULES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"train.dtype={self.dtype!r} is unknown; use one of {DTYPES}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device={self.device!r} is unknown; use auto, cpu or cuda")
        for name in ("steps", "grad_accum", "log_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas={self.betas} must be two numbers in [0, 1), e.g. [0.9, 0.98]")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"train.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.wandb not in ("off", "offline", "online"):
            raise ValueError(f"train.wandb={self.wandb!r} is unknown; use off, offline or online")
        if self.on_corrupt not in ("fallback", "raise"):
            raise ValueError(f"train.on_corrupt={self.on_corrupt!r} is unknown; use fallback or raise")
        if self.keep_last < 1:
            raise ValueError(f"train.keep_last={self.keep_last} must be >= 1")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.save_every < 0 or self.threads < 0:
            raise ValueError("train.warmup_steps, eval_every, save_every and threads must be >= 0")
        if self.eval_decode_utterances < 0 or self.eval_decode_max_len < 1 or self.eval_decode_beam < 1:
            raise ValueError(f"train.eval_decode_utterances={self.eval_decode_utterances} must be >= 0 (0: off), "
                             f"eval_decode_beam={self.eval_decode_beam} and eval_decode_max_len="
                             f"{self.eval_decode_max_len} >= 1")
        for name, low, high, valid in (("lr", 0, math.inf, "> 0"), ("eps", 0, math.inf, "> 0"),
                                       ("weight_decay", 0, math.inf, ">= 0"), ("clip_norm", 0, math.inf, ">= 0"),
                                       ("selector_lr_scale", 0, math.inf, "> 0"),
                                       ("min_lr_ratio", 0, 1, "in [0, 1]"), ("peak_tflops", 0, math.inf, ">= 0")):
            value = getattr(self, name)
            ok = math.isfinite(value) and low <= value <= high and not (valid == "> 0" and value == 0)
            if not ok:
                raise ValueError(f"train.{name}={value} is out of range: must be a finite number {valid}")
        if isinstance(self.resume, bool):  # configs written before the policy existed
            self.resume = "auto" if self.resume else "never"
        if self.resume not in RESUME:
            raise ValueError(f"train.resume={self.resume!r} is unknown; use one of {RESUME}")
        if not all(isinstance(f, str) and f.count(".") == 1 for f in self.allow_config_change):
            raise ValueError(f"train.allow_config_change={self.allow_config_change}: list fields as section.field")
