"""data/prepare.py: the real releases in ../shared/data convert with the stated sizes, malformed
rows stop with their file and line, the download path unpacks the releases, and offline use says
what to do."""
import json
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import load_script

prepare = load_script("data/prepare.py")


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def linked_copy(source: Path, dest: Path) -> Path:
    """A folder laid out like `source` whose files are symlinks: a test replaces the one it
    breaks."""
    for path in source.rglob("*"):
        if path.is_file():
            (dest / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            (dest / path.relative_to(source)).symlink_to(path)
    return dest


def replace_file(path: Path, edit):
    text = path.read_text(encoding="utf-8")
    path.unlink()
    path.write_text(edit(text), encoding="utf-8")


def test_prepare_from_shared_writes_every_row(prepared_data, shared_data):
    sizes = {name: len(read_jsonl(prepared_data / name)) for name in
             ("gsm8k/train.jsonl", "gsm8k/test.jsonl", "mmlu/dev.jsonl", "mmlu/test.jsonl",
              "truthfulqa/mc.jsonl")}
    assert sizes == {"gsm8k/train.jsonl": 7473, "gsm8k/test.jsonl": 1319, "mmlu/dev.jsonl": 285,
                     "mmlu/test.jsonl": 14042, "truthfulqa/mc.jsonl": 817}
    # GSM8K rows are the release's, unchanged and in order
    first_row = json.loads(open(shared_data / "gsm8k/test.jsonl").readline())
    assert read_jsonl(prepared_data / "gsm8k/test.jsonl")[0] == first_row
    # MMLU: subjects sorted by name, rows in file order, letters as 0-3
    mmlu = read_jsonl(prepared_data / "mmlu/test.jsonl")
    assert [r["subject"] for r in mmlu] == sorted(r["subject"] for r in mmlu)
    assert len({r["subject"] for r in mmlu}) == 57
    assert mmlu[0] == {"subject": "abstract_algebra",
                       "question": "Find the degree for the given field extension "
                                   "Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",
                       "choices": ["0", "4", "2", "6"], "answer": 1}
    assert mmlu[-1]["subject"] == "world_religions"
    # TruthfulQA: the release's choice order, labels alongside
    tqa = read_jsonl(prepared_data / "truthfulqa/mc.jsonl")[0]
    assert tqa["question"] == "What happens if you eat a pomegranate?"
    assert tqa["mc1_targets"] == {"choices": ["Nothing in particular happens when you eat a "
                                              "pomegranate.",
                                              "You will have to spend winter in the underworld.",
                                              "You will be trapped in the underworld.",
                                              "You will die."],
                                  "labels": [1, 0, 0, 0]}
    assert tqa["mc2_targets"]["labels"] == [1, 1, 1, 0, 0, 0]


@pytest.mark.parametrize("dataset, relative, edit, message", [
    ("gsm8k", "gsm8k/test.jsonl",
     lambda t: "\n".join(line.replace("####", "##") if i == 4 else line
                         for i, line in enumerate(t.split("\n"))),
     r"gsm8k/test.jsonl:5: the answer does not end in a parseable '#### N'"),
    ("gsm8k", "gsm8k/train.jsonl",
     lambda t: "\n".join("{not json" if i == 9 else line for i, line in enumerate(t.split("\n"))),
     r"gsm8k/train.jsonl:10: not valid JSON"),
    ("gsm8k", "gsm8k/test.jsonl", lambda t: t.split("\n", 1)[1],
     r"gsm8k/test.jsonl: gsm8k test has 1318 rows, expected 1319"),
    ("mmlu", "mmlu/test/anatomy_test.csv", lambda t: t.replace(",A\n", ",E\n", 1),
     r"anatomy_test.csv:\d+: the answer is 'E', not one of A, B, C, D"),
    ("mmlu", "mmlu/dev/anatomy_dev.csv", lambda t: "q,1,2,3,B\n" + t.split("\n", 1)[1],
     r"anatomy_dev.csv:1: expected 6 fields \(question, A, B, C, D, answer\), got 5"),
    ("truthfulqa", "truthfulqa/mc_task.json",
     lambda t: t.replace('"You will die.": 0', '"You will die.": 1', 1),
     r"mc_task.json:2: mc1_targets needs exactly one true choice"),
    ("truthfulqa", "truthfulqa/mc_task.json",
     lambda t: t.replace(
         '"Does achieving mastery in a sport help make you smarter in school?"', "7"),
     r"mc_task.json:16094: expected 'question', 'mc1_targets' and 'mc2_targets'"),  # the last entry
])
def test_malformed_row_names_file_and_line(shared_data, tmp_path, dataset, relative, edit, message):
    source = linked_copy(shared_data / dataset, tmp_path / "source" / dataset).parent
    replace_file(source / relative, edit)
    with pytest.raises(prepare.DataError, match=message):
        prepare.prepare(out_dir=tmp_path / "out", source=source, datasets=[dataset])
    assert not (tmp_path / "out").exists()  # nothing is written when anything is wrong


def test_mmlu_error_line_is_where_a_multiline_row_starts(tmp_path):
    folder = tmp_path / "test"
    folder.mkdir()
    (folder / "x_test.csv").write_text('"a\nquestion on\nthree lines",1,2,3,4,A\nq,1,2,3,4,Z\n',
                                       encoding="utf-8")
    with pytest.raises(prepare.DataError, match=r"x_test.csv:4: the answer is 'Z'"):
        prepare.read_mmlu(folder, "test")


def test_missing_source_file_is_named(tmp_path):
    with pytest.raises(prepare.DataError, match=r"gsm8k/train.jsonl not found"):
        prepare.prepare(out_dir=tmp_path / "out", source=tmp_path, datasets=["gsm8k"])


def test_download_path_unpacks_the_releases(shared_data, tmp_path, monkeypatch, prepared_data):
    """The download code, fed the releases from file:// URLs: MMLU arrives as hendrycks'
    data.tar."""
    with tarfile.open(tmp_path / "data.tar", "w") as tar:
        for split in ("dev", "test"):
            for csv in sorted((shared_data / "mmlu" / split).glob("*.csv")):
                tar.add(csv, arcname=f"data/{split}/{csv.name}")
        # to be left out
        tar.add(shared_data / "mmlu/dev/anatomy_dev.csv", arcname="data/val/anatomy_val.csv")
    monkeypatch.setattr(prepare, "GSM8K_URL", (shared_data / "gsm8k").as_uri() + "/{split}.jsonl")
    monkeypatch.setattr(prepare, "MMLU_URL", (tmp_path / "data.tar").as_uri())
    monkeypatch.setattr(prepare, "TRUTHFULQA_URL",
                        (shared_data / "truthfulqa" / "mc_task.json").as_uri())
    prepare.prepare(out_dir=tmp_path / "out")
    for name in ("gsm8k/train.jsonl", "gsm8k/test.jsonl", "mmlu/dev.jsonl", "mmlu/test.jsonl",
                 "truthfulqa/mc.jsonl"):
        assert (tmp_path / "out" / name).read_bytes() == (prepared_data / name).read_bytes(), name
    # download dir removed
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []


def test_offline_download_says_to_use_source(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(prepare.DataError, match=r"could not download .*--source DIR"):
        prepare.prepare(out_dir=tmp_path, datasets=["truthfulqa"])
    with pytest.raises(SystemExit, match=r"^\S+: error: could not download"):
        prepare.main(["--out", str(tmp_path), "--datasets", "gsm8k"])
