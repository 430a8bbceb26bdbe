"""`hs-scale heads`: LAHIS head importance, soft head-mask adaptation and head figures.

    hs-scale heads importance --model HF_DIR --texts de=de.txt fr=fr.jsonl ... --out DIR
        per-language LAHIS scores (scores.safetensors/.json), language-specific and -general heads (heads.json),
        the cross-language ablation matrix on held-out text (ablation.json) and heatmaps (figures/).
    hs-scale heads adapt --model HF_DIR --scores DIR --language de --train train.jsonl --eval dev.jsonl --out DIR
        train the top heads' mask entries of the frozen model (mask.safetensors, adapt.json; --save-model writes
        the model with the mask folded into o_proj as a plain Hugging Face folder).
    hs-scale heads plot --scores DIR --out DIR          heatmaps of saved scores
    hs-scale heads plot --checkpoint CKPT --out DIR     shared-heads matrix and head-load histogram of a trained
                                                        hs_scale selection model (Gong et al. 2021, Figs 3-4)

Text files: one document per line, or .jsonl with a "text" field ("prompt" + "answer" for adapt: the loss is
on the answer tokens). Exit codes: 0 done, 2 bad input (one `error: ...` line).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

_LANG = re.compile(r"^[A-Za-z0-9_-]+$")


class UsageError(ValueError):
    """Bad input; reported as one line, exit 2."""


def read_records(path: str) -> list[dict]:
    """Records of a text file: .jsonl lines as dicts, other files one {"text": line} per non-empty line."""
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    records = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UsageError(f"{path}:{n}: not JSON ({err.msg}); .jsonl files hold one object per line") \
                        from None
                if not isinstance(rec, dict) or not ("text" in rec or "answer" in rec):
                    raise UsageError(f"{path}:{n}: needs a \"text\" field (or \"prompt\" and \"answer\")")
                records.append(rec)
            else:
                records.append({"text": line.rstrip("\n")})
    if not records:
        raise UsageError(f"{path}: no documents (one per line, or .jsonl with a \"text\" field)")
    return records


def _lang_files(pairs: list[str], flag: str) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        lang, sep, path = pair.partition("=")
        if not sep or not _LANG.match(lang) or not path:
            raise UsageError(f"{flag} {pair!r}: expected LANG=FILE with LANG made of letters, digits, _ or -")
        if lang in out:
            raise UsageError(f"{flag}: language {lang!r} given twice")
        out[lang] = path
    return out


def _load(model_dir: str, tokenizer_dir: str | None, dtype: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(model_dir):
        raise UsageError(f"--model {model_dir}: not a folder (a Hugging Face save_pretrained directory)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load a tokenizer from {tokenizer_dir or model_dir} ({err}); pass --tokenizer DIR")\
            from None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    return model, tokenizer


def _pad_id(tokenizer) -> int:
    for cand in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face causal LM folder (Llama/Mistral/Qwen2/Gemma3/Cohere)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-tokens", type=int, default=2048, help="truncate each document (default 2048)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")


def importance(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hs-scale heads importance")
    _common(p)
    p.add_argument("--texts", nargs="+", required=True, metavar="LANG=FILE", help="scoring text per language")
    p.add_argument("--eval-texts", nargs="*", metavar="LANG=FILE",
                   help="held-out text for the ablation matrix (default: the last --heldout of each --texts file)")
    p.add_argument("--heldout", type=float, default=0.1, help="fraction held out when --eval-texts is absent")
    p.add_argument("--max-docs", type=int, default=1000, help="documents scored per language (default 1000)")
    p.add_argument("--batch-size", type=int, default=1, help="documents per backward (each keeps its own mask)")
    p.add_argument("--quantile", type=float, default=0.96, help="language-specific threshold (default 0.96)")
    p.add_argument("--min-languages", type=int, help="general = in the top set of >= this many (default min(4, n))")
    p.add_argument("--no-ablation", action="store_true", help="skip the cross-language ablation matrix")
    args = p.parse_args(argv)

    from hs_scale.analysis import lahis, plots, report

    texts = _lang_files(args.texts, "--texts")
    evals = _lang_files(args.eval_texts, "--eval-texts")
    if not 0.0 <= args.heldout < 1.0:
        raise UsageError(f"--heldout {args.heldout}: must be in [0, 1)")
    model, tok = _load(args.model, args.tokenizer, args.dtype, args.device)
    pad = _pad_id(tok)

    def ids(records):
        return [tok(r["text"]).input_ids for r in records if r.get("text")]

    score_docs, eval_docs = {}, {}
    for lang, path in texts.items():
        docs = ids(read_records(path))
        n_eval = 0 if lang in evals or args.no_ablation else max(1, int(len(docs) * args.heldout))
        score_docs[lang] = docs[:len(docs) - n_eval][:args.max_docs]
        eval_docs[lang] = ids(read_records(evals[lang])) if lang in evals else docs[len(docs) - n_eval:]
    results = {}
    for lang, docs in score_docs.items():
        t0 = time.time()
        results[lang] = lahis.lahis_scores(model, docs, args.max_tokens, args.batch_size, pad)
        print(f"{lang}: {results[lang]['documents']} documents scored in {time.time() - t0:.1f}s", file=sys.stderr)
    scores = {lang: r["scores"] for lang, r in results.items()}
    sets = lahis.head_sets(scores, args.quantile, args.min_languages)
    report.write_scores(args.out, results, {"model": os.path.abspath(args.model), "max_tokens": args.max_tokens})
    report.write_json(os.path.join(args.out, "heads.json"), sets)
    plots.plot_scores(scores, os.path.join(args.out, "figures"), sets)
    if not args.no_ablation:
        ab = lahis.ablation_matrix(model, eval_docs, sets["specific"], args.max_tokens, max(args.batch_size, 4), pad)
        report.write_json(os.path.join(args.out, "ablation.json"), ab)
        plots.plot_ablation(ab, os.path.join(args.out, "figures", "ablation.png"))
        print(f"ablation: diagonal/off-diagonal ppl increase = {ab['diag_over_offdiag']:.3f}", file=sys.stderr)
    print(json.dumps({"general": sets["general"], "specific": sets["specific"]}, default=list))
    return 0


def adapt(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hs-scale heads adapt")
    _common(p)
    p.add_argument("--scores", required=True, help="scores.safetensors or the `heads importance` output folder")
    p.add_argument("--language", required=True, help="whose score matrix picks the heads")
    p.add_argument("--train", required=True, help="task set (.jsonl prompt/answer, or text)")
    p.add_argument("--eval", required=True, help="held-out set, same format")
    p.add_argument("--fraction", type=float, default=0.02, help="share of heads trained (default 0.02)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--weight-decay", type=float, default=0.01, help="applies to the trained entries only")
    p.add_argument("--save-model", action="store_true", help="also write the mask-folded model to OUT/model")
    args = p.parse_args(argv)

    from hs_scale.analysis import adaptation, report

    scores = report.read_scores(args.scores)
    if args.language not in scores:
        raise UsageError(f"--language {args.language}: not in {args.scores} (has {sorted(scores)})")
    model, tok = _load(args.model, args.tokenizer, args.dtype, args.device)

    def examples(path):
        out = []
        for r in read_records(path):
            if "answer" in r:
                prompt = tok(r.get("prompt", "")).input_ids
                out.append((prompt + tok(r["answer"], add_special_tokens=False).input_ids, len(prompt)))
            else:
                out.append((tok(r["text"]).input_ids, 0))
        return out

    train, held = examples(args.train), examples(args.eval)
    before = adaptation.task_loss(model, held, None, args.max_tokens)
    out = adaptation.adapt_mask(model, scores[args.language], train, args.fraction, args.lr, args.epochs,
                                args.weight_decay, args.max_tokens)
    after = adaptation.task_loss(model, held, out["mask"], args.max_tokens)
    os.makedirs(args.out, exist_ok=True)
    adaptation.save_mask(os.path.join(args.out, "mask.safetensors"), out["mask"], out["heads"])
    summary = {"language": args.language, "heads": out["heads"], "train_losses": out["losses"],
               "eval_loss_before": before, "eval_loss_after": after,
               "mask_values": [float(out["mask"][i, h]) for i, h in out["heads"]]}
    report.write_json(os.path.join(args.out, "adapt.json"), summary)
    if args.save_model:
        adaptation.fold_mask(model, out["mask"]).save_pretrained(os.path.join(args.out, "model"))
        tok.save_pretrained(os.path.join(args.out, "model"))
    print(json.dumps({"eval_loss_before": before, "eval_loss_after": after}))
    return 0


def plot(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hs-scale heads plot")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scores", help="LAHIS scores (scores.safetensors or its folder)")
    src.add_argument("--checkpoint", help="an hs_scale checkpoint directory of a head-selection model")
    p.add_argument("--task-names", help="comma-separated task names in id order (default: from the checkpoint)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from hs_scale.analysis import plots, report

    if args.scores:
        written = plots.plot_scores(report.read_scores(args.scores), args.out)
    else:
        written = _plot_checkpoint(args.checkpoint, args.task_names, args.out)
    print("\n".join(written))
    return 0


def _plot_checkpoint(path: str, task_names: str | None, out: str) -> list[str]:
    from hs_scale.analysis import plots
    from hs_scale.checkpoint import CheckpointError, load_full_model_state
    from hs_scale.export.cli import task_names_of
    from hs_scale.export.materialize import ExportError, selection_tables
    from hs_scale.models.config import ModelConfig
    from hs_scale.selection.analysis import concat_layers
    from hs_scale.selection.config import SelectionConfig

    try:
        config, state = load_full_model_state(path)
    except CheckpointError as err:
        raise UsageError(f"--checkpoint {path}: {err}") from None
    selection = SelectionConfig(**config.get("selection", {}))
    partitions = int((config.get("parallel") or {}).get("tensor_parallel", 1))
    try:
        names = task_names_of(config, task_names)
        tables = selection_tables(ModelConfig(**config["model"]), selection, state, len(names), partitions)
    except ExportError as err:
        raise UsageError(f"--checkpoint {path}: {err}") from None
    if not tables:
        raise UsageError(f"{path}: the run selects no heads (selection is off); nothing to plot")
    written = []
    for attn_type, table in tables.items():
        written += plots.plot_selection(table, selection.pool_heads, names, os.path.join(out, attn_type))
    if len(tables) > 1:
        written += plots.plot_selection(concat_layers(list(tables.values())), selection.pool_heads, names,
                                        os.path.join(out, "all"))
    return written


COMMANDS = {"importance": importance, "adapt": adapt, "plot": plot}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (UsageError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
