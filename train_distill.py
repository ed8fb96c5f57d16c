"""
On-policy distillation (OPD) on GSM8K questions: the paper's eq. 7.

    state source:  the student: prefixes of its own sampled answers (--states teacher: of the
                   teacher's, which is off-policy, offline distillation)
    signal source: the teacher

Each step samples answers (collect_states) and applies the teacher's signal at the states they
pass through (apply_teacher). Three signals, run on the same states so that they can be compared:

  --signal continuation (default; the paper's working variant): cut each answer at
      --states_per_rollout random prefix states s, let the teacher write --continuation_tokens
      tokens c from each (sampled at --teacher_temperature; 0: greedy), fit them:
          L(θ) = - E_s E_{c ~ π_T(·|s)} (1/T) Σ_k log π_θ(c_k | s, c_<k)                 (eq. 7)
  --signal token_kl: the per-token reverse KL on the student's sampled tokens, as a policy
      gradient (Thinking Machines' on-policy distillation):
          A_t = -(log π_θ(y_t | s_t) - log π_T(y_t | s_t)),
          L = -(1/T) Σ_t sg(A_t) log π_θ(y_t | s_t)
  --signal full_kl: the exact KL over the whole vocabulary at every state (GKD-style):
          L = (1/T) Σ_t KL(π_θ(·|s_t) || π_T(·|s_t)),  or KL(π_T || π_θ) with --kl_direction forward
T counts the tokens that carry the signal in the step. The paper reports that the one-step
next-token KL signals collapsed where continuations worked, and that a student beats a degraded
teacher whose guidance on the student's states stays good (P3): each step logs that guidance.

    python train_distill.py --teacher out/sft_stress --out_dir out/opd   # student: --model
"""
import random

import torch

# The method's pieces: the task and the state lens, the model's log-probs, the sampler
from eval import (GSM8K_STOP_STRINGS, continuation_quality, gsm8k_prompt, load_gsm8k,
                  state_nll)
from model import completion_logprobs, in_row_chunks, target_nll
from sample import rollout
# The machinery: sums over GPUs; flags, set-up, the update, logs, eval, checkpoints
from harness.parallel import gathered, global_rows, micro_batches, tokens_per_rank
from harness.training import (MetricsLog, autocast, batch_at, finish, frozen_model,
                              nonnegative_float, optimizer_step, periodic_eval, positive_float,
                              positive_int, save_when_due, setup, step_seed, training_args,
                              training_run)


def get_args(argv=None):
    parser = training_args(__doc__.strip().split("\n")[0], steps=200, batch_size=2, grad_accum=8,
                           lr=1e-5, eval_every=50, save_every=50)
    a = parser.add_argument
    a("--teacher", required=True,
      help="teacher model folder or hub id; it must share the student's tokenizer")
    a("--signal", default="continuation", choices=("continuation", "token_kl", "full_kl"),
      help="see above")
    a("--states", default="student", choices=("student", "teacher"),
      help="whose sampled answers give the states: student (on-policy) or teacher (off-policy)")
    a("--kl_direction", default="reverse", choices=("reverse", "forward"),
      help="--signal full_kl: reverse KL(student || teacher) or forward KL(teacher || student)")
    a("--states_per_rollout", type=positive_int, default=4,
      help="--signal continuation: prefix states cut from each answer")
    a("--continuation_tokens", type=positive_int, default=32,
      help="--signal continuation: tokens the teacher writes per state")
    a("--temperature", type=positive_float, default=1.0,
      help="the states' sampling temperature, also of the distributions the KL signals compare")
    a("--teacher_temperature", type=nonnegative_float, default=0.0,
      help="--signal continuation: the teacher's sampling temperature (0: greedy)")
    args = parser.parse_args(argv)
    if args.signal == "token_kl" and args.states == "teacher":  # needs the student's samples
        parser.error("--signal token_kl needs --states student; use full_kl or continuation on "
                     "teacher states")
    return args


def collect_states(student, teacher, tokenizer, questions, step, args, dtype):
    """Sample answers (from the student, or with --states teacher from the teacher) and turn them
    into training sequences: token ids, where the answer starts, where the signal starts."""
    seed = 2 * step_seed(args.seed, step)  # the answers draw with seed, the continuations seed + 1
    # One answer per question, from the student (on-policy) or the teacher (off-policy)
    prompts = [tokenizer.encode(gsm8k_prompt(q["question"])) for q in questions]
    rows = global_rows(len(prompts))  # each question's index among every GPU's
    sampler = student if args.states == "student" else teacher
    with autocast(student.device, dtype), gathered(sampler):  # FSDP: whole weights to sample
        answers = rollout(model=sampler, tokenizer=tokenizer, prompts=prompts, rows=rows, seed=seed,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          stop_strings=GSM8K_STOP_STRINGS, batch_size=args.gen_batch_size)
    answer_len = sum(map(len, answers)) / len(answers)
    if args.signal != "continuation":  # the KL signals act at every state of the answer
        return dict(seqs=[p + a for p, a in zip(prompts, answers)],
                    starts=[len(p) for p in prompts], signal_starts=[len(p) for p in prompts],
                    answer_len=answer_len)
    # --signal continuation: cut each answer at up to --states_per_rollout random points (sorted);
    # each cut is a state, the prompt and the answer's first `cut` tokens. A question's cuts and
    # its continuations' draws follow from its row: the same on any number of GPUs
    states = []
    state_rows = []
    golds = []  # each state's gold answer, to score the teacher's continuation of it
    for row, prompt, answer, question in zip(rows, prompts, answers, questions):
        rng = random.Random(step_seed(seed, row))
        n_cuts = min(args.states_per_rollout, len(answer))
        cuts = sorted(rng.sample(range(len(answer)), n_cuts))
        states += [(prompt, answer[:cut]) for cut in cuts]
        state_rows += [row * args.states_per_rollout + j for j in range(n_cuts)]
        golds += [question["gold"]] * n_cuts
    # The teacher continues every state for --continuation_tokens tokens, at its own temperature
    # (0: its greedy choice): the targets
    with autocast(student.device, dtype):
        continuations = rollout(model=teacher, tokenizer=tokenizer,
                                prompts=[p + s for p, s in states], seed=seed + 1,
                                max_new_tokens=args.continuation_tokens,
                                temperature=args.teacher_temperature, rows=state_rows,
                                stop_strings=GSM8K_STOP_STRINGS, batch_size=args.gen_batch_size)
    return dict(seqs=[p + s + c for (p, s), c in zip(states, continuations)],
                starts=[len(p) for p, _ in states],
                signal_starts=[len(p) + len(s) for p, s in states], answer_len=answer_len,
                # How good is that signal? Do the states, so continued, reach a right answer?
                quality=continuation_quality(tokenizer, states, continuations, golds))


def token_kl_loss(logprobs, teacher_logprobs, mask, n_tokens):
    """Reverse KL on sampled tokens as a policy gradient, advantage -(log π_θ - log π_T) held
    constant: its gradient, -sg(A) ∇log π_θ, is in expectation that of the per-token KL(π_θ ||
    π_T) at the sampled states (held fixed: no reward-to-go), on the student's own samples."""
    advantage = -(logprobs.detach() - teacher_logprobs)  # (B, L), no gradient through it
    return -(advantage * logprobs * mask).sum() / n_tokens


def next_token_kl(logits, other_logits, temperature):
    """The exact KL(p || q) at each of n states, p = softmax(logits / temperature) and q =
    softmax(other_logits / temperature) its next-token distributions, (n, vocab) each -> (n,)."""
    log_p = (logits / temperature).log_softmax(-1)
    log_q = (other_logits / temperature).log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)  # Σ over the vocabulary of p (log p - log q)


def next_token_figures(student, student_rows, teacher, teacher_rows, forward: bool,
                       temperature: float, n_real_tokens=None):
    """Σ over n states of the exact KL(π_θ || π_T) of the next-token distributions at temperature
    (forward: KL(π_T || π_θ)) and of the student's NLL (temperature 1) of the teacher's most likely
    token, from the models' hidden states (n, hidden) each: (KL sum, NLL sum), chunk by chunk."""
    student_head = student.lm_head.weight[:n_real_tokens]
    teacher_head = teacher.lm_head.weight[:n_real_tokens]

    def of_chunk(student_rows, teacher_rows):  # (chunk, hidden) each -> (chunk, 2)
        student_logits = (student_rows @ student_head.t()).float()  # (chunk, vocab)
        teacher_logits = (teacher_rows @ teacher_head.t()).float()
        p, q = (teacher_logits, student_logits) if forward else (student_logits, teacher_logits)
        greedy = teacher_logits.argmax(-1)  # the teacher's most likely token (chunk,)
        nll = -student_logits.log_softmax(-1).gather(-1, greedy[:, None]).squeeze(-1)
        return torch.stack([next_token_kl(p, q, temperature), nll.detach()], -1)
    kl, nll = in_row_chunks(of_chunk, student_rows, teacher_rows).t().contiguous()  # (n,) each
    return kl.sum(), nll.sum().item()


def apply_teacher(student, teacher, batch, args, dtype, n_real_tokens=None):
    """Backpropagate the teacher's signal on this step's sequences, micro-batch by micro-batch
    (over the first n_real_tokens tokens, those the sampler draws); optimizer_step applies it.
    Returns the step's figures: the loss, then how good the signal was: signal_nll, the student's
    NLL of the teacher's tokens (the KL signals': its greedy token at each state), and for
    continuations teacher_nll (how sure it is of them), signal_answered, signal_correct."""
    seqs, starts, signal_starts = batch["seqs"], batch["starts"], batch["signal_starts"]
    # The loss divides by the tokens that carry the signal in the step, on all GPUs
    n_signal = tokens_per_rank(sum(len(s) - st for s, st in zip(seqs, signal_starts)))
    continuation = args.signal == "continuation"
    micro = args.batch_size * (args.states_per_rollout if continuation else 1)
    # continuation fits the teacher's tokens with the student's own policy (temperature 1); the
    # KL signals compare the two distributions at the sampling temperature
    temperature = 1.0 if continuation else args.temperature
    sums = dict(loss=0.0, kl=0.0, signal_nll=0.0, teacher_nll=0.0, state_nll=0.0, n_state=0.0)
    for i in micro_batches(student, len(seqs), micro):  # gradients sync over GPUs in the last
        mb_seqs, mb_starts = seqs[i:i + micro], starts[i:i + micro]
        with autocast(student.device, dtype):
            # The student's log-probs of every answer token (micro, L), the mask of real ones,
            # and the (N, hidden) states that predict them (full_kl projects them itself)
            logprobs, mask, rows = completion_logprobs(
                student, mb_seqs, mb_starts, temperature=temperature,
                n_real_tokens=n_real_tokens, return_hidden=True)
            # The teacher's log-probs (micro, L) and states (N, hidden) at the same tokens
            with torch.no_grad():
                teacher_logprobs, _, teacher_rows = completion_logprobs(
                    teacher, mb_seqs, mb_starts, temperature=temperature,
                    n_real_tokens=n_real_tokens, return_hidden=True)
            # The answer's columns (micro, L): state tokens, then the signal's. Continuation fits
            # the teacher's tokens after the state with SFT's cross-entropy (eq. 7 is eq. 5 on
            # other states); for the KL signals every token carries the signal (their loss below)
            offsets = [s - st for s, st in zip(signal_starts[i:i + micro], mb_starts)]
            loss, signal = target_nll(logprobs, mask, first_target=offsets, n_tokens=n_signal)
            state = mask & ~signal if continuation else mask
            if continuation:  # the loss is the student's NLL of the teacher's tokens
                signal_nll = loss.item()
            else:  # at each of the N states: the exact KL, the NLL of the teacher's greedy token
                with torch.set_grad_enabled(args.signal == "full_kl"):
                    kl_sum, signal_nll = next_token_figures(
                        student, rows, teacher, teacher_rows, forward=args.kl_direction ==
                        "forward", temperature=args.temperature, n_real_tokens=n_real_tokens)
                signal_nll /= n_signal
            if args.signal == "token_kl":
                loss = token_kl_loss(logprobs, teacher_logprobs, signal, n_signal)
                kl = (logprobs.detach() - teacher_logprobs) * signal  # estimated on samples
                sums["kl"] += kl.sum().item() / n_signal
            elif args.signal == "full_kl":  # the exact KL, summed over the states
                loss = kl_sum / n_signal
                sums["kl"] += loss.item()
        loss.backward()  # gradients add up over micro-batches
        sums["loss"] += loss.item()
        sums["signal_nll"] += signal_nll
        sums["teacher_nll"] += -(teacher_logprobs * signal).sum().item() / n_signal
        # state_nll: the student's NLL of the state tokens (its own answers, or the teacher's)
        sums["state_nll"] += state_nll(logprobs, state) * state.sum().item()
        sums["n_state"] += state.sum().item()
    figures = dict(loss=sums["loss"], state_nll=sums["state_nll"] / max(1, sums["n_state"]),
                   answer_len=batch["answer_len"], signal_nll=sums["signal_nll"])
    if continuation:  # the teacher's own NLL, and where its continuations led
        return {**figures, "teacher_nll": sums["teacher_nll"], **batch["quality"]}
    return {**figures, "kl": sums["kl"]}


@training_run  # harness/faults.py: SIGINT, SIGTERM end it in one line; the lock goes
def main(argv=None):
    # Set-up: flags, the --out_dir guard, student + tokenizer + AdamW (as --resume's checkpoint
    # left them, if it is given), the teacher, the questions
    args = get_args(argv)
    student, tokenizer, optimizer, device, dtype, first_step = setup(args)
    teacher = frozen_model(args.teacher, "--teacher", device=device, dtype=dtype,
                           like=(f"the student (--model {args.model})", student, tokenizer))
    train = load_gsm8k("train", args.data_dir)
    questions_per_step = args.batch_size * args.grad_accum
    metrics = MetricsLog(args.out_dir, args.steps, first_step, args=args)
    print(f"{args.signal} signal on {args.states} states: {args.steps} steps of "
          f"{questions_per_step} questions per GPU")
    if first_step == 0:  # a fresh run is evaluated before its first step
        periodic_eval(0, student, tokenizer, metrics, args, dtype)
    for step in range(first_step, args.steps):
        # This step's questions: its slice of a seeded shuffle of the train split
        questions = batch_at(train, step=step, n=questions_per_step, seed=args.seed)
        # The states: answers sampled now (the student's, or with --states teacher the
        # teacher's), and for --signal continuation the teacher's continuations of them
        batch = collect_states(student=student, teacher=teacher, tokenizer=tokenizer,
                               questions=questions, step=step, args=args, dtype=dtype)
        # The signal: the teacher's, at those states, backpropagated
        figures = apply_teacher(student=student, teacher=teacher, batch=batch, args=args,
                                dtype=dtype, n_real_tokens=tokenizer.n_real_tokens)
        # The update: gradients averaged over GPUs, clipped, AdamW at this step's learning rate
        lr, grad_norm = optimizer_step(optimizer, step, args, figures["loss"])
        # Log the step, evaluate every --eval_every steps, checkpoint every --save_every
        metrics.log(step + 1, **figures, lr=lr, grad_norm=grad_norm,
                    tokens=sum(map(len, batch["seqs"])))
        periodic_eval(step + 1, student, tokenizer, metrics, args, dtype)
        save_when_due(args, student, optimizer, step + 1)  # and at SIGTERM's stop
    finish(student, tokenizer, args.out_dir, base_model=args.model)


if __name__ == "__main__":
    main()
