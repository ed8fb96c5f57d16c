"""Download GSM8K, MMLU and TruthfulQA from their original releases and write them in one local
format.

    python data/prepare.py               # download (GSM8K ~5 MB, MMLU ~166 MB, TruthfulQA ~1 MB)
    python data/prepare.py --source DIR  # offline, from a local copy laid out like the releases:
        DIR/gsm8k/{train,test}.jsonl                 openai/grade-school-math
        DIR/mmlu/{dev,test}/SUBJECT_{dev,test}.csv   hendrycks' data.tar (no header: question, A,
                                                     B, C, D, letter)
        DIR/truthfulqa/mc_task.json                  sylinrl/TruthfulQA

What it writes under --out (default: this folder), JSON lines, one example a line, in the releases'
order:
    gsm8k/{train,test}.jsonl  {"question": str, "answer": str}  (answer: the full solution, ending
                              "#### N")
    mmlu/{dev,test}.jsonl     {"subject": str, "question": str, "choices": [4 str], "answer": 0-3}
                              subjects sorted by name, each subject's rows in file order
    truthfulqa/mc.jsonl       {"question": str, "mc1_targets": {"choices": [..], "labels": [..]},
                               "mc2_targets": {...}}  labels 1 = true, 0 = false, in the release's
                              order
Everything it reads is checked: row counts (GSM8K 7,473 / 1,319; MMLU 285 dev / 14,042 test over 57
subjects; TruthfulQA 817), a parseable "#### N" on every GSM8K answer, four choices and an A-D
answer on every MMLU row, one true MC1 choice listed first. A malformed row stops everything with
its file and line: nothing is ever dropped silently, so every score is over the same, complete data
set.
"""
import argparse
import contextlib
import csv
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

DATASETS = ("gsm8k", "mmlu", "truthfulqa")
GSM8K_URL = ("https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/"
             "data/{split}.jsonl")
MMLU_URL = "https://people.eecs.berkeley.edu/~hendrycks/data.tar"
TRUTHFULQA_URL = "https://raw.githubusercontent.com/sylinrl/TruthfulQA/main/data/mc_task.json"
EXPECTED_ROWS = {("gsm8k", "train"): 7473, ("gsm8k", "test"): 1319, ("mmlu", "dev"): 285,
                 ("mmlu", "test"): 14042, ("truthfulqa", "mc"): 817}
MMLU_SUBJECTS = 57
GSM8K_GOLD = re.compile(r"-?[0-9][0-9,]*(\.[0-9]+)?")  # what follows "#### ": 72, -3, 1,080, 0.5


class DataError(Exception):
    """Data that is missing, cannot be downloaded, or does not look like the release it claims to
    be."""


@contextlib.contextmanager
def utf8(path: Path):
    """Text that is not UTF-8 stops with the file's name, not a UnicodeDecodeError from somewhere
    inside."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); is it the release's file?") from None


# --------------------------------------------------------------------------------------------------
# Reading and checking the releases

def read_gsm8k(path: Path) -> list:
    """The release's jsonl, every line checked as the prepared files are (read_checked_jsonl)."""
    rows = read_checked_jsonl(path, gsm8k_problem)
    return [{"question": row["question"], "answer": row["answer"]} for row in rows]


def gsm8k_problem(row) -> str:
    """What is wrong with a GSM8K row (the release's and ours have one format), or ''."""
    if not (isinstance(row, dict) and isinstance(row.get("question"), str)
            and isinstance(row.get("answer"), str)):
        return "expected an object with string fields 'question' and 'answer'"
    final = row["answer"].split("#### ")[-1].strip()
    if "#### " not in row["answer"] or not GSM8K_GOLD.fullmatch(final):
        return "the answer does not end in a parseable '#### N' final answer"
    return ""


def mc_problem(mc1: list, mc2: list) -> str:
    """What is wrong with a TruthfulQA row's labels, or ''. MC1 lists its one true choice first; MC2
    counts every choice labelled 1 (lm-eval 0.4.13), so its true choices may come anywhere, two rows
    list one after a false one."""
    if any(label not in (0, 1) for label in mc1 + mc2):
        return "labels must be 0 or 1"
    if len(mc1) < 2 or mc1[0] != 1 or sum(mc1) != 1:
        return "mc1_targets needs exactly one true choice, listed first"
    if 1 not in mc2 or 0 not in mc2:
        return "mc2_targets needs at least one true and one false choice"
    return ""


def read_mmlu(folder: Path, split: str) -> list:
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise DataError(f"{folder}: no *_{split}.csv files")
    rows = []
    for path in files:
        subject = path.name[: -len(f"_{split}.csv")]
        with utf8(path), open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            first_line = 1  # a quoted field may span lines: report the line the row starts on
            for record in reader:
                where = f"{path}:{first_line}"
                first_line = reader.line_num + 1
                if len(record) != 6:
                    raise DataError(f"{where}: expected 6 fields (question, A, B, C, D, answer), "
                                    f"got {len(record)}")
                if record[5] not in ("A", "B", "C", "D"):
                    raise DataError(f"{where}: the answer is {record[5]!r}, not one of A, B, C, D")
                rows.append({"subject": subject, "question": record[0], "choices": record[1:5],
                             "answer": "ABCD".index(record[5])})
    return rows


def read_truthfulqa(path: Path) -> list:
    """mc_task.json is one JSON list; its entries are decoded one at a time so that an error can
    name the line an entry starts on."""
    with utf8(path):
        text = path.read_text(encoding="utf-8")
    decoder, rows = json.JSONDecoder(), []
    if not text.lstrip().startswith("["):
        raise DataError(f"{path}:1: expected a JSON list")
    position = counted = text.index("[") + 1
    line_number = 1 + text.count("\n", 0, position)
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            break
        line_number, counted = line_number + text.count("\n", counted, position), position
        where = f"{path}:{line_number}"
        try:
            entry, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not (isinstance(entry, dict) and isinstance(entry.get("question"), str)
                and isinstance(entry.get("mc1_targets"), dict)
                and isinstance(entry.get("mc2_targets"), dict)):
            raise DataError(f"{where}: expected 'question', 'mc1_targets' and 'mc2_targets'")
        mc1, mc2 = list(entry["mc1_targets"].values()), list(entry["mc2_targets"].values())
        problem = mc_problem(mc1, mc2)
        if problem:
            raise DataError(f"{where}: {problem}")
        rows.append({"question": entry["question"],
                     "mc1_targets": {"choices": list(entry["mc1_targets"]), "labels": mc1},
                     "mc2_targets": {"choices": list(entry["mc2_targets"]), "labels": mc2}})
    return rows


def mmlu_problem(row) -> str:
    if not (isinstance(row, dict) and isinstance(row.get("question"), str)
            and isinstance(row.get("subject"), str)):
        return "expected an object with string fields 'subject' and 'question'"
    if not (isinstance(row.get("choices"), list) and len(row["choices"]) == 4):
        return "expected 'choices': a list of 4 answers"
    if row.get("answer") not in (0, 1, 2, 3):
        return f"the answer is {row.get('answer')!r}, not 0-3 (A-D)"
    return ""


def truthfulqa_problem(row) -> str:
    targets = [row.get(key) if isinstance(row, dict) else None
               for key in ("mc1_targets", "mc2_targets")]
    if not (isinstance(row, dict) and isinstance(row.get("question"), str)
            and all(isinstance(t, dict) and isinstance(t.get("choices"), list)
                    and isinstance(t.get("labels"), list)
                    and len(t["choices"]) == len(t["labels"]) for t in targets)):
        return ("expected 'question', and 'mc1_targets' and 'mc2_targets' with as many 'choices' "
                "as 'labels'")
    return mc_problem(targets[0]["labels"], targets[1]["labels"])


def read_prepared(path: Path, dataset: str) -> list:
    """The rows of a file this script wrote, each checked as it is read: what the scripts load. A
    line that is no JSON or no valid row, text that is not UTF-8, or an empty file stops with the
    file and line."""
    check = {"gsm8k": gsm8k_problem, "mmlu": mmlu_problem,
             "truthfulqa": truthfulqa_problem}[dataset]
    rows = read_checked_jsonl(path, check)
    if not rows:
        raise DataError(f"{path}: no rows; prepare it again (python data/prepare.py)")
    return rows


def load(data_dir, dataset: str, filename: str) -> list:
    """read_prepared of data_dir/dataset/filename, prepared (downloaded) first if it is missing:
    what eval.py's loaders call."""
    path = Path(data_dir) / dataset / filename
    if not path.exists():
        print(f"{path} not found: preparing {dataset} with data/prepare.py", file=sys.stderr)
        prepare(out_dir=data_dir, datasets=[dataset])
    return read_prepared(path, dataset)


def read_checked_jsonl(path: Path, check) -> list:
    """Every line of a jsonl file, parsed and checked (check(row): what is wrong, or None); the
    first bad one stops with its file and line."""
    rows = []
    with utf8(path), open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
            problem = check(row)
            if problem:
                raise DataError(f"{path}:{line_number}: {problem}")
            rows.append(row)
    return rows


def check_count(rows: list, dataset: str, split: str, where: Path):
    expected = EXPECTED_ROWS[(dataset, split)]
    if len(rows) != expected:
        raise DataError(f"{where}: {dataset} {split} has {len(rows)} rows, expected {expected}")


# --------------------------------------------------------------------------------------------------
# Downloading

def download(url: str, dest: Path):
    from tqdm import tqdm
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f, \
                tqdm(total=int(response.headers.get("Content-Length") or 0) or None, unit="B",
                     unit_scale=True, desc=dest.name,
                     disable=None) as bar:  # a bar with rate and ETA, on a terminal only
            for chunk in iter(lambda: response.read(1 << 20), b""):
                f.write(chunk)
                bar.update(len(chunk))
    except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
        raise DataError(f"could not download {url} ({e}). Offline? Run `python data/prepare.py "
                        f"--source DIR` "
                        "with a local copy of the releases (layout in data/prepare.py)") from None


def download_releases(datasets, into: Path):
    """Fetch the original files into `into`, laid out like a --source folder."""
    if "gsm8k" in datasets:
        (into / "gsm8k").mkdir(parents=True)
        for split in ("train", "test"):
            download(GSM8K_URL.format(split=split), into / "gsm8k" / f"{split}.jsonl")
    if "mmlu" in datasets:
        tar_path = into / "data.tar"
        download(MMLU_URL, tar_path)
        # data/{dev,val,test,auxiliary_train}/*.csv: keep dev and test
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                wanted = len(parts) == 3 and parts[1] in ("dev", "test")
                if member.isfile() and wanted and parts[2].endswith(".csv"):
                    (into / "mmlu" / parts[1]).mkdir(parents=True, exist_ok=True)
                    csv_bytes = tar.extractfile(member).read()
                    (into / "mmlu" / parts[1] / parts[2]).write_bytes(csv_bytes)
        tar_path.unlink()
    if "truthfulqa" in datasets:
        (into / "truthfulqa").mkdir(parents=True)
        download(TRUTHFULQA_URL, into / "truthfulqa" / "mc_task.json")


# --------------------------------------------------------------------------------------------------
# Writing

def write_jsonl(rows: list, path: Path):
    """Write to a temporary name, then rename: an interrupted run never leaves a half-written file
    that a later run would take for prepared data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # one per process: torchrun ranks may race here
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def convert(source: Path, out: Path, datasets):
    """Read and check everything first, then write: a bad row leaves `out` untouched."""
    outputs = {}
    if "gsm8k" in datasets:
        for split in ("train", "test"):
            path = source / "gsm8k" / f"{split}.jsonl"
            require(path)
            outputs[out / "gsm8k" / f"{split}.jsonl"] = rows = read_gsm8k(path)
            check_count(rows, "gsm8k", split, path)
    if "mmlu" in datasets:
        subjects = {}
        for split in ("dev", "test"):
            require(source / "mmlu" / split)
            rows = read_mmlu(source / "mmlu" / split, split)
            outputs[out / "mmlu" / f"{split}.jsonl"] = rows
            check_count(rows, "mmlu", split, source / "mmlu" / split)
            subjects[split] = sorted({row["subject"] for row in rows})
        if subjects["dev"] != subjects["test"] or len(subjects["test"]) != MMLU_SUBJECTS:
            raise DataError(f"{source / 'mmlu'}: expected the same {MMLU_SUBJECTS} subjects in dev "
                            f"and test, got {len(subjects['dev'])} and {len(subjects['test'])}")
    if "truthfulqa" in datasets:
        path = source / "truthfulqa" / "mc_task.json"
        require(path)
        outputs[out / "truthfulqa" / "mc.jsonl"] = rows = read_truthfulqa(path)
        check_count(rows, "truthfulqa", "mc", path)
    for path, rows in outputs.items():
        write_jsonl(rows, path)
        print(f"wrote {path} ({len(rows)} rows)")


def require(path: Path):
    if not path.exists():
        raise DataError(f"{path} not found (the --source layout is described in data/prepare.py)")


def prepare(out_dir=Path(__file__).resolve().parent, source=None, datasets=DATASETS):
    """Write `datasets` under out_dir from a local `source` folder, or download them when source is
    None."""
    out_dir = Path(out_dir)
    unknown = set(datasets) - set(DATASETS)
    if unknown:
        raise DataError(f"unknown datasets {sorted(unknown)}; choose from {DATASETS}")
    if source is not None:
        return convert(Path(source), out_dir, datasets)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".download-") as tmp:
        download_releases(datasets, Path(tmp))
        convert(Path(tmp), out_dir, datasets)


def main(argv=None):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: harness/
    from harness.cli import ArgumentParser, check_writable_dir, fail  # a bad flag: one line
    parser = ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=None,
                        help="local folder laid out like the releases (see above); default: "
                             "download them")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent),
                        help="where to write the prepared files (default: this data/ folder)")
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help=f"comma-separated subset of {','.join(DATASETS)}")
    args = parser.parse_args(argv)
    if args.source is not None and not Path(args.source).is_dir():
        parser.error(f"--source {args.source}: no such folder")
    datasets = [d for d in args.datasets.split(",") if d]
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown or not datasets:
        parser.error(f"--datasets {args.datasets!r}: unknown {unknown or 'none given'}; choose "
                     f"from {DATASETS}")
    check_writable_dir(args.out, "--out")
    try:
        prepare(args.out, args.source, datasets)
    except DataError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
