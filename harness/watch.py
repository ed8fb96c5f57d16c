"""
No silent no-ops: a run that trains on nothing while it looks normal says so, in one line as it
goes on ("warning: step N: ..." after that step's progress line), and the line is kept in
metrics.jsonl (in that step's record, under "warnings"). MetricsLog hands Watch each training
step's figures; what it watches, and when it speaks:

    equal_rewards  train_rl.py: more than half of the groups had equal rewards (zero_var_frac
                   > 0.5: no advantage, skipped) for 5 steps running
    cut_off        train_rl.py: more than half of the answers reached --max_new_tokens
                   (truncated_frac > 0.5: cut off before their answer) for 5 steps running
    no_answer      train_distill.py --signal continuation: fewer than 1 in 20 of the teacher's
                   continuations reached an answer (signal_answered < 0.05) for 5 steps running
    no_signal      any trainer: no step so far carried a signal (a gradient of zero, grad_norm 0,
                   in every one) after 5 steps; and at the last step, if not one of them did

Each rule speaks once as its figure's run of bad steps reaches 5, and again if a new run does.
"""
import json
from pathlib import Path

STEPS_RUNNING = 5  # bad steps in a row before a rule speaks
# name: (the figure a trainer logs, when a step's value is bad, what that means)
RULES = {
    "equal_rewards": ("zero_var_frac", lambda v: v > 0.5,
                      "most groups' answers had equal rewards, so no advantage"),
    "cut_off": ("truncated_frac", lambda v: v > 0.5,
                "most answers reached --max_new_tokens, cut off before their end"),
    "no_answer": ("signal_answered", lambda v: v < 0.05,
                  "the teacher's continuations rarely reached an answer"),
}


class Watch:
    """The warnings of a run of `steps` training steps, step by step (rank 0)."""

    def __init__(self, steps: int):
        self.steps = steps
        self.running = dict.fromkeys(RULES, 0)  # each rule's bad steps in a row so far
        self.seen = 0  # training steps seen
        self.with_signal = 0  # of which carried a signal: a gradient that was not zero

    def check(self, step: int, figures: dict) -> list:
        """A training step's figures (those MetricsLog writes) -> its warnings, one line each."""
        warnings = []
        for name, (figure, bad, meaning) in RULES.items():
            value = figures.get(figure)
            bad_step = value is not None and bad(value)
            self.running[name] = self.running[name] + 1 if bad_step else 0
            if self.running[name] == STEPS_RUNNING:
                warnings.append(f"{name}: {meaning}, for {STEPS_RUNNING} steps running "
                                f"({figure} {value:.2f})")
        self.seen += 1
        grad_norm = figures.get("grad_norm")  # not known (not finite, not logged): a signal
        self.with_signal += grad_norm is None or grad_norm > 0
        if self.with_signal == 0 and step == self.steps:  # the end of a run that did nothing
            warnings.append(f"no_signal: not one of the run's {self.seen} steps carried a "
                            "signal (the gradient was zero in each): it learned nothing")
        elif self.with_signal == 0 and self.seen == STEPS_RUNNING:
            warnings.append(f"no_signal: no step so far carried a signal (the gradient was zero "
                            f"in each of {STEPS_RUNNING}): nothing learned yet")
        return warnings

    def replay(self, metrics_path):
        """After --resume: the training steps that metrics.jsonl kept, checked again to pick up
        the watch where it was (their warnings are in the file already)."""
        for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if "tokens_per_s" in record:  # a training step's record, not an eval's
                self.check(record["step"], record)
