"""tracking.py: --wandb and --tensorboard, with fake wandb and torch.utils.tensorboard modules
patched into sys.modules (neither package is needed): every metrics.jsonl record reaches them once,
from rank 0 only, with the flags as the config; a missing package, a name W&B refuses and a run W&B
cannot start end in one line before training; offline when W&B's server cannot be reached."""
import json
import sys
import types

import pytest

from harness import tracking
from harness import training as T
import train_sft
from conftest import args_for

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeWandb(types.ModuleType):
    """What tracking.py uses of wandb: init(...) -> a run with log(numbers, step=...)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits = []  # init's keyword arguments, one dict per run started
        self.logged = []  # (step, numbers), in order

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(log=lambda numbers, step: self.logged.append((step, numbers)))


class FakeSummaryWriter:
    """What tracking.py uses of torch.utils.tensorboard.SummaryWriter."""
    made = []  # every writer made

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step = log_dir, purge_step
        self.texts, self.scalars, self.flushed = {}, [], 0
        FakeSummaryWriter.made.append(self)

    def add_text(self, tag, text):
        self.texts[tag] = text

    def add_scalar(self, tag, value, global_step):
        self.scalars.append((global_step, tag, value))

    def flush(self):
        self.flushed += 1


@pytest.fixture
def fake_wandb(monkeypatch):
    module = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.setattr(tracking, "wandb_server_answers", lambda: True)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return module


@pytest.fixture
def fake_tensorboard(monkeypatch):
    FakeSummaryWriter.made = []
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    return FakeSummaryWriter.made


def numbers_of(record):
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


def test_every_record_reaches_wandb_and_tensorboard_once_with_the_flags(
        prepared_data, byte_model, tmp_path, fake_wandb, fake_tensorboard, monkeypatch):
    """Two SFT steps with the periodic eval before and after them (its scores stubbed: the real
    eval takes seconds): each line of metrics.jsonl, training step or eval, is sent once, in
    order, at its step; the config is the parsed flags."""
    def evaluate_and_log(steps_done, model, tokenizer, metrics, args, dtype):
        metrics.log(steps_done, kl_to_start=0.25 * steps_done, gsm8k_flexible=0.5)
    monkeypatch.setattr(T, "evaluate_and_log", evaluate_and_log)
    out = tmp_path / "sft"
    argv = ["--model", str(byte_model()), "--out_dir", str(out), "--data_dir",
            str(prepared_data), "--steps", "2", "--batch_size", "2", "--grad_accum", "1",
            "--eval_every", "2", "--save_every", "0", "--wandb", "states-test", "--tensorboard"]
    train_sft.main(argv)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 2]  # eval, step 1, step 2, eval
    expected = [(r["step"], numbers_of(r)) for r in records]
    assert fake_wandb.logged == expected
    [init] = fake_wandb.inits
    flags = vars(train_sft.get_args(argv))
    assert init["config"] == flags
    assert (init["project"], init["dir"], init["name"], init["mode"]) == (
        "states-test", str(out), "sft", None)  # mode None: W&B's own default (online)
    [writer] = fake_tensorboard
    assert writer.log_dir == out / "tensorboard"
    assert writer.purge_step == 0  # a fresh run hides whatever an earlier one left there
    assert json.loads(writer.texts["flags"]) == json.loads(json.dumps(flags))
    assert writer.scalars == [(step, k, v) for step, numbers in expected
                              for k, v in numbers.items()]
    assert writer.flushed == len(records)


def test_only_rank_0_sends_and_non_finite_figures_are_left_out(tmp_path, fake_wandb,
                                                               fake_tensorboard, monkeypatch):
    args = args_for(out_dir=str(tmp_path), wandb="p", tensorboard=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    T.MetricsLog(tmp_path, steps=3, first_step=1, args=args).log(2, loss=1.0, tokens=5)
    assert (fake_wandb.inits, fake_wandb.logged, fake_tensorboard) == ([], [], [])
    monkeypatch.setenv("RANK", "0")
    log = T.MetricsLog(tmp_path, steps=3, first_step=1, args=args)
    log.log(2, loss=1.5, kl=float("nan"), tokens=5)
    assert fake_wandb.logged[0][0] == 2
    assert set(fake_wandb.logged[0][1]) == {"loss", "tokens_per_s", "step_s"}  # no kl, not_finite
    assert fake_tensorboard[0].purge_step == 2  # --resume from step 1: steps 2, ... are redone


def test_wandb_goes_offline_when_its_server_cannot_be_reached(tmp_path, fake_wandb, monkeypatch,
                                                              capsys):
    monkeypatch.setattr(tracking, "wandb_server_answers", lambda: False)
    tracking.Tracker(args_for(out_dir=str(tmp_path), wandb="p"))
    assert fake_wandb.inits[-1]["mode"] == "offline"
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1
    assert printed[0].startswith("--wandb: W&B's server cannot be reached: logging offline to "
                                 f"{tmp_path / 'wandb'} (upload it later: wandb sync ")
    monkeypatch.setenv("WANDB_MODE", "online")  # the user's choice wins, without a probe
    monkeypatch.setattr(tracking, "wandb_server_answers", lambda: pytest.fail("probed"))
    tracking.Tracker(args_for(out_dir=str(tmp_path), wandb="p"))
    assert fake_wandb.inits[-1]["mode"] == "online"


def test_a_run_wandb_cannot_start_ends_in_one_line(tmp_path, fake_wandb, monkeypatch):
    def refuse(**kwargs):
        raise RuntimeError("No API key configured. Use `wandb login` to log in.\nmore detail")
    monkeypatch.setattr(fake_wandb, "init", refuse)
    kept = '{"step": 1, "loss": 2.0}\n'  # an earlier run's, which --overwrite would replace
    (tmp_path / "metrics.jsonl").write_text(kept)
    with pytest.raises(SystemExit) as stop:
        T.MetricsLog(tmp_path, steps=2, args=args_for(out_dir=str(tmp_path), wandb="p"))
    assert str(stop.value).endswith(
        "error: --wandb p: W&B could not start a run (RuntimeError: No API key configured. Use "
        "`wandb login` to log in.); log in with `wandb login`, or run with WANDB_MODE=offline")
    assert (tmp_path / "metrics.jsonl").read_text() == kept  # stopped before it was touched


@pytest.mark.parametrize("argv, message", [
    (["--wandb", "team/project"], "argument --wandb: 'team/project' is no W&B project name"),
    (["--wandb", ""], "argument --wandb: '' is no W&B project name"),
    (["--wandb", "x" * 129], "is no W&B project name (1 to 128 characters"),
    (["--wandb"], "argument --wandb: expected one argument"),
    (["--wandb", "ok"], "argument --wandb: wandb is not installed (pip install wandb)"),
    (["--tensorboard"],
     "argument --tensorboard: tensorboard is not installed (pip install tensorboard)"),
])
def test_a_bad_name_or_a_missing_package_is_one_line_at_parsing(argv, message, monkeypatch,
                                                                capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # None in sys.modules: import fails
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SystemExit) as stop:
        train_sft.get_args(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert message in err
