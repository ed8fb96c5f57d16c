"""The lab's figures, drawn with plot.py's panels (matplotlib is optional: without it, one line
says how to get it).

    OUT/lab.png      per method: the state NLL of its training states, its target accuracy and its
                     retention over the training steps (one line per base and seed), and the
                     final table as bars (mean ± std)
    OUT/distill.png  the paper's condition P3, measured: for every OPD student and (base, seed),
                     student minus teacher (target; retention) against the teacher's local
                     advantage: its local quality on the student's states minus its own target
"""
SIX_COLORS = {"base": "gray", "sft_mild": "tab:blue", "sft_stress": "tab:red",
              "opd_mild": "tab:cyan", "opd_stress": "tab:orange", "rl": "tab:green",
              "sft_control": "tab:purple"}  # the six, and the positive control
STUDENT_MARKERS = {"opd_mild": "o", "opd_stress": "s", "opd_mixed": "*", "opd_slip": "D",
                   "opd_stress_lora": "v", "opd_overtrain": "^", "opd_hard": "P"}


def plot_lab(args, summary, runs):
    """The six runs' curves (plot.py's panels: one line per base and seed) and final bars."""
    import plot
    plt = plot.pyplot()
    if plt is None:
        print("[lab] no figure: matplotlib is not installed (pip install matplotlib)", flush=True)
        return
    folders = {name: [plot.read_metrics(path) for base in args.bases for seed in args.seeds
                      for path in [args.out / f"b{base}" / f"seed{seed}" / name / "metrics.jsonl"]
                      if path.exists()]
               for name in SIX_COLORS if name in runs}
    drawn = plot.curves({name: records for name, records in folders.items() if records},
                        colors=SIX_COLORS)
    fig, axes = plt.subplots(1, 5, figsize=(25, 4.2))
    plot.draw_panel(axes[0], drawn, plot.QUANTITIES["state_nll"],
                    title="state NLL of the training states")
    plot.draw_panel(axes[1], drawn, plot.QUANTITIES["gsm8k_flexible"],
                    title="target accuracy during training (100 test questions)")
    plot.draw_panel(axes[2], drawn, plot.RETENTION,
                    title="retention during training (mean of MMLU, TruthfulQA MC2)")
    axes[0].legend(fontsize=8)
    names = [name for name in SIX_COLORS if name in summary]
    panels = ((axes[3], ("target", "mmlu", "truthfulqa_mc2"), "final accuracy (mean ± std)"),
              (axes[4], ("forgetting", "state_nll"), "Forgetting (points) and state NLL"))
    for ax, keys, title in panels:
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            means = [summary[name].get(k, {}).get("mean", 0) for k in keys]
            stds = [summary[name].get(k, {}).get("std", 0) for k in keys]
            ax.bar([i + j * width for i in range(len(keys))], means, width, yerr=stds,
                   color=SIX_COLORS[name], label=name, capsize=2)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], keys)
        ax.set_title(title)
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    plot.save_figure(fig, args.out / "lab.png", dpi=110)  # whole
    plt.close(fig)
    print(f"[lab] figure: {args.out / 'lab.png'}", flush=True)


def plot_condition(args, points):
    """distill.png: one point per OPD student and (base, seed)."""
    import plot
    plt = plot.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    panels = (("minus_teacher_target", "student − teacher, target (points)"),
              ("minus_teacher_retained", "student − teacher, retained (points)"))
    for ax, (key, label) in zip(axes, panels):
        for run in sorted({p["run"] for p in points}):
            mine = [p for p in points if p["run"] == run]
            ax.scatter([p["local_advantage"] for p in mine], [p[key] for p in mine],
                       marker=STUDENT_MARKERS.get(run, "x"), label=run.replace("opd_", "from "),
                       alpha=0.8)
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.axvline(0, color="gray", linewidth=0.8)
        ax.set(xlabel="teacher's local advantage: the share of the student's states it completes "
                      "right,\nminus its own target accuracy (points)", ylabel=label)
    axes[0].set_title("does the student beat its teacher? (each point: a teacher, base, seed)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    plot.save_figure(fig, args.out / "distill.png", dpi=110)
    plt.close(fig)
    print(f"[lab] figure: {args.out / 'distill.png'}", flush=True)
