"""The figures that say how good a distillation teacher's signal is on the states it is given
(eval.continuation_quality's signal_answered and signal_correct; train_distill.py's signal_nll and
teacher_nll), each against a hand computation, and the teacher's greedy continuations
(--teacher_temperature 0)."""
import pytest
import torch

import model as M
import train_distill
from conftest import tiny_model, write_byte_tokenizer
from eval import continuation_quality
from test_train_distill import QUESTIONS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def byte_tokenizer(tmp_path):
    write_byte_tokenizer(tmp_path / "tokenizer.json")
    return M.Tokenizer.from_pretrained(tmp_path / "tokenizer.json")


def test_continuation_quality_scores_prefix_and_continuation_together(byte_tokenizer):
    """The answer is read from the student's prefix followed by the teacher's continuation: a
    '#### N' in either part counts, and only answered states enter signal_correct."""
    enc = byte_tokenizer.encode
    states = [([1], enc("5 + 3 = 8.")), ([1], enc("5 + 3 = 8. 8 - 2 = 6.\n#### ")),
              ([1], enc("5 + 3")), ([1], enc(""))]
    continuations = [enc(" 8 - 2 = 6.\n#### 6"), enc("6"), enc(" = 9. 9 - 2 = 7.\n#### 7"),
                     enc("It is 6")]  # right; right (the #### was the student's); wrong; no ####
    quality = continuation_quality(byte_tokenizer, states, continuations, ["6", "6", "6", "6"])
    assert quality == {"signal_answered": 0.75, "signal_correct": pytest.approx(2 / 3)}


@pytest.mark.parametrize("forward", [False, True])
def test_next_token_figures_are_the_exact_kl_and_the_nll_of_the_teachers_argmax(forward):
    student, teacher = tiny_model(seed=1), tiny_model(seed=2)
    rows_s, rows_t = torch.randn(5, 64), torch.randn(5, 64)
    kl, nll = train_distill.next_token_figures(student, rows_s, teacher, rows_t, forward=forward,
                                               temperature=0.7, n_real_tokens=300)
    logits_s = rows_s @ student.lm_head.weight[:300].t()
    logits_t = rows_t @ teacher.lm_head.weight[:300].t()
    greedy = logits_t.argmax(-1)
    log_p = logits_s.log_softmax(-1)
    assert nll == pytest.approx(-log_p[torch.arange(5), greedy].sum().item(), rel=1e-5)
    s, t = (logits_s / 0.7).log_softmax(-1), (logits_t / 0.7).log_softmax(-1)
    p, q = (t, s) if forward else (s, t)
    assert kl.item() == pytest.approx((p.exp() * (p - q)).sum().item(), rel=1e-5)


@pytest.mark.parametrize("signal", ["continuation", "full_kl"])
def test_a_teacher_identical_to_the_student_gives_no_distance(signal, byte_tokenizer):
    """With the student as its own teacher, the student's NLL of the teacher's continuation tokens
    equals the teacher's own (continuation), and the KL is 0 (full_kl)."""
    student = tiny_model(seed=3).requires_grad_(True)
    args = train_distill.get_args(["--teacher", "x", "--signal", signal, "--max_new_tokens", "12",
                                   "--continuation_tokens", "6", "--states_per_rollout", "2",
                                   "--batch_size", "4"])
    batch = train_distill.collect_states(student, student, byte_tokenizer, QUESTIONS, 0, args,
                                         torch.float32)
    figures = train_distill.apply_teacher(student, student, batch, args, torch.float32,
                                          byte_tokenizer.n_real_tokens)
    if signal == "continuation":
        assert figures["signal_nll"] == pytest.approx(figures["teacher_nll"], rel=1e-5)
        assert figures["signal_nll"] == pytest.approx(figures["loss"], rel=1e-6)
        assert 0.0 <= figures["signal_answered"] <= 1.0
    else:
        assert figures["kl"] == pytest.approx(0.0, abs=1e-6)
        assert figures["signal_nll"] > 0


def test_teacher_temperature_zero_continues_with_the_teachers_greedy_tokens(byte_tokenizer):
    """--teacher_temperature 0: every continuation token is the teacher's most likely token after
    what precedes it (the student's state sampled at --temperature 1)."""
    student, teacher = tiny_model(seed=4), tiny_model(seed=5)
    with torch.no_grad():
        teacher.norm.weight.mul_(3.0)  # a sharper teacher, so its argmax is clear
    args = train_distill.get_args(["--teacher", "x", "--teacher_temperature", "0",
                                   "--max_new_tokens", "12", "--continuation_tokens", "5",
                                   "--states_per_rollout", "2"])
    batch = train_distill.collect_states(student, teacher, byte_tokenizer, QUESTIONS, 0, args,
                                         torch.float32)
    n_checked = 0
    for seq, start in zip(batch["seqs"], batch["signal_starts"]):
        with torch.no_grad():
            logits = teacher(torch.tensor([seq]))[0, :, :byte_tokenizer.n_real_tokens]
        greedy = logits[start - 1:len(seq) - 1].argmax(-1).tolist()
        assert seq[start:] == greedy
        n_checked += len(greedy)
    assert n_checked > 10
