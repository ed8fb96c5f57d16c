"""The reference data the tests rely on is where ../shared/data/README.md says, with its stated
sizes."""
import json


def test_shared_data_row_counts(shared_data):
    gsm = {s: sum(1 for _ in open(shared_data / "gsm8k" / f"{s}.jsonl")) for s in ("train", "test")}
    assert gsm == {"train": 7473, "test": 1319}
    assert len(list((shared_data / "mmlu" / "test").glob("*_test.csv"))) == 57
    assert len(json.loads((shared_data / "truthfulqa" / "mc_task.json").read_text())) == 817
