"""The evaluation for people: a table on the terminal, report.md and its figures."""


from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from speckv.atomic import atomic_write
from speckv.evaluate.replay import COMPARISONS, LEARNED, ORACLE
from speckv.runtime.proposal import GAMMA_MAX, OPTION_NAMES


# ------------------------------------------------------------------------------- output
def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _fmt_ci(ci: Sequence[float | None], digits: int = 2) -> str:
    return f"[{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "–"
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}"


def _fmt_test(entry: dict[str, Any] | None, ratio: bool = True) -> str:
    """``learned ÷ baseline`` and the test of one comparison entry, on one line."""
    if not entry:
        return "–"
    text = f"p = {_fmt_p(entry['p'])} ({entry['method']}; resolution {entry['resolution']:.1e})"
    if ratio and entry.get("ratio") is not None:
        text = f"{entry['ratio']:.3f}x {_fmt_ci(entry['ratio_ci95'], 3)}, " + text
    return text


#: how the table and the report label the rows that are not plain policies.
ORACLE_LABEL: Final = "oracle (per step; not a bound)"
BOUND_LABEL: Final = "upper bound (exact DP)"
BOUND_DRAFTING_LABEL: Final = "best if every step drafts (exact DP)"


def _rows_of(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every policy's entry, then the exact bound's; the oracle and the bound labelled as
    what they are (only the DP is an upper bound)."""
    rows = [(ORACLE_LABEL if n == ORACLE else n, e) for n, e in result["policies"].items()]
    if result.get("upper_bound_drafting"):
        rows.append((BOUND_DRAFTING_LABEL, result["upper_bound_drafting"]))
    if result.get("upper_bound"):
        rows.append((BOUND_LABEL, result["upper_bound"]))
    return rows


def _table_rows(result: dict[str, Any]) -> list[list[str]]:
    comps = list(result["target_alone"].get("per_compression", {}))
    rows = []
    for name, e in _rows_of(result):
        row = [name, f"{_fmt(e['tokens_per_s'])} {_fmt_ci(e['ci95'])}",
               f"{_fmt(e['speedup'])}x", _fmt(e["tokens_per_step"]),
               _fmt(e["acceptance_rate"]),
               _fmt(None if e.get("regret_to_oracle") is None else 100 * e["regret_to_oracle"], 1)]
        row += [_fmt(e["per_compression"][c]["tokens_per_s"]) for c in comps]
        rows.append(row)
    return rows


def _headers(result: dict[str, Any]) -> list[str]:
    comps = list(result["target_alone"].get("per_compression", {}))
    return ["policy", "tokens/s [95% CI]", "speedup", "tokens/step", "accept", "regret %",
            *(f"{c} tok/s" for c in comps)]


def print_table(result: dict[str, Any], file: Any) -> None:
    """A readable summary (rich) of the overall and per-compression figures."""
    from rich.console import Console
    from rich.table import Table

    tty = hasattr(file, "isatty") and file.isatty()
    console = Console(file=file, width=None if tty else 160)
    table = Table(title=f"speckv evaluate: {result['split']['name']} split, "
                        f"{result['n_prompts']} prompts, {result['n_sequences']} sequences "
                        f"(objective {result['objective']})")
    for i, h in enumerate(_headers(result)):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for row in _table_rows(result):
        table.add_row(*row)
    console.print(table)
    alone = result["target_alone"]
    console.print(f"target alone: {_fmt(alone['tokens_per_s'])} tokens/s "
                  f"{_fmt_ci(alone['ci95'])}; fitted on train per compression: best fixed γ "
                  f"{result['best_fixed_gamma']}, best static {result['best_static_choice']} "
                  "(0 = plain decoding)")
    if result["learned"]["status"] == "evaluated":
        console.print(f"learned ÷ baseline [95% bootstrap CI] and {result['p_value_test']} "
                      f"(metric {result['p_value_metric']}):")
        for key, base in COMPARISONS:
            console.print(f"  vs {base}: {_fmt_test(result['p_values']['overall'].get(key))}")
    else:
        console.print(f"learned policy skipped: {result['learned'].get('reason', '')}")


def _fmt_cell(entry: dict[str, Any] | None) -> str:
    """A report cell: ratio [CI], p (resolution)."""
    if not entry:
        return "–"
    ratio = "–" if entry.get("ratio") is None else f"{entry['ratio']:.3f}x"
    return (f"{ratio} {_fmt_ci(entry.get('ratio_ci95', [None, None]), 3)}, "
            f"p = {_fmt_p(entry['p'])} (res. {entry['resolution']:.1e})")


def _md_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(result: dict[str, Any], out: Path) -> list[Path]:
    """``report.md`` and PNG plots in ``out``; returns the files written."""
    out = Path(out)
    plots = write_plots(result, out)
    comps = list(result["target_alone"].get("per_compression", {}))
    tasks = list(result["target_alone"].get("per_task", {}))
    md = [f"# speckv evaluation ({result['split']['name']} split)", ""]
    md += [f"- records: {', '.join(result.get('records', [])) or '(in memory)'}",
           f"- prompts: {result['n_prompts']}, sequences: {result['n_sequences']}, rows: "
           f"{result['n_rows']} (split by prompt: {result['split']['prompts']})",
           f"- objective: `{result['objective']}`; fitted on the train prompts per "
           f"compression: best fixed γ {result['best_fixed_gamma']}, best static (plain "
           f"decoding or a fixed γ) {result['best_static_choice']} (0 = plain)",
           f"- 95% CIs: percentile bootstrap over prompts (stratified by task), "
           f"{result['resamples']} resamples, seed {result['seed']}; paired across policies",
           f"- learned policy: {result['learned']['status']}"
           + (f" ({result['learned'].get('source')})" if result["learned"].get("source") else "")
           + (f": {result['learned']['reason']}" if result["learned"].get("reason") else ""),
           ""]
    md += ["## Overall", "", _md_table(_headers(result), _table_rows(result)), "",
           f"Target alone: {_fmt(result['target_alone']['tokens_per_s'])} tokens/s "
           f"{_fmt_ci(result['target_alone']['ci95'])}. The `{BOUND_LABEL}` row is the only "
           "upper bound: the best any policy could do on these traces, plain steps included "
           "(a dynamic programme over each answer). The same programme restricted to steps "
           f"that draft gives `{BOUND_DRAFTING_LABEL}`, the best of the policies that always "
           "speculate; the gap between the two is what a per-step \"speculate at all?\" "
           "decision could add at most (replay does not price the draft's longer catch-up "
           "after plain steps, so that gap is optimistic). The per-step oracle knows each "
           "step's accepted length but chooses greedily, step by step: it is not an upper bound "
           "(another policy can beat it on a sequence). Regret is 1 − tokens/s ÷ the per-step "
           "oracle's, so it can be negative.", ""]
    if result["learned"]["status"] == "evaluated":
        md += ["## Is the learned policy better?", "",
               f"Each cell: learned ÷ baseline on `{result['p_value_metric']}` [95% bootstrap "
               f"CI] and the p-value of a {result['p_value_test']}. A group of n prompts "
               "cannot give a p-value below its resolution (1/2^n when exact). The p-values "
               "are per comparison, not corrected for the number of groups.", ""]
        rows = []
        for kind in ("overall", "per_compression", "per_task", "per_compression_task"):
            groups = ({"overall": result["p_values"]["overall"]} if kind == "overall"
                      else result["p_values"][kind])
            for k, v in groups.items():
                first = next((e for e in v.values() if e), None)
                n = str(first["n_prompts"]) if first else "–"
                rows.append([k, n, *(_fmt_cell(v.get(key)) for key, _ in COMPARISONS)])
        md += [_md_table(["group", "prompts", *(f"vs {b}" for _, b in COMPARISONS)], rows), ""]
    for kind, keys, title in (("per_compression", comps, "compression"),
                              ("per_task", tasks, "task")):
        md += [f"## Tokens/s per {title} [95% CI]", ""]
        rows = [[name] + [f"{_fmt(e[kind][k]['tokens_per_s'])} {_fmt_ci(e[kind][k]['ci95'])}"
                          for k in keys] for name, e in _rows_of(result)]
        alone = result["target_alone"][kind]
        rows.append(["target alone"] + [f"{_fmt(alone[k]['tokens_per_s'])} "
                                        f"{_fmt_ci(alone[k]['ci95'])}" for k in keys])
        md += [_md_table(["policy", *keys], rows), ""]
        md += [f"Speedup over the target alone per {title}:", ""]
        rows = [[name] + [f"{_fmt(e[kind][k]['speedup'])}x" for k in keys]
                for name, e in _rows_of(result)]
        md += [_md_table(["policy", *keys], rows), ""]
    if LEARNED in result["gamma_chosen"]:
        md += ["## What the learned policy chose (steps per option)", ""]
        rows = [[c] + [str(n) for n in hist]
                for c, hist in result["gamma_chosen"][LEARNED].items()]
        md += [_md_table(["compression", *OPTION_NAMES[1:]], rows), ""]
    if result["oracle_beaten_on_sequences"]:
        md += ["The per-step oracle is greedy, not an exact bound: on a few sequences another "
               f"policy beats it ({result['oracle_beaten_on_sequences']}, policy: sequences). "
               f"The `{BOUND_LABEL}` row is the best any policy could do.", ""]
    md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    report = atomic_write(out / "report.md", lambda tmp: tmp.write_text("\n".join(md)))
    return [report, *plots]


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    """Policy comparison with CIs, the learned policy's γ histograms, regret to the oracle."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    comps = list(result["target_alone"].get("per_compression", {}))
    pol = result["policies"]
    names = list(pol)
    written = []

    fig = Figure(figsize=(4.2 * len(comps), 0.32 * len(names) + 1.6), layout="constrained")
    axes = fig.subplots(1, len(comps), squeeze=False, sharey=True)[0]
    y = np.arange(len(names))[::-1]
    for ax, comp in zip(axes, comps, strict=True):
        e = [pol[n]["per_compression"][comp] for n in names]
        mid = np.array([x["tokens_per_s"] or np.nan for x in e])
        lo = np.array([x["ci95"][0] if x["ci95"][0] is not None else np.nan for x in e])
        hi = np.array([x["ci95"][1] if x["ci95"][1] is not None else np.nan for x in e])
        colors = ["tab:red" if n == LEARNED else "tab:gray" if n == ORACLE else "tab:blue"
                  for n in names]
        ax.barh(y, mid, color=colors, alpha=0.75)
        ax.errorbar(mid, y, xerr=[mid - lo, hi - mid], fmt="none", ecolor="black", capsize=2)
        ax.axvline(result["target_alone"]["per_compression"][comp]["tokens_per_s"],
                   color="black", ls="--", lw=1, label="target alone")
        ax.set_title(comp)
        ax.set_xlabel("tokens/s (95% CI)")
        ax.set_yticks(y, names)
    axes[0].legend(loc="lower right", fontsize="small")
    written.append(_save(fig, out / "policy_comparison.png"))

    hist = result["gamma_chosen"].get(LEARNED)
    if hist:
        fig = Figure(figsize=(4.2 * len(comps), 3.2), layout="constrained")
        axes = fig.subplots(1, len(comps), squeeze=False, sharey=True)[0]
        for ax, comp in zip(axes, comps, strict=True):
            counts = np.asarray(hist[comp], float)
            codes = np.arange(1, len(counts) + 1)
            ax.bar(codes, counts / max(counts.sum(), 1), color="tab:red", alpha=0.75)
            best = result["best_fixed_gamma"].get(comp)
            if best:
                ax.axvline(best, color="black", ls="--", lw=1, label=f"best fixed γ={best}")
                ax.legend(fontsize="small")
            ax.set_title(f"{comp}: options chosen by learned")
            ax.set_xlabel("γ (chains), then trees")
            ax.set_xticks(codes, [OPTION_NAMES[c].removeprefix("fixed:") for c in codes],
                          rotation=60, fontsize="small")
        axes[0].set_ylabel("share of steps")
        written.append(_save(fig, out / "learned_gamma.png"))

    sources = [n for n in names if n.startswith("lookup:auto+")]
    if sources:
        written.append(_save(_source_figure(result, sources, comps), out / "source_choice.png"))

    others = [n for n in names if n != ORACLE and pol[n].get("regret_to_oracle") is not None]
    if others:
        fig = Figure(figsize=(max(6.0, 0.55 * len(others) * len(comps) / 2 + 2), 3.6),
                     layout="constrained")
        ax = fig.subplots()
        width = 0.8 / len(comps)
        x = np.arange(len(others))
        for j, comp in enumerate(comps):
            entries = [pol[n]["per_compression"][comp] for n in others]
            vals = np.array([100 * (e["regret_to_oracle"] or 0.0) for e in entries])
            ci = np.array([[np.nan if v is None else 100 * v
                            for v in e["ci95_by_metric"]["regret_to_oracle"]] for e in entries])
            err = np.abs(np.nan_to_num(np.stack([vals - ci[:, 0], ci[:, 1] - vals])))
            ax.bar(x + (j - (len(comps) - 1) / 2) * width, vals, width, label=comp,
                   yerr=err, capsize=1.5, error_kw={"elinewidth": 0.7})
        ax.set_xticks(x, others, rotation=45, ha="right")
        ax.set_ylabel("regret to oracle (% tokens/s, 95% CI)")
        ax.legend(fontsize="small")
        written.append(_save(fig, out / "regret_to_oracle.png"))
    return written


#: a step's source, by option code: plain, the draft's chain, its tree, the lookup alone
_SOURCES: Final = (("plain step", "tab:gray"), ("draft: chain", "tab:blue"),
                   ("draft: tree", "tab:purple"), ("context lookup", "tab:orange"))


def _source_figure(result: dict[str, Any], names: Sequence[str], comps: Sequence[str]) -> Any:
    """Where a policy that chooses the source took each: the share of its steps that were
    plain, a draft chain, a draft tree or the lookup's continuation, per compression."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.5, 4.2 * len(names)), 3.2), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False, sharey=True)[0]
    for ax, name in zip(axes, names, strict=True):
        shares = []
        for comp in comps:
            counts = np.asarray(result["gamma_chosen"][name][comp], float)  # codes 1..
            steps = result["policies"][name]["per_compression"][comp]["steps"]
            chain, tree, lookup = (counts[:GAMMA_MAX].sum(), counts[GAMMA_MAX:-1].sum(),
                                   counts[-1])
            shares.append(np.array([steps - counts.sum(), chain, tree, lookup]) / steps)
        left = np.zeros(len(comps))
        for k, (label, color) in enumerate(_SOURCES):
            part = np.array([s[k] for s in shares])
            ax.barh(comps, part, left=left, color=color, label=label)
            left += part
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of steps")
        ax.set_title(f"{name}: source per step")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center",
               ncols=len(_SOURCES), fontsize="small")
    return fig


def _save(fig: Any, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


