"""The graders' switch. `python -m pytest course` grades your functions, course/ex*.py; `python -m
pytest course --solutions` grades the project's own, which each exercise's SOLUTION names.

Each grader, course/test_<exercise>.py, lists its checks (CHECKS: one test each, named after it)
and the plausible wrong implementations that its checks reject (MUTANTS); the project's own suite
(tests/test_course.py) runs every grader on the project's function, which passes, and on each
mutant, which fails."""
import functools

import pytest

import grading


def pytest_addoption(parser):
    parser.addoption("--solutions", action="store_true",
                     help="grade the project's own functions (the reference solutions) in place "
                          "of course/ex*.py")


def pytest_generate_tests(metafunc):
    """One test per check of the module's grader."""
    if "check" in metafunc.fixturenames:
        checks = metafunc.module.CHECKS
        metafunc.parametrize("check", checks,
                             ids=[check.__name__.removeprefix("check_") for check in checks])


@pytest.fixture
def graded(request):
    """The function the grader checks: yours, or with --solutions the project's. A stub's
    NotImplementedError fails the test in one line, naming the exercise."""
    function = grading.function_of(request.module.EXERCISE,
                                   solution=request.config.getoption("solutions"))

    @functools.wraps(function)
    def called(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except NotImplementedError as error:
            not_written = str(error)
        pytest.fail(not_written, pytrace=False)  # outside the except: one line, no traceback
    return called
