"""What the graders (course/test_ex*.py) share: the exercises, the function a grader checks (yours,
or the project's own with --solutions), an exercise's checks run on any function, and the
comparisons they make, each failing with a message that says what differs.

    function_of("ex4_group_advantages")                 # yours: course/ex4_group_advantages.py's
    function_of("ex4_group_advantages", solution=True)  # the project's: group_advantages
    failures("ex4_group_advantages", my_function)       # [(check, message)] of the checks failed
"""
import importlib
from pathlib import Path

import torch

COURSE = Path(__file__).resolve().parent
# ex1_target_nll, ..., ex8_next_token_kl: each a file with one function to write
EXERCISES = sorted((p.stem for p in COURSE.glob("ex[0-9]*_*.py")),
                   key=lambda stem: int(stem[2:].split("_")[0]))


def function_of(exercise: str, solution: bool = False):
    """The function an exercise asks for: course/<exercise>.py's, or with solution=True the
    project's own, which the exercise's SOLUTION names ("train_rl.group_advantages")."""
    stub = importlib.import_module(exercise)
    module, name = stub.SOLUTION.rsplit(".", 1)
    return getattr(importlib.import_module(module) if solution else stub, name)


def grader(exercise: str):
    """course/test_<exercise>.py: its CHECKS and MUTANTS."""
    return importlib.import_module(f"test_{exercise}")


def failures(exercise: str, function) -> list:
    """(check's name, message) for each check of the exercise's grader that `function` fails. A
    stub's NotImplementedError, or any other error, is not caught: no answer, not a wrong one."""
    found = []
    for check in grader(exercise).CHECKS:
        try:
            check(function)
        except AssertionError as error:
            found.append((check.__name__, str(error)))
    return found


# The comparisons ---------------------------------------------------------------------------------

def numbers(value, what) -> torch.Tensor:
    """value (a tensor, a number, a list of them, a numpy array) as a float64 tensor."""
    try:
        return torch.as_tensor(value).detach().to(torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise AssertionError(f"{what}: expected numbers, got {type(value).__name__}") from None


def shown(values: torch.Tensor) -> str:
    return f"{values.item():.6g}" if values.numel() == 1 else str(values.tolist())


def close(actual, expected, what, rtol=1e-5, atol=1e-6):
    """actual equals expected to float32 precision (shapes too), or an AssertionError naming
    what and where they differ."""
    got = numbers(actual, what)
    want = numbers(expected, what)
    assert got.shape == want.shape, (f"{what}: shape {tuple(got.shape)}, expected "
                                     f"{tuple(want.shape)}")
    if torch.allclose(got, want, rtol=rtol, atol=atol):
        return
    if got.numel() <= 12:
        raise AssertionError(f"{what}: got {shown(got)}, expected {shown(want)}")
    where = (got - want).abs().nan_to_num(float("inf")).argmax()
    index = tuple(int(i) for i in torch.unravel_index(where, got.shape))
    differ = int((~torch.isclose(got, want, rtol, atol)).sum())
    raise AssertionError(f"{what}: at {index} got {got[index].item():.6g}, expected "
                         f"{want[index].item():.6g} ({differ} of {got.numel()} values differ)")


def same(actual, expected, what):
    """Two masks (or integer tensors) equal, or an AssertionError."""
    got = torch.as_tensor(actual)
    assert got.shape == expected.shape and torch.equal(got.to(expected.dtype), expected), (
        f"{what}: got {got.int().tolist()}, expected {expected.int().tolist()}")


def gradient(value, wrt, what) -> torch.Tensor:
    """d value / d wrt (a leaf tensor with requires_grad); an AssertionError if value carries no
    gradient at all (detached, or made a number with .item())."""
    assert isinstance(value, torch.Tensor) and value.requires_grad, (
        f"{what} carries no gradient: is it detached, or turned into a number (.item(), float)?")
    (grad,) = torch.autograd.grad(value, wrt, retain_graph=True, allow_unused=True)
    return torch.zeros_like(wrt) if grad is None else grad


def parts(returned, n: int, what):
    """A function's returned tuple of n parts, or an AssertionError saying what it should be."""
    assert isinstance(returned, tuple) and len(returned) == n, (
        f"{what}: got {type(returned).__name__}"
        + (f" of {len(returned)}" if isinstance(returned, tuple) else ""))
    return returned


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
