"""The markdown report and its figures, written from the results JSON alone (so it can be redrawn at any time).

    write_report(results, md_path)   -> md_path; figures in <md_path without .md>/<experiment>_*.png
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.paper import plots
from benchmarks.paper.summary import markdown_table

TITLES = {
    "asr": "Multilingual ASR",
    "hsweep": "H' sweep for group and subset on multilingual ASR",
    "domains": "Multi-domain ASR",
    "st": "Multilingual ST",
    "mt": "Multilingual MT (one-to-many and many-to-one)",
}
ORDER = ("asr", "hsweep", "domains", "st", "mt")


def _corpus_line(exp: dict) -> str:
    sizes = exp["train_sizes"]
    low = set(exp.get("low_resource", []))
    listed = ", ".join(f"{k} {v}{' (low-resource)' if k in low else ''}" for k, v in sizes.items())
    return f"Corpus `{exp['corpus']}` ({exp['corpus_dir']}): train utterances {listed}."


def _experiment_section(name: str, exp: dict, fig_dir: Path, md_dir: Path) -> list[str]:
    s = exp["summary"]
    arrow = "higher is better" if s["direction"] == "higher" else "lower is better"
    run = f"Command: `{exp['command']}` ({exp['wall_s'] / 60:.1f} min wall, {exp.get('date', '?')})."
    lines = [f"## {TITLES[name]} (`{name}`)", "", run, "", _corpus_line(exp), "",
             f"Run config `benchmarks/paper/configs/{exp['config']}` with overrides `{exp['overrides']}`; "
             f"evaluation on `{exp['eval']['split']}`, beam {exp['eval']['beam']}. "
             f"{s['metric'].upper()} ({arrow}), mean ± std over seeds; `avg` is the unweighted mean over tasks.", "",
             markdown_table(s), ""]
    if s["verdict"]:
        lines += [f"**Verdict:** {s['verdict']['text']}.", ""]
    cells = exp["cells"]
    figures = [plots.metric_bars(s, f"{TITLES[name]}: {s['metric'].upper()} per task", fig_dir / f"{name}_bars.png")]
    by_row: dict[str, list[dict]] = {}
    for key, row in s["rows"].items():
        by_row[key] = [c for c in cells if c["variant"] == row["variant"] and c["pool_heads"] == row["pool_heads"]]
    for key in ("group", "subset"):
        if by_row.get(key):
            figures.append(plots.shared_heads_plot(by_row[key], f"{name}, {key}: heads shared by task pairs "
                                                   "(mean over seeds; colour = fraction)",
                                                   fig_dir / f"{name}_{key}_shared_heads.png"))
    selecting = {k: cs for k, cs in by_row.items() if cs and cs[0]["selection"]}
    if selecting:
        figures.append(plots.head_load_plot(selecting, f"{name}: head load (tasks per pool head)",
                                            fig_dir / f"{name}_head_load.png"))
    lines += [f"![{p.stem}]({p.relative_to(md_dir)})" for p in figures if p is not None]
    return lines + [""]


def write_report(results: dict, md_path: Path) -> Path:
    md_path = Path(md_path)
    fig_dir = md_path.with_suffix("")
    m = results["machine"]
    lines = [f"# Head selection vs shared attention: the paper's experiments in direction (`{results['preset']}`)", "",
             f"Date {results['date']}; machine: {m['cpus']} CPU cores ({m['platform']}), "
             f"{m.get('gpu') or 'no GPU'}, torch {m['torch']}; commit {results.get('commit', '?')}.", "",
             "Every variant runs with the same number H of **active** heads per attention layer: `shared` (no "
             "selection, the decoder starts from the target-language tag), `group` and `subset` (H of a pool of "
             "H' heads per task), `allheads` (no selection, all H' heads active: the capacity control, head dim "
             "d/H' instead of d/H). One cell = one training run + one evaluation per seed.", ""]
    for name in ORDER:
        if name in results["experiments"]:
            lines += _experiment_section(name, results["experiments"][name], fig_dir, md_path.parent)
    if results.get("failed"):
        lines += ["## Failed cells", "", *[f"- {e.splitlines()[0]}" for e in results["failed"]], ""]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines) + "\n")
    return md_path
