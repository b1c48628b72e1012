"""Turn benchmark rows into the markdown summary, the speedup and breakdown plots, and a short console table."""
import collections
import os

E2E_CONFIGS = ("a_ijepa_eager", "b_pytorch_compile", "c_iwm_fast", "d_iwm_fast_compile")


E2E_LEGEND = [
    "(a) I-JEPA-style eager: explicit softmax(q k^T) v, gather on a repeated index + cat, per-parameter EMA loop, "
    "masks by I-JEPA's per-sample CPU algorithm inside the step, copied to the GPU. "
    "(b) SDPA, torch.gather, `_foreach_lerp_`, `torch.compile(dynamic=True)` of every block; its CPU masks are "
    "made before timing (as DataLoader workers would), only the copy is timed. "
    "(c) iwm-fast Triton attention and gather, fused EMA, masks sampled on the GPU. (d) (c) + the same compile. "
    "Same model, batch, fused AdamW and precision in all four; one process.",
]


def _by(rows, **match):
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _value(rows, **match):
    hits = _by(rows, **match)
    return hits[0]["median"] if hits else None


def _fmt(v, digits=2):
    if v is None:
        return "—"
    if v != v:  # NaN
        return "n/a"
    return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.0f}"


def e2e_shapes(rows):
    return list(dict.fromkeys(r["shape"] for r in rows if r["kernel"] == "e2e"))


def e2e_table(rows):
    lines = ["| model/mode/batch | (a) eager | (b) PyTorch+compile | (c) iwm-fast | (d) iwm-fast+compile "
             "| c/a | c/b | d/b |", "|---|---|---|---|---|---|---|---|"]
    for shape in e2e_shapes(rows):
        ips = {k: _value(rows, kernel="e2e", shape=shape, provider=k, metric="images_per_s") for k in E2E_CONFIGS}
        ratio = lambda x, y: ips[x] / ips[y] if ips[x] and ips[y] else None  # noqa: E731
        ratios = [ratio("c_iwm_fast", "a_ijepa_eager"), ratio("c_iwm_fast", "b_pytorch_compile"),
                  ratio("d_iwm_fast_compile", "b_pytorch_compile")]
        lines.append(f"| {shape} | " + " | ".join(_fmt(ips[k], 1) for k in E2E_CONFIGS) + " | "
                     + " | ".join(_fmt(x) for x in ratios) + " |")
    return lines


def breakdown(rows):
    """{(shape, config): {phase: median ms}} from the e2e phase rows."""
    out = collections.OrderedDict()
    for r in rows:
        if r["kernel"] == "e2e" and r["metric"].startswith("phase_ms:"):
            out.setdefault((r["shape"], r["provider"]), {})[r["metric"].split(":", 1)[1]] = r["median"]
    return out


def breakdown_table(rows):
    bd = breakdown(rows)
    if not bd:
        return []
    phases = list(dict.fromkeys(p for v in bd.values() for p in v))
    lines = ["| model/mode/batch | config | " + " | ".join(phases) + " | sum | compile s | peak GiB |",
             "|---|---|" + "---|" * (len(phases) + 3)]
    for (shape, cfg), ph in bd.items():
        comp = _value(rows, kernel="e2e", shape=shape, provider=cfg, metric="compile_s")
        mem = _value(rows, kernel="e2e", shape=shape, provider=cfg, metric="peak_mem_gib")
        lines.append(f"| {shape} | {cfg} | " + " | ".join(_fmt(ph.get(p), 1) for p in phases)
                     + f" | {_fmt(sum(ph.values()), 1)} | {_fmt(comp, 0)} | {_fmt(mem, 1)} |")
    return lines


def speedup_metrics(rows, kernel):
    """The speedup metrics of one kernel to plot: all ``speedup*`` ones except per-direction variants."""
    names = list(dict.fromkeys(r["metric"] for r in rows
                               if r["kernel"] == kernel and r["metric"].startswith("speedup")))
    main = [m for m in names if not m.endswith(("_fwd", "_bwd"))]
    return main or names


def speedup_table(rows):
    lines = ["| kernel | shape | dtype | provider | metric | speedup (median) | p20–p80 |",
             "|---|---|---|---|---|---|---|"]
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        for metric in speedup_metrics(rows, kernel):
            for r in _by(rows, kernel=kernel, metric=metric):
                lines.append(f"| {kernel} | {r['shape']} | {r['dtype']} | {r['provider']} | {metric} | "
                             f"{r['median']:.2f}× | {r['p20']:.2f}–{r['p80']:.2f} |")
    return lines if len(lines) > 2 else []


def write_summary(path, rows, statuses, meta, args_line):
    """Markdown: run metadata, benchmark status (ran / skipped: reason), e2e headline and breakdown, speedups."""
    L = [f"# iwm-fast benchmarks: {meta.get('date', '?')}, {meta.get('gpu', '?')}", "",
         f"torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, commit {meta.get('commit', '?')}; "
         f"`{args_line}`", "", "## Benchmarks", ""]
    for name, st in statuses.items():
        L.append(f"- **{name}**: {st['status']}")
        L += [f"  - {n}" for n in st.get("notes", [])]
    if any(r["kernel"] == "e2e" for r in rows):
        L += ["", "## End-to-end training step, images/s (median; bf16 on CUDA)", ""] + e2e_table(rows)
        L += [""] + E2E_LEGEND
        bt = breakdown_table(rows)
        if bt:
            L += ["", "## Step-time breakdown, ms (median of the breakdown run; CUDA events on a GPU)", ""] + bt
    st = speedup_table(rows)
    if st:
        L += ["", "## Speedups (each against its baseline, measured in the same run)", ""] + st
    L += ["", f"All rows ({len(rows)}): the CSV beside this file.", ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(L))
    return path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_speedups(path, rows):
    """One panel per kernel: bars of speedup per shape, one series per provider (and metric), p20–p80 bars."""
    kernels = [k for k in dict.fromkeys(r["kernel"] for r in rows) if speedup_metrics(rows, k)]
    if not kernels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(kernels), 1, figsize=(11, 3.6 * len(kernels)), squeeze=False)
    for ax, kernel in zip(axes[:, 0], kernels):
        metrics = speedup_metrics(rows, kernel)
        sel = [r for r in rows if r["kernel"] == kernel and r["metric"] in metrics]
        shapes = list(dict.fromkeys(r["shape"] for r in sel))
        series = list(dict.fromkeys((r["provider"], r["metric"]) for r in sel))
        width = 0.8 / max(1, len(series))
        for i, (prov, metric) in enumerate(series):
            xs, ys, lo, hi = [], [], [], []
            for j, shape in enumerate(shapes):
                hit = [r for r in sel if r["shape"] == shape and r["provider"] == prov and r["metric"] == metric]
                if hit:
                    r = hit[0]
                    xs.append(j + (i - (len(series) - 1) / 2) * width)
                    ys.append(r["median"])
                    lo.append(max(0.0, r["median"] - min(r["p20"], r["p80"])))
                    hi.append(max(0.0, max(r["p20"], r["p80"]) - r["median"]))
            label = prov if len(metrics) == 1 else f"{prov} ({metric.replace('speedup_', '')})"
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        values = [r["median"] for r in sel if r["median"] > 0]
        if values and max(values) / min(values) > 30:  # e.g. mask sampling at 100x next to kernels at 1.2x
            ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=20, ha="right", fontsize=7)
        ax.set_ylabel("speedup (×)")
        ax.set_title(f"{kernel}: {', '.join(metrics)}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_breakdown(path, rows):
    """Stacked horizontal bars: the step time of each (case, configuration) split into its phases."""
    bd = breakdown(rows)
    if not bd:
        return None
    plt = _pyplot()
    phases = list(dict.fromkeys(p for v in bd.values() for p in v))
    labels = [f"{shape} {cfg}" for shape, cfg in bd]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(labels) + 1.5))
    left = [0.0] * len(labels)
    for p in phases:
        vals = [v.get(p, 0.0) for v in bd.values()]
        ax.barh(range(len(labels)), vals, left=left, label=p)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (median per phase)")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def console_table(rows, statuses):
    """A few lines for the end of a log: e2e images/s and ratios, each kernel's best speedup, skips."""
    out = []
    if any(r["kernel"] == "e2e" for r in rows):
        out += e2e_table(rows)
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        if kernel == "e2e":
            continue
        for metric in speedup_metrics(rows, kernel):
            sel = _by(rows, kernel=kernel, metric=metric)
            best = max(sel, key=lambda r: r["median"])
            worst = min(sel, key=lambda r: r["median"])
            out.append(f"{kernel:14s} {metric:28s} {worst['median']:6.2f}× .. {best['median']:6.2f}× "
                       f"(best: {best['provider']} {best['shape']})")
    for name, st in statuses.items():
        if not st["status"].startswith("ok"):
            out.append(f"{name}: {st['status']}")
    return "\n".join(out)


def _pick(rows, kernel, metric, provider=None):
    return [r for r in rows if r["kernel"] == kernel and r["metric"] == metric
            and (provider is None or r["provider"] == provider)]


def goal_lines(rows):
    """One line per measured goal, in the GPU check's order: medians (p20-p80) and ratios from the same run."""
    out = []
    for r in _pick(rows, "attention", "speedup_vs_best_sdpa", "triton"):
        best = [b["provider"] for b in _pick(rows, "attention", "best_sdpa_ms_fwdbwd") if b["shape"] == r["shape"]]
        out.append(f"attention fwd+bwd  {r['shape']:34s} best SDPA ({best[0] if best else '?'}) time / kernel time: "
                   f"{r['median']:.2f}x (p20-p80 {r['p20']:.2f}-{r['p80']:.2f})")
    for r in _pick(rows, "attention_layer", "speedup_vs_best_sdpa", "triton"):
        out.append(f"attention layer    {r['shape']:34s} over the best SDPA layer: {r['median']:.2f}x")
    for r in _pick(rows, "attention", "speedup_vs_pinned"):
        out.append(f"A/B {r['provider']:22s} {r['shape']:34s} pinned time / this time: {r['median']:.2f}x")
    for prov in ("iwm_fast", "iwm_fast(tensor m)", "iwm_fast_kernel_only"):
        for r in _pick(rows, "ema", "fraction_of_copy", prov):
            host = _pick([h for h in rows if h["shape"] == r["shape"]], "ema", "host_us_per_call", prov)
            out.append(f"ema {prov:20s} {r['shape']:30s} {r['median']:.2f} of copy bandwidth"
                       + (f", host {host[0]['median']:.0f} us per call" if host else ""))
    for kernel in ("gather_fwd", "gather_bwd"):
        for r in _pick(rows, kernel, "fraction_of_copy", "iwm_fast"):
            out.append(f"{kernel:10s} {r['shape']:42s} {r['median']:.2f} of copy bandwidth")
    for r in _pick(rows, "e2e", "images_per_s"):
        out.append(f"e2e {r['provider']:20s} {r['shape']:24s} {r['median']:.1f} images/s")
    for r in rows:
        if r["kernel"] == "e2e" and r["metric"].startswith("speedup_vs_"):
            out.append(f"e2e {r['provider']:20s} {r['metric']:28s} {r['median']:.2f}x")
    return out


def read_csv(path):
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("median", "p20", "p80"):
            r[k] = float(r[k])
    return rows


def main(argv=None):
    """``python -m iwm_fast.bench.report RESULTS.csv [SUMMARY.md]``: print the short table of a run (and write its
    markdown summary)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2) or not os.path.isfile(args[0]):
        print("usage: python -m iwm_fast.bench.report RESULTS.csv [SUMMARY.md] (RESULTS.csv must exist)",
              file=sys.stderr)
        return 2
    rows = read_csv(args[0])
    if len(args) == 2:
        meta = rows[0] if rows else {}
        write_summary(args[1], rows, {}, meta, f"python -m iwm_fast.bench.report {args[0]}")
    print(console_table(rows, {}))
    print()
    print("\n".join(goal_lines(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
