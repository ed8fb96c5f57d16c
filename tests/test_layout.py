"""The house a student walks into: the top level holds the design card's files and the scripts a
user runs, model.py stands alone, every import goes down README's layers (so never in a circle),
a trainer imports at most five project modules, and every documented script answers --help.
The imports are read from the source (ast), each import statement wherever it stands, so that an
import inside a function counts as much as one at the top."""
import ast
import re
import subprocess
import sys

import pytest

from conftest import ROOT

TRAINERS = ("train_sft.py", "train_rl.py", "train_distill.py")
MODEL_MAY_IMPORT = {"torch", "safetensors", "tokenizers", "huggingface_hub"}
MAX_TOP_LEVEL = 9  # the card's six, bench.py and plot.py, and one to spare
MAX_TRAINER_IMPORTS = 5


def project_files() -> list:
    """Every Python file of the project but its tests, as paths relative to the root. course/'s
    graders (test_*.py, conftest.py and their grading.py) are tests; its exercises and run.py are
    not."""
    course = [p for p in ROOT.glob("course/*.py")
              if not p.name.startswith("test_") and p.name not in ("conftest.py", "grading.py")]
    found = [*ROOT.glob("*.py"), *ROOT.glob("harness/*.py"), *ROOT.glob("runs/*.py"),
             *ROOT.glob("data/*.py"), *course]
    return sorted(p.relative_to(ROOT).as_posix() for p in found)


def module_names(files) -> dict:
    """The name each file is imported by -> the file: top-level files, runs/ and course/ scripts
    by their stem (each puts its own folder on the path), harness/ files as harness.NAME."""
    names = {}
    for file in files:
        stem = file.rsplit("/", 1)[-1][:-3]
        if file.startswith("harness/"):
            names["harness" if stem == "__init__" else f"harness.{stem}"] = file
        elif file.startswith(("runs/", "data/", "course/")) or "/" not in file:
            names[stem] = file
    return names


def imported_names(file) -> list:
    """The modules a file's import statements name (`from harness import cli` names harness.cli
    and harness), top-level and nested alike."""
    tree = ast.parse((ROOT / file).read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def project_imports(file, names) -> set:
    """The project files `file` imports."""
    return {names[n] for n in imported_names(file) if n in names and names[n] != file}


def readme_layers() -> list:
    """README's layers, top to bottom: a list of sets of files."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- LAYERS begin -->\n```text\n(.*?)```\n<!-- LAYERS end -->", text, re.S)
    assert block, "README.md has no LAYERS block"
    return [set(line.split()) for line in block.group(1).splitlines() if line.strip()]


def test_the_top_level_is_the_cards_files_and_the_scripts_a_user_runs():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, top
    card = {"model.py", "sample.py", "train_sft.py", "train_rl.py", "train_distill.py", "eval.py"}
    assert card <= set(top)
    # one folder for the machinery: no other package beside it
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert packages == ["harness"]


def test_model_py_imports_only_torch_safetensors_tokenizers_huggingface_hub():
    roots = {name.split(".")[0] for name in imported_names("model.py")}
    outside = roots - set(sys.stdlib_module_names) - MODEL_MAY_IMPORT
    assert outside == set()


def test_no_import_cycle():
    names = module_names(project_files())
    graph = {file: project_imports(file, names) for file in project_files()}
    done, on_path = set(), []

    def visit(file):  # depth first: a file met again on the current path closes a cycle
        if file in on_path:
            cycle = on_path[on_path.index(file):] + [file]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if file in done:
            return
        on_path.append(file)
        for imported in sorted(graph[file]):
            visit(imported)
        on_path.pop()
        done.add(file)
    for file in graph:
        visit(file)


def test_every_import_goes_down_readmes_layers():
    layers = readme_layers()
    files = project_files()
    layer_of = {file: i for i, layer in enumerate(layers) for file in layer}
    unplaced = [f for f in files if f not in layer_of and not f.endswith("__init__.py")]
    assert unplaced == [], "files in no layer of README's LAYERS block"
    assert sorted(layer_of) == sorted(f for f in layer_of if (ROOT / f).exists()), "stale names"
    names = module_names(files)
    upward = [f"{file} imports {imported}" for file in files if file in layer_of
              for imported in sorted(project_imports(file, names))
              if imported in layer_of and layer_of[imported] < layer_of[file]]
    assert upward == []


@pytest.mark.parametrize("trainer", TRAINERS)
def test_a_trainer_imports_at_most_five_project_modules(trainer):
    names = module_names(project_files())
    # harness.training names the module; `from harness import x` would name harness.x instead
    imported = {n for n in imported_names(trainer) if n in names and n != "harness"}
    assert len(imported) <= MAX_TRAINER_IMPORTS, sorted(imported)
    assert len((ROOT / trainer).read_text().splitlines()) <= 250


def test_the_sampler_is_model_pys_alone():
    """One run-time top-k/top-p draw: model.py's, sort-free. The sort-based definition lives in
    the tests only (test_model.py's sorted_reference)."""
    defining = [file for file in project_files()
                if re.search(r"^(def nucleus_draw|class SortedOrder|def \w*sort\w*_draw)\b",
                             (ROOT / file).read_text(encoding="utf-8"), re.M)]
    assert defining == ["model.py"]
    assert "def sorted_nucleus_draw" not in (ROOT / "model.py").read_text()


def documented_scripts() -> list:
    """Every `python SCRIPT` that README.md and docs/ print, as paths relative to the root (not
    the test files that `python -m pytest` is given)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = set()
    for page in pages:
        found |= set(re.findall(r"python (?:-m (?!pytest)\S+ )?([\w/]+\.py)\b", page.read_text()))
    return sorted(found)


# Runs each script's --help in one child process (one torch import for all): run as __main__
# from its own folder, as `python SCRIPT --help` would, its output and exit status kept
HELP_ALL = """
import contextlib, io, json, os, runpy, sys
results = {}
for script in sys.argv[1:]:
    out = io.StringIO()
    sys.argv, sys.path[0] = [script, "--help"], os.path.dirname(os.path.abspath(script))
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
        status = 0
    except SystemExit as e:
        status = e.code or 0
    results[script] = {"status": status, "help": out.getvalue()}
print(json.dumps(results))
"""


def test_every_documented_script_exists_and_answers_help():
    import json
    scripts = documented_scripts()
    assert scripts and set(scripts) <= set(project_files()), scripts
    done = subprocess.run([sys.executable, "-c", HELP_ALL, *scripts], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.splitlines()[-1])
    silent = [s for s, r in results.items() if r["status"] != 0 or "usage:" not in r["help"]]
    assert silent == []
