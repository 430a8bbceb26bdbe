"""Selected-head attention: the pool holds H' heads, each task computes only its H.

Legend: B batch, T query length, S key length, D model width, P = H' pool heads, H active heads (slots),
d = D / H head dim.

Parameters keep the pool: q_proj/k_proj/v_proj map D -> P*d (rows grouped by head), out_proj maps the H slots
(H*d) back to D, exactly like a dense H-head layer. A forward pass, for each task segment of the batch:
  1. gathers the selected heads' rows of the Q/K/V weights (index_select: gradients scatter back into the pool)
     and folds each slot's straight-through weight w into its V rows (attention is linear in V, so
     w * softmax(qk)v == softmax(qk)(w v), and this costs H*d*D multiplies instead of B*T*D);
  2. projects the segment's tokens with those H-head weights.
The attention kernel and the output projection then run once over the whole batch as an ordinary H-head
attention: no kernel ever sees the pool, and a mixed-task batch only splits the projection GEMMs.

A mixed-task batch projects either with a Python loop over its task segments (one gather + GEMM per task) or
with one grouped GEMM (`torch._grouped_mm`: rows sorted by task, every present task's gathered weights stacked
[G, n*H*d, D]), a fixed number of kernel launches however many tasks are mixed. `mixed_projection` chooses:
"grouped", "loop", or "auto" (grouped on CUDA in bf16 once a probe has shown it works there, else the loop).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hs_scale.selection.backends import KERNELS, passes_probe, resolve_backend
from hs_scale.selection.config import head_problems
from hs_scale.selection.selector import HeadChoice


class TaskSegments:
    """Rows of a batch grouped by task id: the unit over which selected-head projections run.

    Built once per model forward (one host sync) and shared by every layer. `order` sorts rows by task
    (stable); `inverse` undoes it. A task-homogeneous batch has order None (the fast path: no permutation).
    """

    def __init__(self, task_B: Tensor):
        task_list = task_B.tolist()
        if all(t == task_list[0] for t in task_list):
            self.tasks, self.counts, self.order, self.inverse = [task_list[0]], [len(task_list)], None, None
            return
        self.order = torch.argsort(task_B, stable=True)
        self.inverse = torch.argsort(self.order)
        uniq, counts = torch.unique_consecutive(task_B[self.order], return_counts=True)
        self.tasks, self.counts = uniq.tolist(), counts.tolist()
        # For the grouped projection: present task ids and rows per task, as device tensors.
        self.tasks_G, self.counts_G = uniq, counts

    @classmethod
    def single(cls, task: int, batch_size: int) -> TaskSegments:
        return cls(torch.full((batch_size,), task, dtype=torch.long))

    def map(self, fn, x: Tensor) -> Tensor:
        """Apply fn(task, rows) to each task's rows of x (first dim = batch) and reassemble in batch order."""
        if self.order is None:
            return fn(self.tasks[0], x)
        parts = x.index_select(0, self.order).split(self.counts)
        out = torch.cat([fn(task, rows) for task, rows in zip(self.tasks, parts, strict=True)])
        return out.index_select(0, self.inverse)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a GEMM on x runs in: autocast's where it is on for x's device, else x's own."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `mixed_projection="auto"` uses the grouped GEMM: CUDA in bf16 (Hopper's grouped kernel), once a
    probe has shown it runs and computes the right thing here."""
    return device.type == "cuda" and dtype == torch.bfloat16 and grouped_mm_works()


@functools.cache
def grouped_mm_works() -> bool:
    """torch._grouped_mm exists and its forward + backward match per-group matmuls on this CUDA device in bf16.

    Probed once (milliseconds): a private op whose support varies by version and GPU; a failure or a wrong result
    means the per-task loop, with a warning, rather than a crash or silently wrong training.
    """
    if not (hasattr(torch, "_grouped_mm") and torch.cuda.is_available()):
        return False
    return passes_probe(_probe_grouped_mm, "torch._grouped_mm failed its probe (%s); mixed-task batches use the "
                                           "per-task loop")


def _probe_grouped_mm(device: str = "cuda") -> None:
    """Raises unless _grouped_mm's forward and backward match per-group matmuls (bf16) on `device`."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(48, 64, device=device, generator=gen).bfloat16().requires_grad_()
    W = torch.randn(3, 32, 64, device=device, generator=gen).bfloat16().requires_grad_()
    offsets = torch.tensor([16, 16, 48], device=device, dtype=torch.int32)  # group 1 is empty
    y = torch._grouped_mm(x, W.transpose(1, 2), offs=offsets)
    grad = torch.randn(y.shape, device=device, generator=gen).bfloat16()
    gx, gW = torch.autograd.grad(y, (x, W), grad)
    x0, x2, g0, g2 = x[:16], x[16:], grad[:16], grad[16:]
    expected = {
        "output": (y, torch.cat([x0 @ W[0].T, x2 @ W[2].T])),
        "grad input": (gx, torch.cat([g0 @ W[0], g2 @ W[2]])),
        "grad weight": (gW, torch.stack([g0.T @ x0, torch.zeros_like(W[1]), g2.T @ x2])),
    }
    for name, (got, want) in expected.items():
        torch.testing.assert_close(got.float(), want.float(), atol=0.5, rtol=2e-2, msg=lambda m, n=name: f"{n}: {m}")


def gather_heads(
    weight: Tensor, bias: Tensor | None, heads: Tensor, head_dim: int, slot_weights: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """The rows of pool heads `heads` (slot order) of a pooled projection: the one gather of head selection.

    weight [P*d, D] and bias [P*d] (rows grouped by head); heads long [H] -> ([H*d, D], [H*d]), or [G, H] (G
    tasks at once) -> ([G, H*d, D], [G, H*d]). Gradients scatter back into the pool rows. slot_weights ([H] or
    [G, H]), when given, multiply each slot's rows: the straight-through weight folded into V (attention is
    linear in V). Used by training (SelectedHeadAttention), export (export/materialize.py) and, restated because
    it must stay standalone, by the remote-code model (a test pins the two together).
    """
    D = weight.shape[-1]
    W_PdD = weight.view(-1, head_dim, D)
    W = W_PdD.index_select(0, heads) if heads.dim() == 1 else W_PdD[heads]
    b = None
    if bias is not None:
        b_Pd = bias.view(-1, head_dim)
        b = b_Pd.index_select(0, heads) if heads.dim() == 1 else b_Pd[heads]
    if slot_weights is not None:
        w = slot_weights.to(W.dtype)
        W = W * w[..., None, None]
        b = None if b is None else b * w[..., None]
    return W.flatten(-3, -2), None if b is None else b.flatten(-2, -1)


class Projections:
    """How a `SelectedHeadAttention` builds its projections and enters its region: a layer spec.

    The default is one device: nn.Linear for q/k/v (D -> P*d, rows grouped by head) and out (H*d -> D).
    A tensor-parallel spec (hs_scale.parallel.tp_attention.MegatronProjections, in the spirit of megatron-core's
    layer specs) returns column-/row-parallel linears holding pool partition `rank` of `partitions` and slots
    likewise, marks the input's entry into the TP region, and forks the dropout RNG per rank. The attention's
    forward is the same code either way: it never calls the q/k/v modules, only gathers rows of their weights.
    """

    partitions = 1
    """t: the pool and the slots are split into t contiguous parts; this module holds one of them."""

    def column(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        """q/k/v projection, D -> P*d (global sizes): a module with `weight` [P*d/t, D] and `bias`."""
        return nn.Linear(in_features, out_features, bias=bias)

    def row(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        """Output projection, H*d -> D (global sizes): forward(x [.., H*d/t]) -> [.., D], summed over parts."""
        return nn.Linear(in_features, out_features, bias=bias)

    def enter(self, x: Tensor) -> Tensor:
        """The layer's input entering the projections (TP: identity forward, all-reduce of the gradient)."""
        return x

    def reduce(self, y: Tensor) -> Tensor:
        """Partial outputs of a row-parallel projection computed outside the `row` module (TP: all-reduce
        forward, identity backward); the bias is added after it."""
        return y

    def dropout_rng(self):
        """Context under which attention dropout draws (TP: this rank's RNG stream)."""
        return contextlib.nullcontext()


LOCAL = Projections()


class SelectedHeadAttention(nn.Module):
    """Multi-head attention over H heads chosen per task from a pool of P (self- or cross-attention).

    With P == H and no choice this is an ordinary dense attention with the parameter layout of
    transformers' Speech2Text/M2M100 attention (scaling d**-0.5, biases on all four projections).
    `projections` builds the four projections (default: one device; see `Projections`). Under a spec with
    t partitions, `num_heads` / `pool_heads` hold this module's H/t and P/t, and `choice` is a local HeadChoice
    (a `HeadSelector(rank=...)`'s output).
    """

    mixed_projection = "auto"
    """Mixed-task batches: "grouped" (one torch._grouped_mm), "loop" (per task segment) or "auto" (module doc).
    A class attribute, so one setting reaches every layer; set it per instance to override."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        pool_heads: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        backend: str = "sdpa",
        *,
        projections: Projections = LOCAL,
    ):
        super().__init__()
        pool_heads = pool_heads or num_heads
        t = projections.partitions
        problems = head_problems(num_heads, pool_heads, t, "subset")  # the one rule; a config refuses it at load
        if embed_dim % num_heads:
            problems.append(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        if problems:
            raise ValueError("; ".join(problems))
        self.projections = projections
        self.embed_dim, self.head_dim = embed_dim, embed_dim // num_heads
        self.num_heads, self.pool_heads = num_heads // t, pool_heads // t
        self.dropout, self.backend = dropout, backend
        pool_width = pool_heads * self.head_dim
        self.q_proj = projections.column(embed_dim, pool_width, bias)
        self.k_proj = projections.column(embed_dim, pool_width, bias)
        self.v_proj = projections.column(embed_dim, pool_width, bias)
        self.out_proj = projections.row(num_heads * self.head_dim, embed_dim, bias)

    def extra_repr(self) -> str:
        shard = f", partitions={self.projections.partitions}" if self.projections.partitions > 1 else ""
        return (
            f"heads={self.num_heads}, pool={self.pool_heads}, head_dim={self.head_dim}, backend={self.backend}"
            f"{shard}"
        )

    def _task_weights(self, choice: HeadChoice | None, task: int, names: str) -> tuple[Tensor, Tensor | None]:
        """Weights [len(names)*H*d, D] (and bias) of the task's selected heads for projections `names` ("qkv")."""
        heads_H = None if choice is None else choice.heads[task]
        w_H = None if choice is None else choice.weights[task]
        return self._gathered(heads_H, w_H, names, stack_dim=0)

    def _group_weights(self, choice: HeadChoice, tasks_G: Tensor, names: str) -> tuple[Tensor, Tensor | None]:
        """Stacked weights [G, len(names)*H*d, D] (and biases [G, len(names)*H*d]) of the tasks tasks_G.

        The same rows as `_task_weights(choice, task, names)` for each task, gathered in one indexing per name.
        """
        heads_GH, w_GH = choice.heads.index_select(0, tasks_G), choice.weights.index_select(0, tasks_G)
        return self._gathered(heads_GH, w_GH, names, stack_dim=1)

    def _gathered(self, heads, slot_weights, names: str, stack_dim: int) -> tuple[Tensor, Tensor | None]:
        """`gather_heads` of each projection in `names`, the slot weights folded into V, concatenated."""
        weights, biases = [], []
        for name in names:
            proj = getattr(self, f"{name}_proj")
            if heads is None:  # dense: the whole (un-pooled) projection
                weights.append(proj.weight)
                biases.append(proj.bias)
                continue
            w, b = gather_heads(proj.weight, proj.bias, heads, self.head_dim, slot_weights if name == "v" else None)
            weights.append(w)
            biases.append(b)
        bias = None if biases[0] is None else torch.cat(biases, stack_dim)
        return torch.cat(weights, stack_dim), bias

    def _project_grouped(self, x_BTD: Tensor, choice: HeadChoice, segments: TaskSegments, names: str) -> Tensor:
        """[B, T, len(names)*H*d] through one grouped GEMM over the rows sorted by task (no per-task launches)."""
        B, T, D = x_BTD.shape
        W_GnD, b_Gn = self._group_weights(choice, segments.tasks_G, names)
        dtype = _compute_dtype(x_BTD)  # _grouped_mm has no autocast rule: cast as autocast would for F.linear
        x_ND = x_BTD.index_select(0, segments.order).reshape(B * T, D).to(dtype)
        offsets_G = (segments.counts_G * T).cumsum(0, dtype=torch.int32)
        # W^T as a column-major view [G, D, n], the layout the grouped kernel wants for its second operand.
        y_Nn = torch._grouped_mm(x_ND, W_GnD.to(dtype).transpose(1, 2), offs=offsets_G)
        y_BTn = y_Nn.view(B, T, -1)
        if b_Gn is not None:
            group_B = torch.repeat_interleave(
                torch.arange(len(segments.counts), device=x_BTD.device), segments.counts_G, output_size=B
            )
            y_BTn = y_BTn + b_Gn.to(dtype).index_select(0, group_B)[:, None, :]
        # Undoing the sort also makes the gradient reaching _grouped_mm contiguous (index_select's backward),
        # which its backward requires.
        return y_BTn.index_select(0, segments.inverse)

    def _use_grouped(self, x_BTD: Tensor) -> bool:
        mode = self.mixed_projection
        if mode not in ("auto", "grouped", "loop"):
            raise ValueError(f"mixed_projection={mode!r} is unknown; use auto, grouped or loop")
        if mode == "auto":
            # 16-byte aligned rows of both operands and of the output: what the CUDA grouped kernel requires.
            aligned = x_BTD.shape[-1] % 8 == 0 and (self.num_heads * self.head_dim) % 8 == 0
            return aligned and grouped_mm_supported(x_BTD.device, _compute_dtype(x_BTD))
        return mode == "grouped"

    def _project(self, x_BTD: Tensor, choice, segments: TaskSegments, names: str) -> list[Tensor]:
        """Project x with the selected heads' weights; returns one [B, H, T, d] tensor per name."""
        if choice is None:
            y = F.linear(x_BTD, *self._task_weights(None, 0, names))
        elif segments.order is not None and self._use_grouped(x_BTD):
            y = self._project_grouped(x_BTD, choice, segments, names)
        else:
            y = segments.map(lambda task, rows: F.linear(rows, *self._task_weights(choice, task, names)), x_BTD)
        B, T = x_BTD.shape[:2]
        y_BTnHd = y.view(B, T, len(names), self.num_heads, self.head_dim)
        return [y_BTnHd[:, :, i].transpose(1, 2) for i in range(len(names))]

    def forward(
        self,
        x_BTD: Tensor,
        *,
        choice: HeadChoice | None = None,
        task_B: Tensor | TaskSegments | None = None,
        memory_BSD: Tensor | None = None,
        key_padding_mask_BS: Tensor | None = None,
        causal: bool = False,
        cache: dict | None = None,
    ) -> Tensor:
        """Attention output [B, T, D].

        choice: the layer's HeadChoice (None: dense, requires pool_heads == num_heads).
        task_B: long [B] task id per row (or prebuilt TaskSegments); may be None when choice has one task.
        memory_BSD: keys/values source for cross-attention (None: self-attention).
        key_padding_mask_BS: bool, True marks a padded key (over memory for cross-attention, over the cached
            plus new keys for cached self-attention).
        cache: a dict owned by the caller, one per layer per generation. Self-attention appends this step's
            selected-head k/v ([B, H, S, d]); cross-attention computes them on the first call and reuses them.
        """
        if choice is None and self.pool_heads != self.num_heads:
            raise ValueError("a pooled attention layer needs a HeadChoice; pass choice=")
        if choice is not None and task_B is None:
            if choice.num_tasks != 1:
                raise ValueError("task_B is required when the choice covers several tasks")
            task_B = torch.zeros(x_BTD.shape[0], dtype=torch.long, device=x_BTD.device)
        segments = task_B if isinstance(task_B, TaskSegments) or task_B is None else TaskSegments(task_B)
        x_BTD = self.projections.enter(x_BTD)
        if memory_BSD is not None and not (cache is not None and "k" in cache):
            memory_BSD = self.projections.enter(memory_BSD)

        if memory_BSD is None:
            q, k, v = self._project(x_BTD, choice, segments, "qkv")
            if cache is not None:
                if "k" in cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        else:
            (q,) = self._project(x_BTD, choice, segments, "q")
            if cache is not None and "k" in cache:
                k, v = cache["k"], cache["v"]
            else:
                k, v = self._project(memory_BSD, choice, segments, "kv")
                if cache is not None:
                    cache["k"], cache["v"] = k, v

        kernel = KERNELS[resolve_backend(self.backend, q.device, q.dtype)]
        dropout_p = self.dropout if self.training else 0.0
        with self.projections.dropout_rng() if dropout_p > 0 else contextlib.nullcontext():
            out_BHTd = kernel(q, k, v, key_padding_mask_BS, causal and memory_BSD is None, dropout_p)
        B, T = x_BTD.shape[:2]
        return self.out_proj(out_BHTd.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
