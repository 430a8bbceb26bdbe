"""LAHIS on a small multilingual LM trained here on CPU: does the importance score mean anything?

    python benchmarks/lahis.py                 # LibreOffice l10n text, 8 languages, ~4x8-head Llama, minutes
    python benchmarks/lahis.py --smoke         # synthetic languages, tiny model, seconds (tests/benchmarks)

Steps: build per-language text (full: the foreign side of Debian's libreoffice-l10n-XX catalogs plus the English
side, via data_pipelines.text_sources; smoke: synthetic languages with disjoint alphabets), train a byte-level BPE
tokenizer and a transformers LlamaForCausalLM from a tiny config with a plain torch loop, then per language:
LAHIS scores on dev documents, single-head masking ablation on test documents and the Spearman correlation of the two
rankings; head sets and the cross-language ablation matrix (diagonal vs off-diagonal perplexity increase) for each
quantile; soft head-mask adaptation on a translation-prompt task (prompt "<English> =", answer the target sentence).
Writes the JSON (--json) and figures (--figures) and prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from hs_scale.analysis import adaptation, lahis, plots  # noqa: E402

FULL_LANGS = ["en", "de", "fr", "es", "it", "ru", "el", "ar"]


def synthetic_corpus(langs: int, sentences: int, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """(english stand-in, sentence) pairs of `langs` fake languages: own alphabet, own word list, own word order.

    The "English" side is the sentence of language 0 with the same word ids, so translation prompts make sense.
    """
    rng = random.Random(seed)
    words = 40
    lexicons = []
    for k in range(langs):
        base = 0x0400 + 0x80 * k if k else ord("a")  # language 0: latin; others: disjoint unicode blocks
        lexicons.append(["".join(chr(base + rng.randrange(26)) for _ in range(rng.randint(2, 5)))
                         for _ in range(words)])
    out = {}
    for k in range(langs):
        pairs = []
        for _ in range(sentences):
            ids = [rng.randrange(words) for _ in range(rng.randint(3, 8))]
            order = ids if k % 2 == 0 else ids[::-1]  # odd languages put words in reverse order
            pairs.append((" ".join(lexicons[0][i] for i in ids), " ".join(lexicons[k][i] for i in order)))
        out[f"s{k}"] = pairs
    return out


def libreoffice_corpus(langs: list[str], cache_dir: str) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """(english, foreign) pairs per language from libreoffice-l10n-XX; "en" is the English side of the first."""
    from data_pipelines.text_sources import dedupe, libreoffice_pairs

    out, debs = {}, []
    for lang in langs:
        if lang == "en":
            continue
        pairs, d = libreoffice_pairs(lang, cache_dir)
        out[lang] = [(p.en, p.xx) for p in dedupe(pairs)]
        debs += d
    if "en" in langs:
        first = next(iter(out.values()))
        out = {"en": [(en, en) for en, _ in first], **out}
    return out, debs


def split_of(english: str) -> str:
    """train / dev / test by a hash of the English side (the same sentence is in one split in every language)."""
    h = int.from_bytes(hashlib.sha1(english.lower().encode()).digest()[:8], "big") / 2**64
    return "test" if h < 0.08 else "dev" if h < 0.16 else "train"


def documents(sentences: list[str], per_doc: int) -> list[str]:
    return [" ".join(sentences[i:i + per_doc]) for i in range(0, len(sentences) - per_doc + 1, per_doc)]


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (tokenizers) wrapped as a transformers tokenizer that prepends <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def train_lm(train_docs: dict[str, list[list[int]]], vocab: int, args) -> tuple[torch.nn.Module, dict]:
    """A LlamaForCausalLM trained with AdamW + cosine on language-balanced batches until --steps or --minutes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=args.max_tokens, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    rng = random.Random(args.seed)
    langs = sorted(train_docs)
    start, losses, step = time.time(), [], 0
    model.train()
    while step < args.steps and time.time() - start < 60 * args.minutes:
        progress = max(step / args.steps, (time.time() - start) / (60 * args.minutes))  # whichever ends first
        lr = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = [rng.choice(train_docs[langs[i % len(langs)]])[:args.max_tokens] for i in range(args.batch_size)]
        width = max(len(d) for d in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for b, d in enumerate(batch):
            ids[b, :len(d)] = torch.tensor(d)
        attn = (torch.arange(width)[None] < torch.tensor([len(d) for d in batch])[:, None]).long()
        labels = ids.masked_fill(attn == 0, -100)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {sum(losses[-50:]) / 50:.3f} ({time.time() - start:.0f}s)", file=sys.stderr)
    model.eval()
    return model, {"steps": step, "seconds": round(time.time() - start, 1),
                   "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
                   "parameters": sum(p.numel() for p in model.parameters())}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="synthetic languages, tiny model, seconds")
    p.add_argument("--langs", nargs="+", default=FULL_LANGS)
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/hs_scale/lahis_text"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--per-doc", type=int, default=4, help="sentences per document")
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--minutes", type=float, default=8.0, help="training time budget")
    p.add_argument("--score-docs", type=int, default=64, help="LAHIS documents per language (dev split)")
    p.add_argument("--eval-docs", type=int, default=32, help="ablation documents per language (test split)")
    p.add_argument("--quantiles", type=float, nargs="+", default=[0.96, 0.9])
    p.add_argument("--adapt-lang", default="de")
    p.add_argument("--adapt-fractions", type=float, nargs="+", default=[0.02, 0.1])
    p.add_argument("--adapt-items", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (2 spin-wait badly on a shared 2-core box)")
    p.add_argument("--json", default="benchmarks/results/lahis_cpu.json")
    p.add_argument("--figures", default="benchmarks/results/lahis_cpu")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.heads, args.kv_heads, args.hidden, args.vocab = 2, 4, 2, 32, 300
        args.steps, args.minutes, args.batch_size, args.per_doc, args.max_tokens = 20, 1.0, 8, 2, 48
        args.score_docs, args.eval_docs, args.adapt_items, args.quantiles = 8, 6, 12, [0.8]
        args.adapt_fractions = [0.125]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    debs: list[str] = []
    if args.smoke:
        corpus = synthetic_corpus(4, 300, args.seed)
        args.adapt_lang = "s1"
    else:
        corpus, debs = libreoffice_corpus(args.langs, args.cache_dir)
    if len(corpus) < 2 or args.adapt_lang not in corpus:
        raise SystemExit(f"error: need >= 2 languages including --adapt-lang {args.adapt_lang}; got {sorted(corpus)}")
    splits = {lang: {s: [xx for en, xx in pairs if split_of(en) == s] for s in ("train", "dev", "test")}
              for lang, pairs in corpus.items()}
    tok = train_tokenizer([t for v in splits.values() for t in v["train"]], args.vocab)

    def encode(texts):
        return [tok(t).input_ids[:args.max_tokens] for t in texts]

    train = {lang: encode(documents(s["train"], args.per_doc)) for lang, s in splits.items()}
    dev = {lang: encode(documents(s["dev"], args.per_doc))[:args.score_docs] for lang, s in splits.items()}
    test = {lang: encode(documents(s["test"], args.per_doc))[:args.eval_docs] for lang, s in splits.items()}
    model, training = train_lm(train, len(tok), args)

    kw = {"max_tokens": args.max_tokens, "batch_size": 16}
    per_lang, scores = {}, {}
    for lang in corpus:
        r = lahis.lahis_scores(model, dev[lang], args.max_tokens, batch_size=8)
        single = lahis.single_head_ablation(model, test[lang], **kw)
        rho = spearmanr(r["scores"].flatten().numpy(), single.flatten().numpy()).statistic
        scores[lang] = r["scores"]
        per_lang[lang] = {"spearman": float(rho), "score_docs": r["documents"], "eval_docs": len(test[lang]),
                          "test_ppl": math.exp(lahis.mean_loss(model, test[lang], **kw)),
                          "lahis": r["scores"].tolist(), "single_head_loss_increase": single.tolist()}
        print(f"{lang}: spearman {rho:.3f}", file=sys.stderr)

    sets, ablations = {}, {}
    for q in args.quantiles:
        sets[q] = lahis.head_sets(scores, q)
        ablations[q] = lahis.ablation_matrix(model, test, sets[q]["specific"], **kw)

    adapt = []
    pairs = corpus[args.adapt_lang]
    items = [(f"{en} =", f" {xx}") for en, xx in pairs]
    ex = [(tok(p).input_ids + tok(a, add_special_tokens=False).input_ids, len(tok(p).input_ids)) for p, a in items]
    train_ex = [e for e, (en, _) in zip(ex, pairs, strict=True) if split_of(en) == "train"][:args.adapt_items]
    held_ex = [e for e, (en, _) in zip(ex, pairs, strict=True) if split_of(en) == "test"]
    held_ex = held_ex[:max(20, args.adapt_items // 2)]
    before = adaptation.task_loss(model, held_ex, max_tokens=args.max_tokens)
    for fraction in args.adapt_fractions:
        out = adaptation.adapt_mask(model, scores[args.adapt_lang], train_ex, fraction, lr=1e-2, epochs=2,
                                    max_tokens=args.max_tokens, seed=args.seed)
        after = adaptation.task_loss(model, held_ex, out["mask"], max_tokens=args.max_tokens)
        adapt.append({"language": args.adapt_lang, "fraction": fraction, "heads": out["heads"],
                      "mask_values": [float(out["mask"][i, h]) for i, h in out["heads"]],
                      "train_items": len(train_ex), "heldout_items": len(held_ex),
                      "heldout_loss_before": before, "heldout_loss_after": after, "train_losses": out["losses"]})

    os.makedirs(args.figures, exist_ok=True)
    plots.plot_scores(scores, args.figures, sets[args.quantiles[0]])
    for q, ab in ablations.items():
        plots.plot_ablation(ab, os.path.join(args.figures, f"ablation_q{q}.png"))
    result = {
        "command": "python benchmarks/lahis.py" + (" " + " ".join(argv) if argv else ""),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch threads {args.threads}",
        "text": "synthetic" if args.smoke else f"libreoffice-l10n ({', '.join(sorted(set(debs)))})",
        "model": {"layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads, "hidden": args.hidden,
                  "vocab": len(tok)},
        "training": training,
        "languages": per_lang,
        "spearman_mean": sum(v["spearman"] for v in per_lang.values()) / len(per_lang),
        "head_sets": {str(q): s for q, s in sets.items()},
        "ablation": {str(q): a for q, a in ablations.items()},
        "adaptation": adapt,
        "seconds": round(time.time() - t0, 1),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=1, default=list)
    print_table(result)
    return 0


def print_table(r: dict) -> None:
    print(f"model {r['model']}  trained {r['training']['steps']} steps in {r['training']['seconds']}s, "
          f"final loss {r['training']['final_loss']:.3f}")
    print(f"{'lang':6} {'test ppl':>9} {'spearman(LAHIS, 1-head ablation)':>34}")
    for lang, v in r["languages"].items():
        print(f"{lang:6} {v['test_ppl']:9.2f} {v['spearman']:34.3f}")
    print(f"mean spearman {r['spearman_mean']:.3f}")
    for q, a in r["ablation"].items():
        n = {lang: len(h) for lang, h in r["head_sets"][q]["specific"].items()}
        print(f"quantile {q}: specific heads per language {n}, general {len(r['head_sets'][q]['general'])}; "
              f"ablation ppl increase diagonal {a['mean_diag_increase']:.4f} vs off-diagonal "
              f"{a['mean_offdiag_increase']:.4f}: ratio {a['diag_over_offdiag']:.2f}")
    for a in r["adaptation"]:
        print(f"adaptation {a['language']} top {a['fraction']:.0%} ({len(a['heads'])} heads): held-out answer loss "
              f"{a['heldout_loss_before']:.4f} -> {a['heldout_loss_after']:.4f}")
    print(f"total {r['seconds']}s")


if __name__ == "__main__":
    sys.exit(main())
