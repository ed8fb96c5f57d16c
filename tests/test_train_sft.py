"""train_sft.py: the states it fits, its loss masking, both state sources and presets, and that it
learns."""
import json

import pytest
import torch

import train_sft
from conftest import args_for, assert_final_model, tiny_model, train_lines
from model import Tokenizer
from harness.training import optimizer_step

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dataset_states_are_prompt_then_gold_solution_then_eos(tokenizer_file):
    tok = Tokenizer.from_pretrained(tokenizer_file)
    question = {"question": "Natalia sold clips to 48 of her friends in April.", "gold": "72",
                "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"}
    seqs, starts = train_sft.collect_states(None, tok, [question], 0, args_for(states="dataset"),
                                            torch.float32)
    prompt, answer = seqs[0][:starts[0]], seqs[0][starts[0]:]
    question_text = "Question: Natalia sold clips to 48 of her friends in April.\nAnswer:"
    assert tok.decode(prompt) == question_text
    assert tok.decode(answer[:-1]) == " " + question["answer"]
    assert answer[-1] == tok.eos_id


def test_loss_puts_zero_weight_on_prompt_and_padding():
    """fit_states' loss is the mean NLL of the answer tokens only: it equals a hand computation from
    the full logits, and in a padded batch only the positions that predict answer tokens get any
    gradient."""
    model = tiny_model(seed=1)
    seqs, starts = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11]], [4, 2]
    # the final-norm hidden states: each position's only way into the loss is its own logits
    outputs = []
    model.norm.register_forward_hook(lambda module, inputs, out: outputs.append(out)
                                     or out.retain_grad())
    loss = train_sft.fit_states(model, seqs, starts, args_for(batch_size=2), torch.float32)
    nll = []
    for seq, start in zip(seqs, starts):
        logprobs = model(torch.tensor([seq[:-1]]))[0].log_softmax(-1)
        nll += [-logprobs[t - 1, seq[t]].item() for t in range(start, len(seq))]
    assert loss == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    weighted = outputs[0].grad.abs().sum(-1) > 0  # (2, 6): which positions' predictions carry loss
    # prompt 1,2,3,4 -> answer 5,6,7
    assert weighted.tolist() == [[False, False, False, True, True, True],
                                 [False, True, True, False, False,
                                  False]]  # prompt 8,9 -> answer 10,11, padding


def test_presets_set_defaults_and_explicit_flags_win():
    stress = train_sft.get_args(["--preset", "stress"])
    assert (stress.epochs, stress.lr, stress.lora_rank, stress.lora_alpha) == (5, 5e-4, 64, 128)
    mild = train_sft.get_args([])
    assert mild.preset == "mild"
    assert (mild.epochs, mild.lr, mild.lora_rank) == (1, 1e-4, 64)
    assert train_sft.get_args(["--preset", "stress", "--lr", "1e-3"]).lr == 1e-3


def test_sft_runs_with_qwens_tokenizer_and_saves(prepared_data, make_checkpoint, tmp_path):
    """One step at Qwen's real vocabulary size (151,936) with its tokenizer, LoRA, and a loadable
    result."""
    folder = make_checkpoint(with_tokenizer=True, vocab_size=151936)
    train_sft.main(["--model", str(folder), "--out_dir", str(tmp_path / "out"), "--data_dir",
                    str(prepared_data), "--steps", "1", "--batch_size", "1", "--grad_accum", "1",
                    "--lora_rank", "4", "--eval_every", "0"])
    assert_final_model(tmp_path / "out", steps=1)


def test_self_states_fit_the_learners_correct_samples(prepared_data, byte_model, tmp_path,
                                                      monkeypatch):
    """--states self: a random model is never right, so the grader is stubbed to accept every other
    sample."""
    verdicts = iter([1.0, 0.0] * 100)
    monkeypatch.setattr(train_sft, "gsm8k_reward", lambda text, gold: next(verdicts))
    out = tmp_path / "rft"
    model_dir = byte_model(max_position_embeddings=4096)  # eval's 5-shot prompts are ~3,000 bytes
    train_sft.main(["--model", str(model_dir), "--out_dir", str(out), "--data_dir",
                    str(prepared_data), "--steps", "2", "--states", "self",
                    "--samples_per_question", "2", "--max_new_tokens", "8", "--batch_size", "2",
                    "--grad_accum", "1", "--eval_every", "2", "--eval_limit", "1", "--save_every",
                    "1"])
    assert_final_model(out, steps=2)
    lines = train_lines(out)
    assert [row["kept_fraction"] for row in lines] == [0.5, 0.5]
    assert all(0 < row["answer_len"] <= 8 for row in lines)
    assert (out / "checkpoints" / "step_0000002").exists()
    evals = [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "gsm8k_flexible" in row]
    assert [row["step"] for row in evals] == [0, 2]  # before training and at the end
    # LoRA starts as the identity
    assert evals[0]["kl_to_start"] == 0.0
    assert evals[1]["kl_to_start"] != 0.0


def test_sft_drives_the_loss_of_a_tiny_model_near_zero():
    """Learning test: full fine-tuning memorises four answers (NLL from ~6.2, log 512, to <
    0.05)."""
    torch.manual_seed(0)
    model = tiny_model(seed=2).requires_grad_(True)
    seqs = [torch.randint(0, 512, (14,)).tolist() for _ in range(4)]
    starts = [6] * 4
    args = args_for(lr=2e-2, warmup=3, steps=30, batch_size=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    losses = []
    for step in range(args.steps):
        losses.append(train_sft.fit_states(model, seqs, starts, args, torch.float32))
        optimizer_step(optimizer, step, args, losses[-1])
    assert losses[0] > 5.5
    assert losses[-1] < 0.05
