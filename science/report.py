"""The zero-shot experiment's report: the Markdown tables and one figure per task, both made
from the result dict alone (so they can be redrawn from a saved JSON)."""
from __future__ import annotations

import itertools
import textwrap

from alignscan.outputs import save_figure

from .design import CONVS, DIRECTION_CONTRAST, MODES, SIGNIFICANCE

__all__ = ["markdown", "plot"]


def _of_seed(items, meta):
    """The rows (or paired entries) of the seed the tables show (entries without a seed: it)."""
    return [r for r in items if r.get("seed", meta.get("seed")) == meta.get("seed")]


def _seeds_markdown(result, task):
    """Per training seed: dense accuracy, the training bar, the controls; then the across-seed
    span contrasts."""
    summaries = result.get("per_seed", {}).get(task, [])
    if len(summaries) < 2 and not any(r["task"] == task for r in result.get("across_seeds", [])):
        return []
    lines = ["Training seeds (included: reached the bar fixed before the run; the tables above show seed "
             f"{result['tasks'][task].get('seed')}):", "",
             "| seed | dense (%) | epochs | bar | included | pairs seen in training | dense, positions shuffled (%) |",
             "|---|---|---|---|---|---|---|"]
    for m in summaries:
        t = m.get("training") or {}
        seen = m.get("test_pairs_seen_in_training")
        shuffled = m.get("dense_shuffled_positions")
        bar = f"{100 * t['bar']:.4g} %" if t.get("bar") else "-"
        seen = "-" if seen is None else f"{100 * seen:.1f} %"
        shuffled = "-" if shuffled is None else f"{100 * shuffled['shuffled_mean']:.1f}"
        lines.append(f"| {m['seed']} | {100 * m['dense']:.1f} | {t.get('epochs', '-')} | {bar} | "
                     f"{'yes' if m['included'] else 'no'} | {seen} | {shuffled} |")
    contrasts = [r for r in result.get("across_seeds", []) if r["task"] == task]
    if contrasts:
        n = len(contrasts[0]["seeds"])
        others = sum(not r["primary"] for r in contrasts)
        floor = contrasts[0].get("sign_test_floor", min(1.0, 2.0 / 2 ** n))
        lines += ["", f"Across the {n} included seeds (accuracy points; mean, 95 % t-interval, one-sample t-test, "
                  f"exact sign test, which with {n} seeds cannot go below p = {floor:.3g}; the primary row, fixed "
                  f"before the run, is tested alone, the {others} others are Holm-corrected together; a cell is "
                  f"the number of background tokens removed in the span cells, else selection and keep ratio):",
                  "", "| cell | conv | contrast | per seed | mean | 95 % t | p t | p sign | p Holm (t) | p Holm (sign) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in contrasts:
            per = ", ".join(f"{100 * d:+.1f}" for d in r["differences"])
            cell = f"{r['removed']} removed" if r.get("selection", "span") == "span" else \
                f"{r['selection']}, keep {r['keep_ratio']}"
            p_t = r.get("p_t", float("nan"))        # NaN: no t-test (equal differences on every seed)
            holm_t = "primary" if r["primary"] else f"{r.get('p_holm_t', float('nan')):.3g}"
            holm_sign = "primary" if r["primary"] else f"{r['p_holm']:.3g}"
            lines.append(f"| {cell} | {r['conv']} | {r['contrast']} | {per} | {100 * r['mean']:+.1f} | "
                         f"[{100 * r['t95'][0]:+.1f}, {100 * r['t95'][1]:+.1f}] | {p_t:.3g} | {r['p_sign']:.3g} | "
                         f"{holm_t} | {holm_sign} |")
    return lines + [""] + _directions_markdown(result, task)


def _directions_markdown(result, task):
    """The span cells' error directions across seeds (``zero_shot.error_directions``)."""
    rows = [r for r in result.get("error_directions", []) if r["task"] == task]
    if not rows:
        return []
    lines = [f"Error directions across seeds (exploratory: chosen after seeing pooled results; {len(rows)} rows Holm-corrected "
             "together): per seed, the share (%) of errors that read a far pair as near, and the difference of "
             "those shares", "",
             "| removed | conv | side | " + " | ".join(f"{m} per seed" for m in DIRECTION_CONTRAST)
             + " | difference | mean | 95 % t | p t | p Holm (t) |", "|---|---|---|---|---|---|---|---|---|---|"]

    def shares(values):
        return ", ".join("-" if v is None else f"{100 * v:.0f}" for v in values)
    for r in rows:
        per = ", ".join(f"{100 * d:+.0f}" for d in r["differences"])
        a, b = (shares(r["share"][m]) if "share" in r else "" for m in DIRECTION_CONTRAST)
        lines.append(f"| {r['removed']} | {r['conv']} | {r['side']} | {a} | {b} | {per} | "
                     f"{100 * r['mean']:+.1f} | [{100 * r['t95'][0]:+.1f}, {100 * r['t95'][1]:+.1f}] | "
                     f"{r['p_t']:.3g} | {r['p_holm_t']:.3g} |")
    return lines + [""]


def _fmt(r):
    return f"{100 * r['top1']:.1f}"


def _span_markdown(span_rows, meta):
    """The distance task's span-controlled cells: top-1 and the far-read-as-near share of the
    errors, inside vs outside the span joining the marks and the class token."""
    if not span_rows:
        return []
    lines = [f"Span-controlled cells (the same number of background tokens removed per image, all inside the span "
             f"joining the marks and the class token, or all outside it; test pairs seen in training: "
             f"{100 * meta['model'].get('test_pairs_seen_in_training', float('nan')):.1f} %): top-1 (%) inside / "
             f"outside, and in brackets the share of errors that read a far pair as near", "",
             "| conv | removed | images | " + " | ".join(MODES) + " |", "|---|---|---|" + "---|" * len(MODES)]
    get = {(r["selection"], r["conv"], r["removed"], r["mode"]): r for r in span_rows}

    def cell(r):
        share = "-" if r.get("far_to_near") is None else f"{100 * r['far_to_near']:.0f}"
        return f"{_fmt(r)} ({share})"
    for conv in CONVS:
        for removed in sorted({r["removed"] for r in span_rows}):
            first = get.get(("span_inside", conv, removed, MODES[0]))
            if first is None:
                continue
            cells = [f"{cell(get[('span_inside', conv, removed, m)])} / {cell(get[('span_outside', conv, removed, m)])}"
                     if ("span_inside", conv, removed, m) in get else "-" for m in MODES]
            lines.append(f"| {conv} | {removed} | {first['images']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _num(value, spec="+.2f"):
    return "-" if value is None or value != value else format(value, spec)


def _confirmatory_markdown(result):
    """The pre-registered test's outcome (``confirmatory.analyse``)."""
    entry = result.get("confirmatory")
    if not entry:
        return []
    design = entry["design"]
    missed = ", ".join(f"{m['seed']}" for m in entry["missed_bar"]) or "none"
    lines = [f"### Confirmatory test (pre-registered: science/design.py, CONFIRMATORY): {design['task']}, "
             f"{design['conv']} conv, {design['removed']} removed, {design['a']} - {design['b']}", "",
             f"Seeds that reached the bar: {len(entry['seeds'])} of {len(entry['seeds_run'])} "
             f"({', '.join(map(str, entry['seeds']))}); left out, missed the bar: {missed}.", "",
             "| hypothesis | side | pairs | direction | seeds | mean (points) | 95 % t | p (one-sided) | p Holm | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for h in entry["hypotheses"]:
        lines.append(f"| {h['name']} | {h['side']} | {h['pairs']} | {h['direction']} | {h['seeds']} | "
                     f"{_num(h['mean'])} | [{_num(h['t95'][0])}, {_num(h['t95'][1])}] | {_num(h['p'], '.3g')} | "
                     f"{_num(h['p_holm'], '.3g')} | {h['verdict']} |")
    lines += ["", f"Equivalence outside the span (TOST, margin ±{design['equivalence']['margin_points']:g} points, "
                  f"alpha {design['equivalence']['alpha']:g}):", "",
              "| pairs | seeds | mean | 90 % t | p lower | p upper | verdict |", "|---|---|---|---|---|---|---|"]
    for e in entry["equivalence"]:
        lines.append(f"| {e['pairs']} | {e['seeds']} | {_num(e['mean'])} | [{_num(e['interval'][0])}, "
                     f"{_num(e['interval'][1])}] | {_num(e['p_lower'], '.3g')} | {_num(e['p_upper'], '.3g')} | "
                     f"{e['verdict']} |")
    power = entry["power"]
    lines += ["", f"Power with {power['seeds']} seeds at the planning numbers (one-sided, alpha "
                  f"{power['alpha_one_sided']:g}): H1 {_num(power['H1'], '.2f')}, H2 {_num(power['H2'], '.3f')} "
                  f"(planned with {power['planned']['seeds']}: {power['planned']['H1']}, {power['planned']['H2']}).",
              ""]
    for side, by_pairs in entry["per_seed"].items():
        for pairs, values in by_pairs.items():
            lines.append(f"- {side}, {pairs} pairs, per seed: " + ", ".join(_num(d, "+.1f")
                                                                          for d in values["differences"]))
    return lines + [""]


def _delta_markdown(result):
    """The gap decay behind the errors (``gap_decay.summarise``)."""
    delta = result.get("delta")
    if not delta or not delta.get("dense_delta"):
        return []
    lines = [f"### Gap decay (exploratory): {delta['cell']['side']} the span, {delta['cell']['removed']} removed, "
             f"seeds {', '.join(map(str, delta['seeds']))}", "",
             f"{delta['sign']}. Dense model, log(Δ of the kept token / mean Δ of the gap's pruned tokens), median "
             "[5 %, 95 %] over images, and the share of channels where the kept token's Δ is larger:", "",
             "| layer | before the gap | share | after the gap | share |", "|---|---|---|---|---|"]
    for row in delta["dense_delta"]:
        cells = []
        for rule in ("prev", "next"):
            q = row[f"log_ratio_{rule}"].get("quantiles", {})
            cells += [f"{_num(q.get('50'), '+.3g')} [{_num(q.get('5'), '+.3g')}, {_num(q.get('95'), '+.3g')}]",
                      _num(row[f"share_{rule}_above"], ".2f")]
        lines.append(f"| {row['layer']} | " + " | ".join(cells) + " |")
    excess = delta["excess"]["excess_log"]
    lines += ["", "Excess log-decay over the span's gaps per image (mean; share < 0: the aligned state decays more):",
              "", "| mode (rule) | " + " | ".join(f"layer {r['layer']}" for r in excess[delta['modes'][0]]) + " |",
              "|---|" + "---|" * len(excess[delta["modes"][0]])]
    for mode, layers in excess.items():
        lines.append(f"| {mode} ({layers[0]['rule']}) | " + " | ".join(
            f"{_num(r.get('mean'), '+.3g')} ({_num(r.get('share_negative'), '.2f')})" for r in layers) + " |")
    lines += ["", f"Does an image's extra forgetting single out the near pairs read as far? AUC, mean over seeds "
                  f"[95 % t], near pairs; and the fraction of the extra errors over {delta['baseline']} it explains "
                  f"({delta['explained_definition']}):", "",
              "| mode | AUC (near) | p Holm | AUC (all) | explained (pooled) | 95 % (seeds) |", "|---|---|---|---|---|---|"]
    for mode in delta["modes"]:
        near, every = (delta["prediction"]["excess_log"][mode][p] for p in ("near", "all"))
        explained = delta["explained"]["excess_log"][mode]["pooled"]
        lines.append(f"| {mode} | {_num(near['mean_auc'], '.3f')} [{_num(near['t95'][0], '.3f')}, "
                     f"{_num(near['t95'][1], '.3f')}] | {_num(near['p_holm_t'], '.3g')} | "
                     f"{_num(every['mean_auc'], '.3f')} | {_num(explained['fraction'], '.2f')} | "
                     f"[{_num(explained['ci95_seeds'][0], '.2f')}, {_num(explained['ci95_seeds'][1], '.2f')}] |")
    return lines + [""]


def markdown(result):
    lines = []
    smoke = ["**Smoke test (--quick): tiny models trained for seconds; the numbers mean nothing.**", ""] \
        if result["quick"] else []
    lines += smoke
    lines += _confirmatory_markdown(result) + _delta_markdown(result)
    rows = result["rows"]
    for task, meta in result["tasks"].items():
        task_rows = [r for r in _of_seed(rows, meta) if r["task"] == task and not r["finetuned"] and "ablation" not in r
                     and not r["selection"].startswith("span_")]
        dense = next(r for r in task_rows if r["mode"] == "dense")
        ratios = sorted({r["keep_ratio"] for r in task_rows if r["mode"] != "dense"}, reverse=True)
        lines += [f"### {task}: zero-shot top-1 (%), dense {_fmt(dense)}, {meta['test_images']} test images, "
                  f"pruned after layers {meta['schedule']}", ""]
        get = {(r["selection"], r["conv"], r["keep_ratio"], r["mode"]): r for r in task_rows}
        for selection in meta["selections"]:
            for conv in CONVS:
                lines += [f"tokens: {selection}, conv: {conv}", "",
                          "| mode | " + " | ".join(f"keep {k}" for k in ratios) + " |", "|---|" + "---|" * len(ratios)]
                for mode in MODES:
                    cells = [_fmt(get[(selection, conv, k, mode)]) if (selection, conv, k, mode) in get else "-"
                             for k in ratios]
                    lines.append(f"| {mode} | " + " | ".join(cells) + " |")
                lines.append("")
        lines += _span_markdown([r for r in _of_seed(rows, meta) if r["task"] == task
                                 and r["selection"].startswith("span_")], meta)
        lines += _seeds_markdown(result, task)
        paired = [p for p in _of_seed(result["paired"], meta) if p["task"] == task]
        lines += [f"Paired on the same images (both / only a / only b / neither, exact McNemar p; p Holm: adjusted "
                  f"over this task's {len(paired)} comparisons; * marks p Holm < {SIGNIFICANCE}):", "",
                  "| tokens | conv | keep | a vs b | both | only a | only b | neither | p | p Holm |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for p in paired:
            mark = " *" if p.get("p_holm", 1.0) < SIGNIFICANCE else ""
            lines.append(f"| {p['selection']} | {p['conv']} | {p['keep']} | {p['a']} vs {p['b']} | {p['both']} | "
                         f"{p['only_a']} | {p['only_b']} | {p['neither']} | {p['p_value']:.3g} | "
                         f"{p.get('p_holm', float('nan')):.3g}{mark} |")
        lines.append("")
    metric_rows = [r for r in rows if r.get("ablation") == "metric"]
    if metric_rows:
        ratios = sorted({r["keep_ratio"] for r in metric_rows}, reverse=True)
        lines += ["### digits: importance metrics (align, own tokens, compact conv), top-1 (%)", "",
                  "| metric | " + " | ".join(f"keep {k}" for k in ratios) + " |", "|---|" + "---|" * len(ratios)]
        get = {(r["metric"], r["keep_ratio"]): r for r in metric_rows}
        for metric in sorted({r["metric"] for r in metric_rows}):
            lines.append(f"| {metric} | " + " | ".join(_fmt(get[(metric, k)]) for k in ratios) + " |")
        lines.append("")
    ft = [r for r in rows if r["finetuned"]]
    if ft:
        zs = {(r["mode"], r["keep_ratio"]): r for r in _of_seed(rows, result["tasks"]["digits"])
              if r["task"] == "digits" and r["selection"] == "own"
              and r["conv"] == "compact" and not r["finetuned"] and "ablation" not in r}
        lines += [f"### digits: after fine-tuning ({ft[0]['finetune_epochs']} epochs each), top-1 (%)", "",
                  "| mode | keep | zero-shot | fine-tuned |", "|---|---|---|---|"]
        for r in ft:
            lines.append(f"| {r['mode']} | {r['keep_ratio']} | {_fmt(zs[(r['mode'], r['keep_ratio'])])} | {_fmt(r)} |")
        lines.append("")
    if result["fidelity"]:
        lines += ["### Fidelity: relative deviation of the remaining tokens' layer outputs from the dense model's at "
                  "the same tokens; every mode on the same tokens (those the align model chooses)", "", "| model | layer | tokens | align | hold | relabel |", "|---|---|---|---|---|---|"]
        for label, modes in result["fidelity"].items():
            for a, h, rl in zip(modes["align"], modes["hold"], modes["relabel"]):
                lines.append(f"| {label} | {a['layer']} | {a['tokens']} | {a['rel_dev']:.4f} | {h['rel_dev']:.4f} | "
                             f"{rl['rel_dev']:.4f} |")
        lines.append("")
    lines.append(f"Spread: {result['spread']}. `*`: Holm-adjusted p < {SIGNIFICANCE} (within the task).")
    return "\n".join(lines) + "\n"


def plot(result, task, path):
    """Accuracy vs keep ratio per mode, one panel per (conv: row, token source: column); a
    marker where a pair differs significantly on the same images."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = result["tasks"][task]
    rows = [r for r in _of_seed(result["rows"], meta) if r["task"] == task and not r["finetuned"]
            and "ablation" not in r and not r["selection"].startswith("span_")]
    dense = next(r for r in rows if r["mode"] == "dense")
    selections = meta["selections"]
    fig, axes = plt.subplots(len(CONVS), len(selections), figsize=(max(4.6 * len(selections), 7.0), 3.8 * len(CONVS)),
                             squeeze=False, sharey=True, sharex=True)
    styles = dict(zip(MODES, itertools.cycle(("-o", "-s", ":^", "--v", "-.d", "-P", "--X", ":*", "-.h", "--p"))))
    for (i, conv), (j, selection) in itertools.product(enumerate(CONVS), enumerate(selections)):
        ax = axes[i, j]
        for mode in MODES:
            pts = sorted((r["keep_ratio"], 100 * r["top1"]) for r in rows
                         if r["mode"] == mode and r["selection"] == selection and r["conv"] == conv)
            if pts:
                ax.plot(*zip(*pts), styles[mode], label=mode, ms=5)
        for p in _of_seed(result["paired"], meta):
            if p["task"] == task and p["selection"] == selection and p["conv"] == conv and p["b"] == "relabel" \
                    and p["a"] in ("align", "hold") \
                    and p.get("p_holm", p["p_value"]) < SIGNIFICANCE:
                ax.annotate("*" if p["a"] == "align" else "+", (p["keep"], 100 * (p["both"] + p["only_a"])
                                                               / (p["both"] + p["only_a"] + p["only_b"] + p["neither"])),
                            textcoords="offset points", xytext=(0, 6), ha="center", fontsize=13)
        ax.axhline(100 * dense["top1"], color="k", lw=0.8, label="dense")
        ax.set_title(f"tokens: {selection}, conv: {conv}", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("keep ratio per stage")
    for ax in axes[:, 0]:
        ax.set_ylabel("top-1 (%)")
    axes[-1, -1].legend(fontsize=8)
    title = (f"{task}: zero-shot pruning (dense {100 * dense['top1']:.1f} %); * align, + hold differ from relabel "
             f"on the same images (McNemar, Holm-adjusted p < {SIGNIFICANCE})")
    if result["quick"]:
        title = "SMOKE TEST (--quick): " + title
    fig.suptitle(textwrap.fill(title, width=int(13 * fig.get_figwidth())), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
