"""train_rl.py: GRPO advantages and zero-variance skipping, the loss's gradient, a full run, and
that it learns."""
import pytest
import torch

import train_rl
from conftest import assert_final_model, tiny_model, train_lines
from harness.training import optimizer_step

pytestmark = pytest.mark.usefixtures("one_thread")


def reward_step(model, optimizer, batch, step, args, n_real_tokens=None):
    """One RL update as train_rl.main makes it: apply_reward's backward, then optimizer_step."""
    figures = train_rl.apply_reward(model, None, batch, args, torch.float32, n_real_tokens)
    optimizer_step(optimizer, step, args, figures["loss"])
    return figures


def test_group_advantages_on_hand_made_rewards():
    rewards = torch.tensor([[1., 0., 0., 1.], [0., 0., 0., 0.], [1., 1., 1., 1.], [1., 0., 0., 0.]])
    advantages, keep = train_rl.group_advantages(rewards)
    # all-wrong and all-right groups carry no signal
    assert keep.tolist() == [True, False, False, True]
    assert advantages.tolist() == [[.5, -.5, -.5, .5], [0.] * 4, [0.] * 4, [.75, -.25, -.25, -.25]]
    scaled, _ = train_rl.group_advantages(rewards, std_adv=True)
    assert scaled[0].tolist() == pytest.approx((advantages[0] / rewards[0].std()).tolist())
    assert scaled[3].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5])  # std of (1,0,0,0) is 0.5
    assert scaled[1].tolist() == [0.] * 4


def test_zero_variance_groups_are_skipped():
    """Only the groups whose rewards differ are trained on; with none, the weights do not move."""
    model = tiny_model(seed=1).requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    args = train_rl.get_args(["--group_size", "2", "--batch_size", "1", "--warmup", "1"])
    batch = dict(seqs=[[1, 2, 3, 4], [1, 2, 5, 6], [7, 8, 9], [7, 8, 10]], starts=[2, 2, 2, 2],
                 rewards=torch.tensor([[1., 1.], [0., 0.]]))
    before = [p.detach().clone() for p in model.parameters()]
    figures = reward_step(model, optimizer, batch, 0, args)
    assert figures["zero_var_frac"] == 1.0
    assert figures["reward"] == 0.5
    assert figures["pass_rate"] == 0.5
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    batch["rewards"] = torch.tensor([[1., 0.], [0., 0.]])
    figures = reward_step(model, optimizer, batch, 0, args)
    assert figures["zero_var_frac"] == 0.5
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_policy_loss_gradient_clipping_and_k3():
    """On-policy the gradient is -A/T on each token's log-prob; a reused batch is clipped; k3 >=
    0."""
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]], requires_grad=True)
    mask = torch.tensor([[1., 1., 1.], [1., 1., 0.]])
    advantages = torch.tensor([0.5, -1.0])
    loss, _ = train_rl.policy_loss(logprobs, logprobs.detach(), advantages, mask, 5, 0.2)
    loss.backward()
    assert torch.allclose(logprobs.grad, -advantages[:, None] * mask / 5)
    # a batch reused after the policy moved: a positive advantage stops pulling once the ratio
    # exceeds 1 + eps
    old = logprobs.detach() - torch.tensor([[0.5, 0.0, 0.1], [0.0, 0.0, 0.0]])  # e^0.5, 1, e^0.1
    logprobs.grad = None
    train_rl.policy_loss(logprobs, old, advantages, mask, 5, 0.2)[0].backward()
    assert logprobs.grad[0, 0] == 0
    assert logprobs.grad[0, 1] != 0
    assert logprobs.grad[0, 2] != 0
    ref = logprobs.detach() + torch.randn(2, 3)
    _, kl = train_rl.policy_loss(logprobs, logprobs.detach(), advantages, mask, 5, 0.2, ref, 0.1)
    assert kl > 0
    assert train_rl.policy_loss(logprobs, logprobs.detach(), advantages, mask, 5, 0.2,
                                logprobs.detach(), 0.1)[1] == 0


def test_rl_runs_logs_and_saves(prepared_data, byte_model, tmp_path, monkeypatch):
    """Two steps with a KL reference and PPO reuse. A random model is never right, so the grader is
    stubbed with one that rewards odd-length answers, which gives the groups some variance."""
    monkeypatch.setattr(train_rl, "gsm8k_reward", lambda text, gold: float(len(text) % 2))
    out = tmp_path / "rl"
    train_rl.main(["--model", str(byte_model()), "--out_dir", str(out), "--data_dir",
                   str(prepared_data), "--steps", "2", "--batch_size", "2", "--grad_accum", "1",
                   "--group_size", "4", "--max_new_tokens", "8", "--kl_coef", "0.1", "--ppo_epochs",
                   "2", "--eval_every", "0", "--save_every", "2"])
    assert_final_model(out, steps=2)
    for row in train_lines(out):
        assert {"reward", "pass_rate", "zero_var_frac", "response_len", "lr",
                "tokens_per_s"} <= row.keys()
        assert 0 < row["response_len"] <= 8
        assert row["zero_var_frac"] == 1.0 or {"entropy", "kl", "state_nll"} <= row.keys()
    assert (out / "checkpoints" / "step_0000002").exists()


def test_rl_raises_the_reward_of_a_tiny_model():
    """Learning test: reward = the fraction of sampled tokens that are token 7 (sampling from 16
    tokens, so a random model starts near 1/16); a dozen steps of apply_reward must push it well
    up."""
    torch.manual_seed(0)
    model = tiny_model(seed=3).requires_grad_(True)
    args = train_rl.get_args(["--lr", "1e-2", "--warmup", "1", "--steps", "12", "--group_size", "8",
                              "--batch_size", "4"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    prompts = [torch.randint(0, 512, (4,)).tolist() for _ in range(4)]
    rewards = []
    for step in range(args.steps):
        rows = [p for p in prompts for _ in range(args.group_size)]
        answers = model.generate(rows, 8, seed=step, n_real_tokens=16)
        reward = torch.tensor([sum(t == 7 for t in a) / len(a)
                               for a in answers]).view(len(prompts), args.group_size)
        batch = dict(seqs=[p + a for p, a in zip(rows, answers)], starts=[len(p) for p in rows],
                     rewards=reward)
        rewards.append(reward_step(model, optimizer, batch, step, args, 16)["reward"])
    assert rewards[0] < 0.2
    assert sum(rewards[-3:]) / 3 > 0.6
