"""plot.py: the panels of runs of different trainers, each holding exactly the records' numbers;
runs over several folders (the lab's seeds); a PNG from the command; bad input and a missing
matplotlib in one line."""
import json
import struct
import sys

import pytest

import plot

# metrics.jsonl lines as the trainers write them (train_rl.py, train_distill.py): an eval line at
# step 0 and at the end, a step line each step; a figure that was not finite is null
RL = [{"step": 0, "kl_to_start": 0.0, "gsm8k_flexible": 0.25, "mmlu_acc": 0.5,
       "truthfulqa_mc2": 0.4},
      {"step": 1, "loss": 0.1, "reward": 0.25, "pass_rate": 0.5, "zero_var_frac": 0.5,
       "response_len": 8.0, "entropy": 2.0, "state_nll": 2.0, "lr": 1e-6, "grad_norm": 1.5,
       "tokens_per_s": 900.0, "step_s": 0.5},
      {"step": 2, "loss": None, "reward": 0.5, "pass_rate": 1.0, "zero_var_frac": 0.0,
       "response_len": 6.0, "entropy": 1.5, "state_nll": 1.5, "lr": 2e-6, "grad_norm": 2.5,
       "tokens_per_s": 800.0, "step_s": 0.6, "not_finite": ["loss"]},
      {"step": 2, "kl_to_start": 0.01, "gsm8k_flexible": 0.5, "mmlu_acc": 0.45,
       "truthfulqa_mc2": 0.35}]
DISTILL = [{"step": 0, "kl_to_start": 0.0, "gsm8k_flexible": 0.2, "new_eval_acc": 0.3},
           {"step": 1, "loss": 0.7, "state_nll": 0.9, "answer_len": 40.0, "kl": 0.3,
            "signal_nll": 1.2, "teacher_nll": 0.4, "signal_answered": 0.75, "signal_correct": 0.5,
            "lr": 1e-5, "grad_norm": 3.0, "a_new_figure": 7.0, "tokens_per_s": 1e3,
            "step_s": 1.0},
           {"step": 1, "kl_to_start": 0.02, "gsm8k_flexible": 0.3, "new_eval_acc": 0.4}]


def write_run(folder, records):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def lines_of(ax):
    """{legend label: (steps, values, marker)} of the lines on a panel."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), line.get_marker())
            for line in ax.get_lines()}


def test_each_panel_holds_each_runs_numbers_on_shared_axes(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    runs = {"rl": [plot.read_metrics(write_run(tmp_path / "rl", RL))],
            "opd": [plot.read_metrics(write_run(tmp_path / "opd", DISTILL) / "metrics.jsonl")]}
    drawn = plot.curves(runs)
    quantities = plot.quantities_of(drawn)
    assert [q.name for q in quantities] == [
        "loss", "state_nll", "reward", "pass_rate", "answer_len", "zero_var_frac", "kl",
        "signal_nll", "teacher_nll", "signal_answered", "signal_correct", "grad_norm",
        "gsm8k_flexible", "mmlu_acc", "truthfulqa_mc2", "retention", "kl_to_start",
        "a_new_figure", "new_eval_acc"]  # not drawn: lr, tokens_per_s, step_s, entropy
    fig = plot.figure_of(drawn, quantities)
    panels = dict(zip([q.name for q in quantities], fig.axes))
    assert len(fig.axes) == 20  # 19 panels on a 4-wide grid, one place left empty
    # both runs on one state NLL panel, log scale, every step's number; a null is left out
    assert panels["state_nll"].get_yscale() == "log"
    assert lines_of(panels["state_nll"]) == {"rl": ([1, 2], [2.0, 1.5], "None"),
                                             "opd": ([1], [0.9], "None")}
    assert lines_of(panels["loss"]) == {"rl": ([1], [0.1], "None"), "opd": ([1], [0.7], "None")}
    # RL's response_len and distillation's answer_len are one quantity, on one panel
    assert lines_of(panels["answer_len"]) == {"rl": ([1, 2], [8.0, 6.0], "None"),
                                              "opd": ([1], [40.0], "None")}
    # the periodic eval: points, in %; retention is the mean of MMLU and TruthfulQA MC2
    assert lines_of(panels["gsm8k_flexible"]) == {"rl": ([0, 2], [25.0, 50.0], "o"),
                                                  "opd": ([0, 1], [20.0, 30.0], "o")}
    assert lines_of(panels["retention"]) == {"rl": ([0, 2], [45.0, 40.0], "o")}
    assert lines_of(panels["new_eval_acc"]) == {"opd": ([0, 1], [0.3, 0.4], "o")}
    assert lines_of(panels["a_new_figure"]) == {"opd": ([1], [7.0], "None")}
    assert panels["kl"].get_title() == plot.QUANTITIES["kl"].title
    assert {line.get_color() for line in panels["kl_to_start"].get_lines()} == {"C0", "C1"}
    plt.close(fig)


def test_a_run_over_several_folders_is_one_color_named_once():
    """The lab's use: each method over several seeds, in the method's color."""
    plt = pytest.importorskip("matplotlib.pyplot")
    drawn = plot.curves({"rl": [RL, RL[:2]], "opd": [DISTILL]}, colors={"rl": "tab:green"})
    assert [(c.label, c.color) for c in drawn] == [("rl", "tab:green"), (None, "tab:green"),
                                                   ("opd", "C1")]
    fig, ax = plt.subplots()
    assert plot.draw_panel(ax, drawn, plot.RETENTION, title="retention during training")
    assert ax.get_title() == "retention during training"
    assert [line.get_ydata().tolist() for line in ax.get_lines()] == [[45.0, 40.0], [45.0]]
    assert not plot.draw_panel(ax, [drawn[2]], plot.RETENTION)  # opd measured no retention
    plt.close(fig)


def test_a_log_panel_labels_its_minor_ticks_only_when_it_spans_a_decade_or_less():
    """Over three decades (stress SFT's 8 nats down to 0.05) the minor ticks' labels would pile on
    top of each other: only 0.1, 1, 10 are labelled; within one decade the minor ticks are."""
    plt = pytest.importorskip("matplotlib.pyplot")
    labels = {}
    for span, values in (("wide", [8.0, 0.05]), ("narrow", [0.35, 0.12])):
        records = [{"step": step, "state_nll": value} for step, value in enumerate(values, 1)]
        fig, ax = plt.subplots()
        assert plot.draw_panel(ax, plot.curves({"run": [records]}), plot.QUANTITIES["state_nll"])
        fig.canvas.draw()
        labels[span] = [tick.get_text() for tick in ax.get_yticklabels(minor=True)
                        if tick.get_text() and ax.get_ylim()[0] <= tick.get_position()[1]
                        <= ax.get_ylim()[1]]
        plt.close(fig)
    assert labels["wide"] == []
    assert labels["narrow"] and all(float(text) < 1 for text in labels["narrow"])


def test_the_command_writes_one_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "figs" / "curves.png"
    out.parent.mkdir()
    sft = [{"step": 1, "loss": 2.0, "state_nll": 2.0}, {"step": 2, "loss": 1.0, "state_nll": 1.0}]
    plot.main([str(write_run(tmp_path / "sft", sft)), str(write_run(tmp_path / "sft2", sft)),
               "-o", str(out)])
    header = out.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (4 * 460, 340)  # 2 panels: a row, 100 dpi
    assert capsys.readouterr().out == f"wrote {out}: 2 panels, 2 run(s)\n"


def test_bad_input_is_one_line_naming_it(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    good = str(write_run(tmp_path / "rl", RL))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=f"error: {empty}: no metrics.jsonl here"):
        plot.main([good, str(empty), "-o", str(tmp_path / "c.png")])
    damaged = write_run(tmp_path / "damaged", RL) / "metrics.jsonl"
    damaged.write_text(damaged.read_text().replace('"step": 1,', '"step": 1'))
    with pytest.raises(SystemExit) as stop:
        plot.main([str(damaged), "-o", str(tmp_path / "c.png")])
    assert str(stop.value).endswith(f"error: {damaged}: line 2 is no metrics record")
    with pytest.raises(SystemExit, match=r"error: -o c\.txt: not a picture's name"):
        plot.main([good, "-o", "c.txt"])
    assert not (tmp_path / "c.png").exists()


def test_a_torn_last_line_is_left_out_with_one_warning(tmp_path, capsys):
    """A run still writing its metrics.jsonl (or one stopped mid-line) is read without the line."""
    torn = write_run(tmp_path / "torn", RL) / "metrics.jsonl"
    torn.write_text(torn.read_text() + '{"step": 3, "loss": 0.')
    assert plot.read_metrics(torn) == RL
    assert capsys.readouterr().err == (f"warning: {torn}: line 5 is torn (a run writing it, or "
                                       "stopped mid-line): left out\n")
    torn.write_text(torn.read_text() + "\n")  # a whole line that is no record: an error
    with pytest.raises(ValueError, match=f"^{torn}: line 5 is no metrics record$"):
        plot.read_metrics(torn)


def test_without_matplotlib_one_line_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # None in sys.modules: import fails
    with pytest.raises(SystemExit) as stop:
        plot.main([str(write_run(tmp_path / "rl", RL)), "-o", str(tmp_path / "c.png")])
    assert str(stop.value).endswith("error: matplotlib is not installed: pip install "
                                    "matplotlib (plot.py draws with it)")
    assert not (tmp_path / "c.png").exists()
