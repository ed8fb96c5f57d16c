"""The trainers' losses against TRL 1.16's own code, on the same weights and the same tensors:
GRPOTrainer's advantages and its _compute_loss (loss_type "dapo": on-policy, PPO's clip on a
reused batch, the k3 KL) for train_rl.py; GRPO's loss with per-token advantages -(log π - log π_T)
for train_distill.py --signal token_kl, and GKDTrainer.generalized_jsd_loss (beta 0 and 1) for
--signal full_kl; SFTTrainer.compute_loss over micro-batches of unequal token counts (the
Trainer's own gradient accumulation) for train_sft.py. Gradients agree to rtol 1e-4: a
normalization slip (a mean per sequence for one per token, a count of one micro-batch for the
step's) moves them by a factor. Skipped without TRL (requirements-dev.txt)."""
from argparse import Namespace

import pytest
import torch

import train_distill
import train_rl
import train_sft
from conftest import tiny_model, write_byte_tokenizer
from model import Qwen3

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT_LEN = 5  # every prompt is this long, so TRL pads no prompt on the left
COMPLETION_LENS = [3, 7, 2, 5, 6, 1, 4, 7]  # two groups of four answers, unequal lengths


@pytest.fixture
def folders(tmp_path):
    """Three tiny models with the byte-level tokenizer: the policy (or student) as it starts, a
    teacher, and the policy after an update (the start plus small noise, to reuse a batch on)."""
    made = {}
    for name, seed in (("start", 1), ("teacher", 2), ("moved", 1)):
        model = tiny_model(seed=seed)
        if name == "moved":
            torch.manual_seed(7)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn_like(p))
        model.save_pretrained(tmp_path / name)
        write_byte_tokenizer(tmp_path / name / "tokenizer.json")
        made[name] = tmp_path / name
    return made


def the_batch(seed=0):
    """Token ids: PROMPT_LEN-token prompts, one per group of four, and answers of
    COMPLETION_LENS. Returns (seqs, starts), ours, and (prompt_ids, completion_ids,
    completion_mask), TRL's layout (answers right-padded with the pad token)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (PROMPT_LEN,), generator=g).tolist() for _ in range(2)]
    answers = [torch.randint(0, 256, (n,), generator=g).tolist() for n in COMPLETION_LENS]
    seqs = [prompts[i // 4] + a for i, a in enumerate(answers)]
    width = max(COMPLETION_LENS)
    completion_ids = torch.tensor([a + [PAD] * (width - len(a)) for a in answers])
    completion_mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answers])
    prompt_ids = torch.tensor([prompts[i // 4] for i in range(len(answers))])
    return (seqs, [PROMPT_LEN] * len(seqs)), (prompt_ids, completion_ids, completion_mask)


PAD = 256  # the byte tokenizer's <|endoftext|>


def hf_tokenizer(folder):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                               eos_token="<|endoftext|>",
                                               pad_token="<|endoftext|>")


def hf_model(folder):
    return transformers.Qwen3ForCausalLM.from_pretrained(folder, dtype=torch.float32)


REWARDS = []  # what the reward function returns next (TRL calls it with the completions)


def grpo_trainer(folder, tmp_path, **config):
    """A GRPOTrainer of TRL's, on the model in `folder`, rewarding the answers of a call with
    REWARDS; config: GRPOConfig's fields (loss_type dapo unless given)."""
    config = {"loss_type": "dapo", "num_generations": 4, "per_device_train_batch_size": 8,
              "max_completion_length": 4, "report_to": [], "use_cpu": True, "bf16": False,
              "logging_steps": 1, **config}
    trainer = trl.GRPOTrainer(
        model=hf_model(folder), processing_class=hf_tokenizer(folder),
        reward_funcs=[lambda completions, **kwargs: REWARDS[:len(completions)]],
        args=trl.GRPOConfig(output_dir=str(tmp_path / "trl"), **config),
        train_dataset=datasets.Dataset.from_dict({"prompt": ["ab"] * 8}))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop: one micro-batch
    return trainer


def trl_advantages(trainer, rewards):
    """TRL's advantages of these rewards (questions, group): its own _generate_and_score_
    completions, on answers it samples, scored with `rewards`."""
    REWARDS[:] = rewards.flatten().tolist()
    inputs = [{"prompt": p} for p in ("ab", "cd") for _ in range(rewards.shape[1])]
    return trainer._generate_and_score_completions(inputs)["advantages"].view(rewards.shape)


def trl_inputs(trainer, trl_batch, advantages):
    """_compute_loss's inputs for this batch, built as _generate_and_score_completions builds
    them (num_items_in_batch: the answer tokens of the batch)."""
    prompt_ids, completion_ids, completion_mask = trl_batch
    return dict(prompt_ids=prompt_ids, prompt_mask=torch.ones_like(prompt_ids),
                completion_ids=completion_ids, completion_mask=completion_mask,
                advantages=advantages, num_items_in_batch=completion_mask.sum())


def trl_logprobs(trainer, model, trl_batch):
    """log π of the answer tokens (B, L) under `model` at the trainer's temperature, by TRL's own
    _get_per_token_logps_and_entropies, without a gradient (as it computes old and ref ones)."""
    prompt_ids, completion_ids, completion_mask = trl_batch
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    with torch.no_grad():
        return trainer._get_per_token_logps_and_entropies(model, ids, mask,
                                                          completion_ids.shape[1])[0]


def assert_same_gradients(ours, theirs, rtol=1e-4):
    """Every weight's gradient, ours (model.py's, by its Hugging Face name) against theirs."""
    named = dict(theirs.named_parameters())
    ours_named = ours.hf_state_dict()
    assert named.keys() == ours_named.keys()
    for name, p in named.items():
        expected = p.grad
        assert expected is not None and expected.abs().max() > 0, name
        torch.testing.assert_close(ours_named[name].grad, expected, rtol=rtol,
                                   atol=rtol * expected.abs().max().item(), msg=name)


def learner(folder):
    return Qwen3.from_pretrained(folder).requires_grad_(True)


# train_rl.py against GRPOTrainer -----------------------------------------------------------------


@pytest.mark.parametrize("scale", ["none", "group"])
def test_group_advantages_are_trls(folders, tmp_path, scale):
    """TRL's advantages (scale_rewards "none": r - mean; "group": over the group's std + 1e-4)
    are ours (--std_adv: over the std itself), but for the epsilon; groups whose rewards are all
    equal get 0 on both sides, and TRL's share of them is our zero_var_frac."""
    trainer = grpo_trainer(folders["start"], tmp_path, scale_rewards=scale)
    rewards = torch.tensor([[1., 0., 0., 1.], [0.5, 0., 0., 0.], [1., 1., 1., 1.],
                            [0., 0., 0., 0.], [0.2, 0.9, 0.4, 0.4]])
    trainer.args.per_device_train_batch_size = rewards.numel()
    REWARDS[:] = rewards.flatten().tolist()
    inputs = [{"prompt": f"q{i}"} for i in range(len(rewards)) for _ in range(4)]
    theirs = trainer._generate_and_score_completions(inputs)["advantages"].view(rewards.shape)
    ours, keep = train_rl.group_advantages(rewards, std_adv=scale == "group")
    if scale == "group":  # TRL divides by std + 1e-4 where we divide by std
        std = rewards.std(1, keepdim=True)
        ours = torch.where(keep[:, None], ours * std / (std + 1e-4), ours)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert keep.tolist() == [True, True, False, False, True]
    assert trainer._metrics["train"]["frac_reward_zero_std"][-1] == pytest.approx(
        1 - keep.float().mean().item())


def rl_args(**flags):
    argv = ["--group_size", "4", "--batch_size", "1"]  # micro-batches: one group each
    for flag, value in flags.items():
        argv += [f"--{flag}", str(value)]
    return train_rl.get_args(argv)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_on_policy_loss_and_gradient_are_grpo_dapos(folders, tmp_path, temperature):
    """On-policy (old log-probs = the current ones), no KL: apply_reward's loss over two
    micro-batches of unequal token counts is TRL's dapo loss over the batch, and so is its
    gradient on every weight."""
    trainer = grpo_trainer(folders["start"], tmp_path, scale_rewards="none",
                           temperature=temperature)
    rewards = torch.tensor([[1., 0., 0., 1.], [0., 1., 0., 0.]])
    ours_batch, trl_batch = the_batch()
    advantages = trl_advantages(trainer, rewards)
    loss = trainer._compute_loss(trainer.model, trl_inputs(trainer, trl_batch,
                                                           advantages.flatten()))
    loss.backward()
    model = learner(folders["start"])
    figures = train_rl.apply_reward(model, None, dict(seqs=ours_batch[0], starts=ours_batch[1],
                                                      rewards=rewards),
                                    rl_args(temperature=temperature), torch.float32)
    assert figures["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert_same_gradients(model, trainer.model)


def test_a_reused_batch_is_clipped_as_trl_clips_it(folders, tmp_path):
    """--ppo_epochs 2: the second pass over a batch, after the weights moved, takes PPO's clipped
    ratio against the first pass's log-probs; TRL, given those as old_per_token_logps, gives the
    same loss and gradient, and its own count of clipped tokens shows the clip acting."""
    trainer = grpo_trainer(folders["start"], tmp_path, scale_rewards="none", epsilon=0.05)
    rewards = torch.tensor([[1., 0., 0., 1.], [0., 1., 0., 0.]])
    ours_batch, trl_batch = the_batch()
    inputs = trl_inputs(trainer, trl_batch, trl_advantages(trainer, rewards).flatten())
    inputs["old_per_token_logps"] = trl_logprobs(trainer, trainer.model, trl_batch)
    trainer.model.load_state_dict(hf_model(folders["moved"]).state_dict())
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    assert 0 < trainer._metrics["train"]["clip_ratio/region_mean"][-1] < 1
    batch = dict(seqs=ours_batch[0], starts=ours_batch[1], rewards=rewards)
    args = rl_args(ppo_epochs=2, clip_eps=0.05)
    train_rl.apply_reward(learner(folders["start"]), None, batch, args, torch.float32)  # pass 1
    model = learner(folders["moved"])  # the weights after pass 1's update
    figures = train_rl.apply_reward(model, None, batch, args, torch.float32)  # pass 2
    assert figures["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert_same_gradients(model, trainer.model)


def test_the_k3_kl_penalty_is_trls(folders, tmp_path):
    """--kl_coef 0.1 against the starting model: TRL's beta 0.1 with its reference model (loaded
    by TRL from the same folder), without the importance-sampling factor on the KL
    (use_bias_correction_kl=False; on-policy it is 1 in value but not in gradient)."""
    trainer = grpo_trainer(folders["start"], tmp_path, scale_rewards="none", beta=0.1,
                           use_bias_correction_kl=False)
    trainer.model.load_state_dict(hf_model(folders["moved"]).state_dict())  # moved from start
    rewards = torch.tensor([[1., 0., 0., 1.], [0., 1., 0., 0.]])
    ours_batch, trl_batch = the_batch()
    inputs = trl_inputs(trainer, trl_batch, trl_advantages(trainer, rewards).flatten())
    inputs["ref_per_token_logps"] = trl_logprobs(trainer, trainer.ref_model, trl_batch)
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    model = learner(folders["moved"])
    figures = train_rl.apply_reward(model, Qwen3.from_pretrained(folders["start"]),
                                    dict(seqs=ours_batch[0], starts=ours_batch[1],
                                         rewards=rewards), rl_args(kl_coef=0.1), torch.float32)
    assert figures["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert figures["kl"] == pytest.approx(trainer._metrics["train"]["kl"][-1], rel=1e-5)
    assert_same_gradients(model, trainer.model)


def test_equal_reward_groups_are_skipped_here_and_counted_in_trls_mean(folders, tmp_path):
    """By design: a group whose rewards are all equal has advantage 0 on both sides, but TRL's
    dapo mean still counts its tokens where we skip the group. So our gradient is TRL's times
    (all tokens / the kept groups' tokens), exactly."""
    trainer = grpo_trainer(folders["start"], tmp_path, scale_rewards="none")
    rewards = torch.tensor([[1., 0., 0., 1.], [0., 0., 0., 0.]])
    ours_batch, trl_batch = the_batch()
    inputs = trl_inputs(trainer, trl_batch, trl_advantages(trainer, rewards).flatten())
    trainer._compute_loss(trainer.model, inputs).backward()
    model = learner(folders["start"])
    train_rl.apply_reward(model, None, dict(seqs=ours_batch[0], starts=ours_batch[1],
                                            rewards=rewards), rl_args(), torch.float32)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.grad *= sum(COMPLETION_LENS) / sum(COMPLETION_LENS[:4])
    assert_same_gradients(model, trainer.model)


# train_distill.py against GRPO's loss (token_kl) and GKD's (full_kl) ---------------------------


def distill_args(signal, temperature, direction="reverse"):
    return train_distill.get_args(["--teacher", "x", "--signal", signal, "--batch_size", "3",
                                   "--temperature", str(temperature), "--kl_direction",
                                   direction])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_kl_is_grpos_loss_with_per_token_advantages(folders, tmp_path, temperature):
    """--signal token_kl is a policy gradient with advantage -(log π - log π_T) at each token:
    TRL's dapo loss given those (B, L) advantages has apply_teacher's gradient."""
    trainer = grpo_trainer(folders["start"], tmp_path, temperature=temperature)
    teacher = hf_model(folders["teacher"])
    trl.trainer.utils.add_fused_lm_head(teacher, temperature=temperature)  # as for TRL's ref
    ours_batch, trl_batch = the_batch()
    student_logprobs = trl_logprobs(trainer, trainer.model, trl_batch)
    teacher_logprobs = trl_logprobs(trainer, teacher, trl_batch)
    advantages = -(student_logprobs - teacher_logprobs) * trl_batch[2]
    trainer._compute_loss(trainer.model, trl_inputs(trainer, trl_batch, advantages)).backward()
    student = learner(folders["start"])
    batch = dict(seqs=ours_batch[0], starts=ours_batch[1], signal_starts=ours_batch[1],
                 answer_len=0.0)
    train_distill.apply_teacher(student, Qwen3.from_pretrained(folders["teacher"]), batch,
                                distill_args("token_kl", temperature), torch.float32)
    assert_same_gradients(student, trainer.model)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("direction,beta", [("reverse", 1.0), ("forward", 0.0)])
def test_full_kl_is_gkds_generalized_jsd(folders, direction, beta, temperature):
    """--signal full_kl, the exact KL over the vocabulary at every answer token, reverse
    (student || teacher) or forward: GKD's generalized_jsd_loss at beta 1 or 0 over the
    teacher's and the student's logits (mean over the answer tokens), value and gradient, with
    apply_teacher's micro-batches of unequal token counts."""
    from trl.experimental.gkd import GKDTrainer
    (seqs, starts), (prompt_ids, completion_ids, completion_mask) = the_batch()
    ids = torch.cat([prompt_ids, completion_ids], 1)
    labels = ids.masked_fill(torch.cat([torch.zeros_like(prompt_ids), completion_mask], 1) == 0,
                             -100)
    student_hf, teacher_hf = hf_model(folders["start"]), hf_model(folders["teacher"])
    with torch.no_grad():
        teacher_logits = teacher_hf(ids).logits
    loss = GKDTrainer.generalized_jsd_loss(student_hf(ids).logits[:, :-1],
                                           teacher_logits[:, :-1], labels=labels[:, 1:],
                                           beta=beta, temperature=temperature)
    loss.backward()
    student = learner(folders["start"])
    figures = train_distill.apply_teacher(
        student, Qwen3.from_pretrained(folders["teacher"]),
        dict(seqs=seqs, starts=starts, signal_starts=starts, answer_len=0.0),
        distill_args("full_kl", temperature, direction), torch.float32)
    assert figures["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert figures["kl"] == pytest.approx(loss.item(), rel=1e-5)
    assert_same_gradients(student, student_hf)


# train_sft.py against SFTTrainer ------------------------------------------------------------------


def test_sft_loss_and_accumulated_gradient_are_sfttrainers(folders, tmp_path):
    """fit_states over micro-batches of 3, 3 and 2 sequences (unequal token counts): the NLL
    averaged over all of the step's answer tokens, as SFTTrainer.compute_loss gives it through
    the Trainer's own gradient accumulation (num_items_in_batch, training_step) over the same
    micro-batches; the gradients agree."""
    tokenizer = hf_tokenizer(folders["start"])
    trainer = trl.SFTTrainer(
        model=hf_model(folders["start"]), processing_class=tokenizer,
        args=trl.SFTConfig(output_dir=str(tmp_path / "sft"), report_to=[], use_cpu=True,
                           per_device_train_batch_size=3, gradient_accumulation_steps=3,
                           bf16=False),
        train_dataset=datasets.Dataset.from_dict({"text": ["ab"] * 8}))
    (seqs, starts), _ = the_batch()
    micro = [[{"input_ids": s, "labels": [-100] * st + s[st:]} for s, st in
              zip(seqs[i:i + 3], starts[i:i + 3])] for i in range(0, len(seqs), 3)]
    batches = [trainer.data_collator(examples) for examples in micro]
    n_items = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
    assert n_items == sum(COMPLETION_LENS)
    trainer.current_gradient_accumulation_steps = len(batches)
    trl_loss = sum(trainer.training_step(trainer.model, b, n_items).item() for b in batches)
    model = learner(folders["start"])
    args = Namespace(batch_size=3)
    loss = train_sft.fit_states(model, seqs, starts, args, torch.float32)
    assert loss == pytest.approx(trl_loss, rel=1e-5)
    assert_same_gradients(model, trainer.model)
