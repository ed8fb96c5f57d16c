"""Grader of exercise 4, group_advantages: GRPO's advantages against a plain loop over groups
(statistics' mean and sample std, as TRL's GRPO takes torch's std) on random rewards, with and
without std_adv; groups of equal rewards (0, 1, or a tie at 0.5) skipped with advantages exactly 0;
fractional rewards and ties; the shapes and types the trainer relies on."""
import statistics

import torch

from grading import close, generator, parts, same

EXERCISE = "ex4_group_advantages"


def loop_advantages(rewards, std_adv):
    """(advantages, keep), one group at a time."""
    advantages, keep = [], []
    for group in rewards.tolist():
        mean = statistics.mean(group)
        std = statistics.stdev(group)
        scale = max(std, 1e-6) if std_adv else 1.0
        advantages.append([(r - mean) / scale for r in group])
        keep.append(std > 0)
    return torch.tensor(advantages), torch.tensor(keep)


def graded_against_the_loop(group_advantages, rewards, std_adv, what):
    advantages, keep = parts(group_advantages(rewards, std_adv=std_adv), 2,
                             "group_advantages returns (advantages, keep)")
    expected, expected_keep = loop_advantages(rewards, std_adv)
    assert isinstance(keep, torch.Tensor) and keep.dtype == torch.bool, (
        f"keep is a bool tensor (the trainer indexes the answers with it), got "
        f"{getattr(keep, 'dtype', type(keep).__name__)}")
    same(keep, expected_keep, f"keep of {what} (True where a group's rewards differ)")
    close(advantages, expected, f"the advantages of {what}{' (std_adv)' if std_adv else ''}")
    return advantages


def check_random_right_and_wrong_answers(group_advantages):
    """6 questions x 8 answers of reward 0 or 1, some groups all right or all wrong."""
    rewards = (torch.rand(6, 8, generator=generator(0)) < 0.5).float()
    rewards[1] = 0.0
    rewards[4] = 1.0
    graded_against_the_loop(group_advantages, rewards, False, "random 0/1 rewards")


def check_std_adv_divides_by_the_sample_std(group_advantages):
    rewards = (torch.rand(5, 8, generator=generator(1)) < 0.3).float()
    rewards[2] = 0.0
    graded_against_the_loop(group_advantages, rewards, True, "random 0/1 rewards")


def check_equal_rewards_teach_nothing(group_advantages):
    """Groups all wrong, all right, all 0.5: advantages exactly 0 (not NaN, also with std_adv,
    where the std is 0) and keep False; a group of two that differs is kept."""
    rewards = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    for std_adv in (False, True):
        advantages = graded_against_the_loop(group_advantages, rewards, std_adv,
                                             "groups of equal rewards")
        assert torch.equal(advantages[:3], torch.zeros(3, 2)), (
            f"the advantages of groups of equal rewards are exactly 0, got "
            f"{advantages[:3].tolist()}")


def check_fractional_rewards_and_ties(group_advantages):
    """Rewards between 0 and 1 with ties inside groups; each group's advantages sum to 0."""
    rewards = torch.tensor([[0.5, 0.5, 1.0, 0.0], [0.25, 0.75, 0.75, 0.25], [0.1, 0.1, 0.1, 0.9]])
    for std_adv in (False, True):
        advantages = graded_against_the_loop(group_advantages, rewards, std_adv,
                                             "fractional rewards with ties")
        close(advantages.sum(1), torch.zeros(3), "each group's advantages summed")


def check_one_question(group_advantages):
    """A batch of one question: shapes (1, G) and (1,)."""
    graded_against_the_loop(group_advantages, torch.tensor([[1.0, 0.0, 0.0]]), True,
                            "one question")


CHECKS = [check_random_right_and_wrong_answers, check_std_adv_divides_by_the_sample_std,
          check_equal_rewards_teach_nothing, check_fractional_rewards_and_ties,
          check_one_question]


def test_group_advantages(check, graded):
    check(graded)


# Plausible wrong implementations; each fails a check above (tests/test_course.py) -------------

def advantages_with(rewards, std_adv, batch_mean=False, epsilon=1e-6, unbiased=True, skip=True):
    """Group advantages with a switch for each mistake below."""
    baseline = rewards.mean() if batch_mean else rewards.mean(1, keepdim=True)
    advantages = rewards - baseline
    std = rewards.std(1, keepdim=True, unbiased=unbiased)
    if std_adv:
        advantages = advantages / (std.clamp(min=epsilon) if epsilon else std)
    keep = std.squeeze(1) > 0 if skip else torch.ones(len(rewards), dtype=torch.bool)
    return advantages, keep


def mutant_a_baseline_over_the_whole_batch(rewards, std_adv=False):
    """The mean reward of every answer to every question: not each question's own baseline."""
    return advantages_with(rewards, std_adv, batch_mean=True)


def mutant_the_std_without_its_epsilon(rewards, std_adv=False):
    """Divides by the std as it is: 0 / 0 for a group of equal rewards."""
    return advantages_with(rewards, std_adv, epsilon=None)


def mutant_the_population_std(rewards, std_adv=False):
    """Divides by G, not G - 1."""
    return advantages_with(rewards, std_adv, unbiased=False)


def mutant_every_group_kept(rewards, std_adv=False):
    """Right advantages, but the groups that teach nothing are not skipped."""
    return advantages_with(rewards, std_adv, skip=False)


MUTANTS = [mutant_a_baseline_over_the_whole_batch, mutant_the_std_without_its_epsilon,
           mutant_the_population_std, mutant_every_group_kept]
