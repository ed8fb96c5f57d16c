"""Faults during a run, through the real entry points, as a user meets them: a second run into a
busy --out_dir is refused naming the live one, and a killed run leaves no lock behind; SIGINT and
SIGTERM end each script in one line saying what was kept and the command that continues, and that
command continues to exactly the weights of an uninterrupted run (past a metrics.jsonl line torn
by a crash); a run stopped before its first checkpoint starts over; a checkpoint of another kind
of run is named; the flags only the model and the data can check end in one line.

Every script runs in a child forked from one launcher process that imported torch once
(test_bad_input.py's FORK_CASE): the test sends it signals, as a terminal or a scheduler would, at
a known point (after the steps it watches in metrics.jsonl). The torchrun cases are slow tests.
"""
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model import load_safetensors
from conftest import ROOT, tiny_model, train_lines, write_byte_tokenizer
from test_bad_input import FORK_CASE, checkpoint_of, write_jsonl, write_tiny_data

# The launcher: {"case": ...} forks a child running the case and answers its pid; with "head", the
# child's stdout is a pipe of which the launcher reads the first line and closes it, as `| head -1`
# does; {"wait": pid} answers the child's exit status (negative: the signal that ended it).
LAUNCHER = FORK_CASE + r"""
for request in sys.stdin:
    request = json.loads(request)
    if "wait" in request:
        _, status = os.waitpid(request["wait"], 0)
        print(os.waitstatus_to_exitcode(status), flush=True)
        continue
    read, write = os.pipe() if request["head"] else (None, None)
    pid = fork_case(request["case"], stdout_fd=write, close=[read] if read else [])
    if read:
        os.close(write)
        with os.fdopen(read) as pipe:
            pipe.readline()
    print(pid, flush=True)
"""


class Child:
    def __init__(self, launcher, pid, log):
        self.launcher, self.pid, self.log = launcher, pid, log

    def signal(self, signum):
        os.kill(self.pid, signum)

    def wait(self) -> int:
        self.code = self.launcher.ask({"wait": self.pid})
        return self.code

    def stderr_lines(self):
        return [line for line in Path(self.log + ".err").read_text().splitlines() if line.strip()]

    def stdout(self):
        return Path(self.log + ".out").read_text()


class Launcher:
    def __init__(self, folder):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        self.process = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self.folder, self.started = folder, 0

    def ask(self, request):
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def start(self, script, *argv, head=False) -> Child:
        """`python SCRIPT ARGV` (run from the launcher's folder), not waited for."""
        self.started += 1
        log = str(self.folder / "logs" / f"{self.started}_{Path(script).stem}")
        case = dict(script=str(ROOT / script), argv=[str(a) for a in argv], cwd=str(self.folder),
                    log=log)
        return Child(self, self.ask({"case": case, "head": head}), log)

    def run(self, script, *argv) -> Child:
        child = self.start(script, *argv)
        child.wait()
        return child


@pytest.fixture(scope="module")
def launcher(tmp_path_factory, byte_model_dir):
    """The launcher, and a small world: GSM8K, MMLU and TruthfulQA of a few rows each, the tiny
    byte-level model (vocab 512, 2048 positions) and another one as a teacher."""
    folder = tmp_path_factory.mktemp("faults")
    (folder / "logs").mkdir()
    write_tiny_data(folder / "data")
    tiny_model(seed=1).save_pretrained(folder / "teacher")
    write_byte_tokenizer(folder / "teacher" / "tokenizer.json")
    launcher = Launcher(folder)
    launcher.model, launcher.data = byte_model_dir, folder / "data"
    yield launcher
    launcher.process.kill()  # (every child has ended)
    launcher.process.wait()


def wait_for(condition, what, timeout=60):
    began = time.time()
    while not condition():
        assert time.time() - began < timeout, f"gave up waiting for {what}"
        time.sleep(0.01)


def stopped(child, out_dir, signum, after_steps=1):
    """The trainer child, sent signum once it has logged after_steps steps in out_dir, ended."""
    wait_for(lambda: steps_logged(out_dir) >= after_steps, f"{after_steps} steps")
    child.signal(signum)
    child.wait()
    return child


def steps_logged(out_dir) -> int:
    path = Path(out_dir) / "metrics.jsonl"
    return len(train_lines(out_dir)) if path.exists() and path.read_text() else 0


def assert_one_line(child, codes, pattern, progress=None):
    """The child ended with one of these exit statuses and one line on stderr (no traceback;
    apart from progress lines it printed as it worked) that matches pattern; returns the match."""
    lines = [line for line in child.stderr_lines() if not (progress and progress in line)]
    assert child.code in (codes if isinstance(codes, tuple) else (codes,)), lines[-20:]
    assert "Traceback" not in child.stdout() + "\n".join(lines), lines[-20:]
    assert len(lines) == 1, lines
    match = re.fullmatch(pattern, lines[0])
    assert match, lines[0]
    return match


def run_command(launcher, line):
    """Run the command a stop's line printed ("python SCRIPT ARGS"), as the user would."""
    python, script, *argv = shlex.split(line)
    assert python == "python"
    return launcher.run(os.path.relpath(script, ROOT), *argv)


def same_weights(run, reference):
    a, b = (load_safetensors(Path(out) / "model.safetensors") for out in (run, reference))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[row["loss"] for row in train_lines(out)] for out in (run, reference)]
    assert losses[0] == losses[1]  # and one line per step, each step once


def sft(launcher, out_dir, *extra):
    return ["--model", launcher.model, "--data_dir", launcher.data, "--out_dir", out_dir,
            "--device", "cpu", "--steps", "40", "--batch_size", "2", "--grad_accum", "1",
            "--lora_rank", "0", "--lr", "3e-3", "--warmup", "1", "--eval_every", "0",
            "--save_every", "4", *extra]


@pytest.fixture(scope="module")
def straight(launcher):
    """40 steps of SFT without a stop: the weights every stopped and continued run must reach.
    It runs beside the test that asks for it first, until finished() waits for it."""
    out = launcher.folder / "straight"
    return out, launcher.start("train_sft.py", *sft(launcher, out))


def finished(straight) -> Path:
    out, child = straight
    if not hasattr(child, "code"):
        assert child.wait() == 0, child.stderr_lines()[-5:]
    return out


# One run per --out_dir; SIGINT; the command that continues --------------------------------------


def test_sigint_keeps_the_last_checkpoint_and_its_command_continues_exactly(launcher, straight):
    out = launcher.folder / "sigint"
    first = launcher.start("train_sft.py", *sft(launcher, out))
    wait_for(lambda: steps_logged(out) >= 5, "a checkpoint")  # step 4's is written
    first.signal(signal.SIGSTOP)  # paused, alive: as long as the second run needs to start
    # a second run into the same folder, even one that would --resume it, is refused
    second = launcher.run("train_sft.py", *sft(launcher, out, "--resume"))
    assert_one_line(second, 1, rf"train_sft\.py: error: --out_dir {re.escape(str(out))}: another "
                               rf"run \(process {first.pid} on \S+\) is writing there; .*")
    first.signal(signal.SIGINT)  # Ctrl-C, received as it goes on
    first.signal(signal.SIGCONT)
    first.wait()
    stop = assert_one_line(first, 130, r"train_sft\.py: stopped by SIGINT; kept (\S+/step_(\d+)) "
                                       r"\((\d+) steps done\); continue with: (python .* --resume)")
    kept, step, steps = Path(stop[1]), int(stop[2]), int(stop[3])
    assert step == steps and step % 4 == 0 and 4 <= step < 40
    assert kept == out / "checkpoints" / f"step_{step:07d}"
    assert (kept / "meta.json").exists()
    assert not (out / ".lock").exists()
    assert steps_logged(out) >= step
    continued = run_command(launcher, stop[4])
    assert continued.code == 0, continued.stderr_lines()[-5:]
    same_weights(out, finished(straight))


# SIGTERM: a checkpoint at the end of the step; a killed run's lock; a torn metrics.jsonl ------


def test_sigterm_saves_at_the_end_of_the_step_and_a_crash_costs_nothing(launcher, straight):
    out = launcher.folder / "sigterm"
    preempted = stopped(launcher.start("train_sft.py", *sft(launcher, out, "--save_every", "0")),
                        out, signal.SIGTERM)
    stop = assert_one_line(preempted, 143, r"train_sft\.py: stopped by SIGTERM; kept "
                                           r"\S+/step_(\d+) \(\d+ steps done\); continue with: "
                                           r"(python .*)")
    step = int(stop[1])  # the step it was in: its checkpoint, though --save_every is 0
    assert 1 <= step < 40
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_{step:07d}"]
    assert steps_logged(out) == step
    # Continued, then killed (SIGKILL: no handler runs) after a few more steps; a power cut
    # then tears the line being written
    killed = launcher.start("train_sft.py", *sft(launcher, out, "--save_every", "0", "--resume"))
    wait_for(lambda: steps_logged(out) >= step + 2, "two more steps")
    killed.signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert (out / ".lock").exists()  # a file is left, the lock itself is not
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 39, "loss": 2.')
    continued = run_command(launcher, stop[2])
    assert continued.code == 0, continued.stderr_lines()[-5:]
    assert any("its last line is torn" in line for line in continued.stderr_lines())
    assert not (out / ".lock").exists()
    same_weights(out, finished(straight))


# Stopped before the first checkpoint: the same command, or --resume, starts over --------------


def test_a_run_stopped_before_its_first_checkpoint_starts_over(launcher):
    out = launcher.folder / "early"
    argv = sft(launcher, out, "--steps", "30", "--save_every", "0")
    early = stopped(launcher.start("train_sft.py", *argv), out, signal.SIGINT)
    stop = assert_one_line(early, 130, r"train_sft\.py: stopped by SIGINT; no checkpoint in \S+ "
                                       r"yet, nothing to continue from; start it again with the "
                                       r"same command \(or --resume, which starts over\): (.*)")
    assert shlex.split(stop[1])[2:] == [str(a) for a in argv]
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "metrics.jsonl"]  # no lock,
    again = run_command(launcher, stop[1])  # no empty checkpoints/
    assert again.code == 0, again.stderr_lines()[-5:]
    assert "stopped before its first checkpoint: it starts over" in again.stdout()
    assert [row["step"] for row in train_lines(out)] == list(range(1, 31))
    # --resume where there is no checkpoint (a run with other flags stopped early) starts over
    other = launcher.folder / "other"
    write_jsonl(other / "metrics.jsonl", [{"step": 1, "loss": 2.5}])
    refused = launcher.run("train_sft.py", *sft(launcher, other, "--steps", "2"))
    assert_one_line(refused, 1, r".*holds metrics\.jsonl of an earlier run, stopped before its "
                                r"first checkpoint, with other flags; pass --resume or .*")
    resumed = launcher.run("train_sft.py", *sft(launcher, other, "--steps", "2", "--resume"))
    assert resumed.code == 0, resumed.stderr_lines()[-5:]
    assert f"--resume: no checkpoint in {other / 'checkpoints'}: the run starts over" in \
        resumed.stdout()
    assert [row["step"] for row in train_lines(other)] == [1, 2]


# SIGINT in the other scripts ------------------------------------------------------------------


def test_sigint_ends_the_other_trainers_and_scripts_in_one_line(launcher):
    w, model, data = launcher.folder, launcher.model, launcher.data
    common = ["--model", model, "--data_dir", data, "--device", "cpu", "--steps", "200",
              "--batch_size", "1", "--grad_accum", "1", "--eval_every", "0",
              "--max_new_tokens", "8"]
    rl = launcher.start("train_rl.py", *common, "--out_dir", w / "rl", "--group_size", "2",
                        "--save_every", "1")
    distill = launcher.start("train_distill.py", *common, "--out_dir", w / "opd", "--teacher",
                             w / "teacher", "--states_per_rollout", "1",
                             "--continuation_tokens", "4", "--save_every", "0")
    results = w / "results.json"
    results.write_text('{"earlier": true}\n')
    evaluation = launcher.start("eval.py", "--model", model, "--data_dir", data, "--device",
                                "cpu", "--tasks", "truthfulqa_mc1,gsm8k", "--gsm8k_shots", "1",
                                "--max_new_tokens", "1500", "--out", results)
    sampling = launcher.start("sample.py", "--model", model, "--device", "cpu", "--prompt",
                              "Question: 2+2?", "--max_new_tokens", "1000", "--num_samples", "9")
    wait_for(lambda: steps_logged(w / "rl") >= 1 and steps_logged(w / "opd") >= 1
             and "truthfulqa_mc1: n=" in Path(evaluation.log + ".err").read_text()
             and "Question: 2+2?" in sampling.stdout(), "every script at work")
    for child in (rl, distill, evaluation, sampling):
        child.signal(signal.SIGINT)
        child.wait()
    assert_one_line(rl, 130, r"train_rl\.py: stopped by SIGINT; kept \S+/step_\d+ \(\d+ steps "
                             r"done\); continue with: python \S+train_rl\.py .* --resume")
    assert_one_line(distill, 130, r"train_distill\.py: stopped by SIGINT; no checkpoint in .*")
    assert_one_line(evaluation, 130, r"eval\.py: stopped by SIGINT; no results written \(--out is "
                                     r"written whole, at the end\); run it again with: python "
                                     r"\S+eval\.py --model .*", progress="truthfulqa_mc1: n=")
    assert results.read_text() == '{"earlier": true}\n'
    assert_one_line(sampling, 130, r"sample\.py: stopped by SIGINT; the completions printed "
                                   r"above; run it again with: python \S+sample\.py .*")


def test_sample_into_a_closed_pipe_ends_quietly(launcher):
    """`sample.py | head -1`: head reads the prompt line and leaves; sample.py ends at its next
    line as any Unix tool does, by SIGPIPE, without a BrokenPipeError traceback."""
    child = launcher.start("sample.py", "--model", launcher.model, "--device", "cpu", "--prompt",
                           "Question: 2+2?", "--max_new_tokens", "4", head=True)
    assert child.wait() == -signal.SIGPIPE
    assert child.stderr_lines() == []


def test_sigint_ends_the_pipeline_in_process(launcher):
    out = launcher.folder / "paper"
    pipeline = launcher.start("runs/paper.py", "--smoke", "--in_process", "--only", "sft_mild",
                              "--steps", "200", "--out", out, "--data_dir", launcher.data)
    wait_for(lambda: steps_logged(out / "sft_mild") >= 1, "a training step")
    pipeline.signal(signal.SIGINT)
    assert pipeline.wait() == 130
    lines = pipeline.stderr_lines()
    assert "Traceback" not in "\n".join(lines), lines
    assert re.fullmatch(r"train_sft\.py: stopped by SIGINT; .*", lines[0])  # the step's line,
    assert re.fullmatch(r"paper\.py: stopped by SIGINT; what finished is kept \(run again, it is "
                        r"skipped, and a stopped trainer continues from its last checkpoint\); "
                        r"run it again with: python \S+paper\.py --smoke .*", lines[1])  # then its
    assert len(lines) == 2


# Bad input that only the model, the data or the --out_dir can reveal: one line, before any work


def fake_checkpoint(out_dir, meta):
    """A real checkpoint of the tiny model whose meta.json says another kind of run wrote it."""
    checkpoint_of(out_dir, tiny_model(seed=0))
    folder = out_dir / "checkpoints" / "step_0000002"
    if meta["kind"] == "fsdp":  # one shard file per process instead of state.safetensors
        for rank in range(meta["processes"]):
            shutil.copy(folder / "state.safetensors", folder / f"shard-{rank:05d}.safetensors")
        (folder / "state.safetensors").unlink()
    (folder / "meta.json").write_text(json.dumps({"step": 2, **meta}))
    return out_dir


CASES = [
    ("sft_max_new_tokens", "train_sft.py", ["--max_new_tokens", "2040"],
     "--max_new_tokens 2040: with the longest GSM8K prompt's 32 tokens, more than the model's "
     "2048 positions"),
    ("rl_max_new_tokens", "train_rl.py", ["--max_new_tokens", "5000"],
     "--max_new_tokens 5000: with the longest GSM8K prompt's"),
    ("distill_continuation", "train_distill.py",
     ["--teacher", "{teacher}", "--max_new_tokens", "2000", "--continuation_tokens", "40"],
     "--max_new_tokens 2000 with --continuation_tokens 40: with the longest GSM8K prompt's 32"),
    ("gsm8k_eval_shots", "train_sft.py", ["--eval_shots", "9"],
     "--eval_shots 9: more than the GSM8K train split's 8 examples"),
    ("mmlu_eval_shots", "train_rl.py", ["--eval_tasks", "mmlu", "--eval_shots", "6"],
     "--eval_shots 6: more than the 5 MMLU dev examples some subjects have"),
    ("teacher_is_student", "train_distill.py", ["--teacher", "{model}"],
     "--teacher {model}: is --model (the student) itself"),
    ("teacher_is_student_by_link", "train_distill.py", ["--teacher", "{link}"],
     "is --model (the student) itself"),
    ("fsdp_checkpoint", "train_sft.py", ["--out_dir", "{fsdp}", "--resume"],
     "step_0000002: written by 2 FSDP processes (torchrun --fsdp), and this run has one process "
     "(no torchrun); resume it as it was written"),
    ("ddp_checkpoint", "train_sft.py", ["--out_dir", "{ddp}", "--resume"],
     "written by 2 DDP processes (torchrun), and this run has one process"),
    ("damaged_metrics", "train_sft.py", ["--out_dir", "{damaged}", "--resume"],
     "metrics.jsonl:1: not valid JSON, a damaged metrics file"),
    ("prompt_file_folder", "sample.py", ["--prompt_file", "{w}"], "--prompt_file {w}: is a folder"),
    ("prompt_file_empty", "sample.py", ["--prompt_file", "{empty}"],
     "--prompt_file {empty}: the prompt is empty"),
    ("prompt_not_utf8", "sample.py", ["--prompt", "caf\udce9"], "--prompt: not valid UTF-8 text"),
]


def test_what_only_the_model_and_the_data_reveal_is_one_line(launcher):
    w = launcher.folder / "flags"
    w.mkdir()
    names = dict(w=w, model=launcher.model, teacher=launcher.folder / "teacher", link=w / "link",
                 fsdp=fake_checkpoint(w / "fsdp", {"kind": "fsdp", "processes": 2}),
                 ddp=fake_checkpoint(w / "ddp", {"kind": "ddp", "processes": 2}),
                 damaged=checkpoint_of(w / "damaged", tiny_model(seed=0)), empty=w / "empty.txt")
    (w / "link").symlink_to(launcher.model)
    (w / "empty.txt").write_text("")
    (w / "damaged" / "metrics.jsonl").write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.0}\n')
    protected = {key: sorted(p.read_bytes() for p in names[key].rglob("*") if p.is_file())
                 for key in ("fsdp", "ddp", "damaged")}
    children = {}
    for case_id, script, argv, _ in CASES:
        flags = [a.format(**names) for a in argv]
        if script.startswith("train"):
            flags = ["--model", str(launcher.model), "--data_dir", str(launcher.data), "--device",
                     "cpu", "--lora_rank", "0", "--out_dir", str(w / case_id), *flags]
        else:
            flags = ["--model", str(launcher.model), "--device", "cpu", *flags]
        children[case_id] = launcher.start(script, *flags)
    for case_id, script, _, expected in CASES:
        child = children[case_id]
        child.wait()
        match = assert_one_line(child, (1, 2), rf"{re.escape(script)}: error: (.*)")
        assert expected.format(**names) in match[1], case_id
        if not case_id.endswith(("checkpoint", "metrics")):  # a start that failed leaves nothing
            assert not (w / case_id).exists(), case_id
    for key, files in protected.items():  # (and a refused --resume changes nothing)
        assert sorted(p.read_bytes() for p in names[key].rglob("*") if p.is_file()) == files, key
        assert not (names[key] / ".lock").exists()


def test_a_fifo_prompt_file_is_read(launcher):
    """--prompt_file <(command): a named pipe is read to its end like a file."""
    fifo = launcher.folder / "prompt.fifo"
    os.mkfifo(fifo)
    child = launcher.start("sample.py", "--model", launcher.model, "--device", "cpu",
                           "--prompt_file", fifo, "--max_new_tokens", "4", "--num_samples", "1")
    began = time.time()
    while True:  # (opened without blocking: a sample.py that never reads fails the test)
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:  # no reader yet
            assert time.time() - began < 60, child.stderr_lines()
            time.sleep(0.01)
    os.write(writer, b"Question: 2+2?\nAnswer:")
    os.close(writer)
    assert child.wait() == 0, child.stderr_lines()
    assert child.stdout().startswith("Question: 2+2?\nAnswer:\n")


# Under torchrun (slow: each run is a new torchrun of two CPU processes) --------------------------


def torchrun(launcher, out, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(ROOT / "train_sft.py"), *sft(launcher, out, "--batch_size", "1", *extra)]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_through(command):
    finished = subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished


def stop_under_torchrun(command, out, signum, whole_group, after_steps=1):
    """Start a torchrun, send signum after its first steps (to its process group, as a terminal's
    Ctrl-C goes; or to torchrun alone, as a scheduler's SIGTERM may), return it finished."""
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=ONE_THREAD, start_new_session=True)
    wait_for(lambda: steps_logged(out) >= after_steps or run.poll() is not None, "steps",
             timeout=120)
    os.killpg(run.pid, signum) if whole_group else run.send_signal(signum)
    run.stdout_text, run.stderr_text = run.communicate(timeout=120)
    return run


def their_lines(stderr: str):
    """What the trainer's processes wrote to stderr, without torchrun's own report (its warnings,
    and the traceback of the signal it received or of a process's failure)."""
    lines = stderr.splitlines()
    if "Traceback (most recent call last):" in lines:
        lines = lines[:lines.index("Traceback (most recent call last):")]
    return [line for line in lines if line.strip() and "torch/distributed/elastic" not in line]


@pytest.mark.slow
def test_sigint_under_torchrun_stops_every_process_and_rank_0_alone_says_so(launcher):
    out = launcher.folder / "ddp_sigint"
    run = stop_under_torchrun(torchrun(launcher, out), out, signal.SIGINT, whole_group=True,
                              after_steps=5)  # step 4's checkpoint is written
    assert run.returncode != 0
    assert "KeyboardInterrupt" not in run.stderr_text
    lines = their_lines(run.stderr_text)
    assert len(lines) == 1, run.stderr_text[-3000:]
    assert re.fullmatch(r"train_sft\.py: stopped by SIGINT; kept \S+/step_\d+ \(\d+ steps done\); "
                        r"continue with: torchrun --nproc_per_node=2 \S+train_sft\.py .* "
                        r"--resume", lines[0])


@pytest.mark.slow
def test_a_busy_out_dir_refuses_a_torchrun_at_once(launcher):
    """Rank 0 is refused in one line; the other processes, waiting for rank 0 to hold the lock,
    end as soon as torchrun tells them to (not after its 30 s grace, killed)."""
    out = launcher.folder / "busy"
    out.mkdir()
    with open(out / ".lock", "w") as lock:  # held by this process, as by a live run
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(f"process {os.getpid()} on this host\n")
        lock.flush()
        began = time.time()
        refused = subprocess.run(torchrun(launcher, out, "--resume"), capture_output=True,
                                 text=True, env=ONE_THREAD)
    lines = their_lines(refused.stderr)
    assert refused.returncode != 0
    assert lines[0] == (f"train_sft.py: error: --out_dir {out}: another run (process "
                        f"{os.getpid()} on this host) is writing there; wait for it to end, or "
                        "choose another --out_dir")
    assert "SIGKILL" not in refused.stderr  # no process had to be killed
    assert time.time() - began < 30


@pytest.mark.slow
def test_sigterm_under_fsdp_saves_a_sharded_checkpoint_that_resumes_exactly(launcher):
    straight = launcher.folder / "fsdp_straight"
    run_through(torchrun(launcher, straight, "--fsdp", "--steps", "12"))
    out = launcher.folder / "fsdp_sigterm"
    flags = ("--fsdp", "--steps", "12", "--save_every", "0")
    run = stop_under_torchrun(torchrun(launcher, out, *flags), out, signal.SIGTERM,
                              whole_group=False)  # torchrun passes it on to its processes
    lines = their_lines(run.stderr_text)
    assert len(lines) == 1, run.stderr_text[-3000:]
    step = int(re.fullmatch(r"train_sft\.py: stopped by SIGTERM; kept \S+/step_(\d+) .*",
                            lines[0])[1])
    folder = out / "checkpoints" / f"step_{step:07d}"
    assert json.loads((folder / "meta.json").read_text()) == {"step": step, "kind": "fsdp",
                                                               "processes": 2}
    assert len(list(folder.glob("*.safetensors"))) == 2  # a shard per process
    # one process cannot continue it, and says why
    plain = launcher.run("train_sft.py", *sft(launcher, out, *flags[1:], "--resume"))
    assert_one_line(plain, 1, rf".*{folder.name}: written by 2 FSDP processes \(torchrun --fsdp\), "
                              r"and this run has one process \(no torchrun\); .*")
    run_through(torchrun(launcher, out, *flags, "--resume"))
    same_weights(out, straight)


@pytest.mark.slow
def test_a_damaged_sharded_checkpoint_falls_back_to_the_one_before(launcher):
    out = launcher.folder / "fsdp_damaged"
    flags = ("--fsdp", "--steps", "4", "--save_every", "2")
    run_through(torchrun(launcher, out, *flags))
    reference = launcher.folder / "fsdp_whole"
    shutil.copytree(out, reference)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (out / name).unlink()
    shard = sorted((out / "checkpoints" / "step_0000004").glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated: its header no longer covers it
    resumed = run_through(torchrun(launcher, out, *flags, "--resume"))
    assert "step_0000004: unreadable" in resumed.stderr
    assert "resuming from the checkpoint before it" in resumed.stderr
    assert f"resumed from {out / 'checkpoints' / 'step_0000002'}" in resumed.stdout
    same_weights(out, reference)


@pytest.mark.slow
def test_the_pipeline_passes_sigterm_on_to_its_step(launcher):
    """paper.py running its steps as new Pythons, SIGTERM sent to it alone (as to a container's
    first process): the step has it passed on, a trainer saves a checkpoint at the end of its step
    and says so, then paper.py."""
    out = launcher.folder / "paper_steps"
    command = [sys.executable, str(ROOT / "runs" / "paper.py"), "--smoke", "--only", "sft_mild",
               "--steps", "200", "--out", str(out), "--data_dir", str(launcher.data)]
    pipeline = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=ONE_THREAD)
    wait_for(lambda: steps_logged(out / "sft_mild") >= 1 or pipeline.poll() is not None,
             "a training step", timeout=120)
    pipeline.send_signal(signal.SIGTERM)
    _, stderr = pipeline.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert pipeline.returncode == 143, stderr[-3000:]
    assert len(lines) == 2, lines
    step = int(re.fullmatch(r"train_sft\.py: stopped by SIGTERM; kept \S+/step_(\d+) .*",
                            lines[0])[1])
    assert (out / "sft_mild" / "checkpoints" / f"step_{step:07d}" / "meta.json").exists()
    assert lines[1].startswith("paper.py: stopped by SIGTERM; what finished is kept")
