"""train_distill.py: the token_kl gradient, the exact KL, every signal and state source, the
tokenizer check, and that each signal shrinks the KL to a teacher."""
import pytest
import torch

import model as M
import train_distill
from conftest import assert_final_model, tiny_model, train_lines, write_byte_tokenizer
from harness.training import optimizer_step

pytestmark = pytest.mark.usefixtures("one_thread")


def test_token_kl_gradient_matches_its_analytic_form():
    """d/dz of -sg(A) log softmax(z)[y] / T is -A (onehot(y) - softmax(z)) / T, with A = log p_T(y)
    - log p(y)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 3))
    teacher_logprobs = torch.randn(11).log_softmax(-1)[tokens]
    mask = torch.tensor([[1., 1., 0.], [1., 1., 1.]])
    logprobs = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    train_distill.token_kl_loss(logprobs, teacher_logprobs, mask, 5).backward()
    advantage = teacher_logprobs - logprobs.detach()
    one_hot = torch.nn.functional.one_hot(tokens, 11)
    expected = -(advantage * mask / 5)[..., None] * (one_hot - logits.softmax(-1))
    assert torch.allclose(logits.grad, expected.detach(), atol=1e-6)


@pytest.mark.parametrize("forward", [False, True])
def test_full_kl_is_the_exact_kl_over_the_vocabulary(forward, monkeypatch):
    monkeypatch.setattr(M, "LOGPROB_CHUNK", 3)  # several chunks, each recomputed in backward
    student, teacher = tiny_model(seed=1).requires_grad_(True), tiny_model(seed=2)
    rows_s, rows_t = torch.randn(7, 64, requires_grad=True), torch.randn(7, 64)
    kl, _ = train_distill.next_token_figures(student, rows_s, teacher, rows_t, forward=forward,
                                             temperature=0.8, n_real_tokens=300)
    log_p = (rows_s @ student.lm_head.weight[:300].t() / 0.8).log_softmax(-1)
    log_q = (rows_t @ teacher.lm_head.weight[:300].t() / 0.8).log_softmax(-1)
    p, q = (log_q, log_p) if forward else (log_p, log_q)
    expected = (p.exp() * (p - q)).sum()
    assert kl.item() == pytest.approx(expected.item(), rel=1e-5)
    grad = torch.autograd.grad(kl, rows_s)[0]
    assert torch.allclose(grad, torch.autograd.grad(expected, rows_s)[0], atol=1e-5)


@pytest.mark.parametrize("signal,states", [("continuation", "student"), ("token_kl", "student"),
                                           ("full_kl", "student"), ("continuation", "teacher")])
def test_distill_runs_logs_and_saves(signal, states, prepared_data, byte_model, tmp_path):
    out = tmp_path / "opd"
    train_distill.main(["--model", str(byte_model(seed=0)), "--teacher",
                        str(byte_model(seed=1, name="teacher")), "--out_dir", str(out),
                        "--data_dir", str(prepared_data), "--signal", signal, "--states", states,
                        "--steps", "2", "--batch_size", "2", "--grad_accum", "1",
                        "--max_new_tokens", "8", "--continuation_tokens", "4",
                        "--states_per_rollout", "2", "--lora_rank", "4", "--eval_every", "0",
                        "--save_every", "2"])
    assert_final_model(out, steps=2)
    for row in train_lines(out):
        assert {"loss", "state_nll", "answer_len", "lr", "tokens_per_s", "signal_nll"} <= row.keys()
        assert ("kl" in row) == (signal != "continuation")
        continuation_figures = {"teacher_nll", "signal_answered", "signal_correct"}
        assert (continuation_figures <= row.keys()) == (signal == "continuation")
    assert (out / "checkpoints" / "step_0000002").exists()


def test_a_teacher_with_another_tokenizer_is_refused(prepared_data, byte_model, make_checkpoint,
                                                     tmp_path):
    # Qwen's tokenizer, not bytes
    teacher = make_checkpoint(with_tokenizer=True, name="qwen_tokenizer")
    with pytest.raises(SystemExit, match="tokenizer differs from that of the student"):
        train_distill.main(["--model", str(byte_model()), "--teacher", str(teacher), "--out_dir",
                            str(tmp_path / "x"), "--data_dir", str(prepared_data), "--steps", "1"])


QUESTIONS = [{"question": q, "gold": gold} for q, gold in (
    ("What is 2 + 3?", "5"), ("How many legs do 3 cats have?", "12"),
    ("Tom has 5 apples and eats 2. How many are left?", "3"), ("What is 10 times 4?", "40"))]


def kl_on_student_states(student, teacher, tokenizer, args):
    """The exact reverse KL per token at states the student samples (fixed seed), over the real
    tokens."""
    flags = ["--teacher", "x", "--signal", "full_kl", "--max_new_tokens", "16"]
    probe = train_distill.get_args(flags)
    batch = train_distill.collect_states(student, teacher, tokenizer, QUESTIONS, 10_000, probe,
                                         torch.float32)
    with torch.no_grad():
        _, mask, student_rows = M.completion_logprobs(student, batch["seqs"], batch["starts"],
                                                      return_hidden=True)
        _, _, teacher_rows = M.completion_logprobs(teacher, batch["seqs"], batch["starts"],
                                                   return_hidden=True)
        kl, _ = train_distill.next_token_figures(student, student_rows, teacher, teacher_rows,
                                                 forward=False, temperature=1.0,
                                                 n_real_tokens=tokenizer.n_real_tokens)
    return kl.item() / mask.sum().item()


@pytest.mark.parametrize("signal", ["continuation", "token_kl", "full_kl"])
def test_distillation_shrinks_the_kl_to_the_teacher(signal, tmp_path):
    """Learning test: a near-uniform tiny student and a sharper teacher (its final norm x3); 20
    steps of each signal on the student's own states must cut the KL between them by a fifth or
    more (continuation: fitting the teacher's samples, at --teacher_temperature 1, is maximum
    likelihood on them; its greedy tokens would teach the argmax alone)."""
    write_byte_tokenizer(tmp_path / "tokenizer.json")
    tokenizer = M.Tokenizer.from_pretrained(tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    student, teacher = tiny_model(seed=4).requires_grad_(True), tiny_model(seed=5)
    with torch.no_grad():
        teacher.norm.weight.mul_(3.0)
    args = train_distill.get_args(["--teacher", "x", "--signal", signal, "--teacher_temperature",
                                   "1", "--lr", "1e-2", "--warmup",
                                   "1", "--steps", "20", "--max_new_tokens", "16",
                                   "--continuation_tokens", "4", "--states_per_rollout", "2",
                                   "--batch_size", "4"])
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    before = kl_on_student_states(student, teacher, tokenizer, args)
    for step in range(args.steps):
        batch = train_distill.collect_states(student, teacher, tokenizer, QUESTIONS, step, args,
                                             torch.float32)
        figures = train_distill.apply_teacher(student, teacher, batch, args, torch.float32,
                                              tokenizer.n_real_tokens)
        optimizer_step(optimizer, step, args, figures["loss"])
    assert kl_on_student_states(student, teacher, tokenizer, args) < 0.8 * before


def test_token_kl_refuses_teacher_states():
    """token_kl is a policy gradient: its estimator needs the student's own samples."""
    with pytest.raises(SystemExit):
        train_distill.get_args(["--teacher", "t", "--signal", "token_kl", "--states", "teacher"])
    assert train_distill.get_args(["--teacher", "t", "--signal", "full_kl", "--states",
                                   "teacher"]).states == "teacher"
