"""The course (course/, docs/course.md): each exercise's grader passes the project's own function
and rejects each of its mutants, the plausible wrong implementations kept beside it; a stub has its
solution's signature and, as shipped, fails every check of its grader in one line that names the
exercise; `python -m pytest course` (and `--solutions`) run as a student runs them; course/run.py
stops on a stub before any work. Slow: course/run.py on the lab's miniature, where the project's
functions in the student's place give the project's run bit for bit and a mutant another; the
notebook executed end to end (its outputs stripped in git: a fast test)."""
import inspect
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, load_script

COURSE = ROOT / "course"
sys.path.insert(0, str(COURSE))
import grading  # noqa: E402  (course/grading.py: the exercises and their graders)

EXERCISES = grading.EXERCISES
MUTANTS = [(exercise, mutant) for exercise in EXERCISES
           for mutant in grading.grader(exercise).MUTANTS]


def test_eight_exercises_one_file_each():
    assert [int(name[2:].split("_")[0]) for name in EXERCISES] == list(range(1, 9))
    for exercise in EXERCISES:
        assert (COURSE / f"test_{exercise}.py").exists(), f"{exercise} has no grader"
        assert len(grading.grader(exercise).MUTANTS) >= 2, f"{exercise}: fewer than 2 mutants"


@pytest.mark.parametrize("exercise", EXERCISES)
def test_the_grader_passes_the_projects_own_function(exercise):
    assert grading.failures(exercise, grading.function_of(exercise, solution=True)) == []


@pytest.mark.parametrize("exercise,mutant", MUTANTS,
                         ids=[f"{e}-{m.__name__.removeprefix('mutant_')}" for e, m in MUTANTS])
def test_the_grader_rejects_the_mutant(exercise, mutant):
    """By an assertion of some check (a wrong number), not a crash."""
    assert grading.failures(exercise, mutant) != [], f"{mutant.__name__} passes every check"


@pytest.mark.parametrize("exercise", EXERCISES)
def test_a_stub_has_its_solutions_signature(exercise):
    """So that course/run.py can swap it in where the project calls its own."""
    def parameters(function):
        return [(parameter.name, parameter.kind, parameter.default)
                for parameter in inspect.signature(function).parameters.values()]
    assert parameters(grading.function_of(exercise)) == parameters(
        grading.function_of(exercise, solution=True))


@pytest.mark.parametrize("exercise", EXERCISES)
def test_a_stub_as_shipped_fails_every_check_naming_the_exercise(exercise):
    stub = grading.function_of(exercise)
    number = int(exercise[2:].split("_")[0])
    for check in grading.grader(exercise).CHECKS:
        try:
            check(stub)
        except NotImplementedError as error:
            assert f"exercise {number} (course/{exercise}.py)" in str(error)
        else:
            pytest.skip(f"course/{exercise}.py is written (no longer the stub as shipped)")


def is_a_stub(exercise) -> bool:
    try:
        grading.failures(exercise, grading.function_of(exercise))
    except NotImplementedError:
        return True
    return False


def pytest_course(*flags):
    done = subprocess.run([sys.executable, "-m", "pytest", "course", "-p", "no:cacheprovider",
                           *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def test_pytest_course_grades_the_stubs_and_the_solutions():
    """As a student runs them: the stubs fail, each test in one line naming its exercise; with
    --solutions every check passes."""
    n_checks = sum(len(grading.grader(e).CHECKS) for e in EXERCISES)
    code, out = pytest_course("--solutions")
    assert code == 0 and f"{n_checks} passed" in out, out[-2000:]
    stubs = [e for e in EXERCISES if is_a_stub(e)]
    code, out = pytest_course(*[f"course/test_{e}.py" for e in stubs])
    if not stubs:
        pytest.skip("every exercise is written")
    n_stub_checks = sum(len(grading.grader(e).CHECKS) for e in stubs)
    assert code == 1 and f"{n_stub_checks} failed" in out, out[-2000:]
    for exercise in stubs:
        lines = re.findall(rf"^exercise \d \(course/{exercise}\.py\): .*$", out, re.M)
        assert len(lines) == len(grading.grader(exercise).CHECKS), exercise
    assert "Traceback" not in out and "NotImplementedError" not in out


def test_run_py_stops_on_a_stub_before_any_work(tmp_path, monkeypatch):
    course_run = load_script("course/run.py")

    def not_written(*args, **kwargs):  # exercise 4 as shipped (the student's may be written)
        raise NotImplementedError("exercise 4 (course/ex4_group_advantages.py): group_advantages "
                                  "is not written yet")
    monkeypatch.setattr(course_run.grading, "function_of",
                        lambda exercise, solution=False: not_written)
    with pytest.raises(SystemExit, match=r"exercise 4 \(course/ex4_group_advantages\.py\): "
                                         r".* not written yet: write it first"):
        course_run.main(["rl", "--mini", "--out", str(tmp_path / "course")])
    assert not (tmp_path / "course").exists()


def test_the_notebooks_outputs_are_stripped_in_git():
    notebook = json.loads((COURSE / "lab.ipynb").read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and all(cell["outputs"] == [] and cell["execution_count"] is None
                        for cell in code)
    assert "widgets" not in notebook["metadata"]


# Slow: training -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_run_py_on_the_miniature_swaps_the_function_in(tmp_path, monkeypatch, capsys):
    """With the project's functions in the student's place, the run and its eval are the lab's
    own, bit for bit; with a mutant (exercise 1: each answer's mean NLL, then their mean), the
    run is trained anyway, after a warning, and ends elsewhere. (SFT: in the miniature, RL's
    few groups all have equal rewards, so its run would not move whatever the function.)"""
    course_run = load_script("course/run.py")
    out = tmp_path / "course"
    rows = course_run.main(["sft", "--mini", "--solutions", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rows["yours"] == rows["the project's"]
    assert "<- the figure that matters" in printed and "the project's again" in printed
    folder = out / "b1" / "seed3"
    base = (out / "b1" / "base" / "model.safetensors").read_bytes()
    weights = (folder / "sft_mild" / "model.safetensors").read_bytes()
    assert weights != base  # the run trained
    assert (folder / "course" / "sft" / "model.safetensors").read_bytes() == weights
    assert (json.loads((folder / "results" / "course" / "sft.json").read_text())["tasks"]
            == json.loads((folder / "results" / "sft_mild.json").read_text())["tasks"])
    # a mutant of exercise 1 in the student's place
    mutant = grading.grader("ex1_target_nll").mutant_a_mean_over_sequences
    projects = grading.function_of

    def a_mutant_in_exercise_1(exercise, solution=False):
        return mutant if exercise == "ex1_target_nll" else projects(exercise, solution=True)
    monkeypatch.setattr(course_run.grading, "function_of", a_mutant_in_exercise_1)
    course_run.main(["sft", "--mini", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "warning: your mutant_a_mean_over_sequences fails check_" in printed
    assert "replacing your last run" in printed
    assert (folder / "course" / "sft" / "model.safetensors").read_bytes() != weights


@pytest.mark.slow
def test_the_notebook_runs_the_miniature_lab_end_to_end(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("LAB_OUT", str(tmp_path / "lab"))
    notebook = nbformat.read(COURSE / "lab.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(COURSE)}}).execute()
    assert (tmp_path / "lab" / "lab.png").exists() and (tmp_path / "lab" / "table.md").exists()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure drawn"
    assert not any(o.get("output_type") == "error" for o in outputs)
