"""Evaluate a Qwen3 checkpoint on GSM8K, MMLU and TruthfulQA MC1/MC2, scored as lm-evaluation-harness does.

    python eval.py --model Qwen/Qwen3-0.6B-Base --limit paper --out base.json
    python eval.py --report base.json rl.json sft.json      # the paper's Table 2, as markdown
    python eval.py --model out/rl --drift_reference Qwen/Qwen3-0.6B-Base --out rl.json  # + drift from base

The protocol is lm-eval's (0.4.13's task yamls gsm8k, mmlu, truthfulqa_mc1/mc2), so that numbers can be
compared with lm-eval's: the same prompts, the same few-shot examples, the same answer extraction and
normalisation, and log-likelihoods tokenised the same way. --limit draws a fixed seeded subset (the paper
used 500 GSM8K, 500 MMLU and 200 TruthfulQA questions: --limit paper); without it, the full test sets.
To compare with lm-eval, give it the same shots: its `mmlu` task runs 0-shot unless given --num_fewshot 5
(we default to 5, the paper's setting; --mmlu_shots 0 matches lm-eval's default), and gsm8k is 5-shot in both.
MC2 sums the probability of every choice labelled true, wherever it is listed (0.4.13's rule).

Where we differ from lm-eval, on purpose: --limit samples (lm-eval takes the first N); log-softmax runs in
fp32 (lm-eval: the model's dtype); MC2 subtracts the max log-likelihood before exp() (lm-eval's 0/0 is a
number here); greedy decoding never picks the embedding's padding rows; "Question:" is looked for every 16
generated tokens and the text cut there (the same text as stopping at once); special tokens other than the stop
tokens stay in the decoded completion (lm-eval drops them).
"""
import argparse
import functools
import importlib.util
import json
import math
import os
import random
import re
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from cli import (ArgumentParser, check_device, check_writable_file, fail, finite_or_null, nonnegative_float,
                 nonnegative_int, positive_int, progress)
from model import Qwen3, Tokenizer, autocast, completion_logprobs, rank_and_world
from train_common import save_checkpoint

DATA_DIR = Path(__file__).resolve().parent / "data"
TASKS = ("gsm8k", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2")
PAPER_LIMITS = {"gsm8k": 500, "mmlu": 500, "truthfulqa_mc1": 200, "truthfulqa_mc2": 200}

# ---------------------------------------------------------------------------------------------------
# Data loading: the jsonl files data/prepare.py writes (it documents their format)


def read_data(data_dir, dataset: str, filename: str) -> list:
    """Rows of data_dir/dataset/filename, each checked (a bad line stops with its file and line); a missing
    file is prepared (downloaded) on first use."""
    path, prepare = Path(data_dir) / dataset / filename, prepare_module()
    try:
        if not path.exists():
            print(f"{path} not found: preparing {dataset} with data/prepare.py", file=sys.stderr)
            prepare.prepare(out_dir=data_dir, datasets=[dataset])
        return prepare.read_prepared(path, dataset)
    except prepare.DataError as e:  # e.g. offline, or a damaged file: one clear line for whichever script asked
        raise SystemExit(f"error: {e}")


@functools.lru_cache(maxsize=1)
def prepare_module():
    """data/prepare.py, loaded by path: data/ is not a package, and no other module named `data` can shadow it."""
    spec = importlib.util.spec_from_file_location("prepare", Path(__file__).resolve().parent / "data" / "prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    return prepare


def load_gsm8k(split: str, data_dir=DATA_DIR) -> list:
    """GSM8K rows: question, answer (the full gold solution) and gold (its final number, normalised as
    lm-eval normalises it: '#### 1,080' -> '1080')."""
    return [{**row, "gold": normalize_gsm8k(row["answer"])} for row in read_data(data_dir, "gsm8k", f"{split}.jsonl")]


def load_mmlu(split: str, data_dir=DATA_DIR) -> list:
    return read_data(data_dir, "mmlu", f"{split}.jsonl")


def load_truthfulqa(data_dir=DATA_DIR) -> list:
    return read_data(data_dir, "truthfulqa", "mc.jsonl")


def subset(n_total: int, limit, seed: int) -> list:
    """Indices of the examples to score: all of them, or a fixed seeded sample of `limit`, in order."""
    if limit is None or limit >= n_total:
        return list(range(n_total))
    return sorted(random.Random(seed).sample(range(n_total), limit))


def batch_at(items: list, step: int, n: int, seed: int) -> list:
    """The n training items this process takes at `step`: consecutive slices of a new shuffle each epoch,
    so a step's batch is known without replaying the steps before it (which keeps --resume exact)."""
    rank, world = rank_and_world()
    orders, batch = {}, []
    for k in range((step * world + rank) * n, (step * world + rank + 1) * n):
        epoch, i = divmod(k, len(items))
        if epoch not in orders:
            orders[epoch] = random.Random(seed * 1_000_003 + epoch).sample(range(len(items)), len(items))
        batch.append(items[orders[epoch][i]])
    return batch


def tokens_per_rank(n_tokens: int) -> float:
    """The step's token count averaged over GPUs. Losses divide by it, so that once optimizer_step has
    averaged the gradients over GPUs the loss is a mean over all the step's tokens, not a mean of means."""
    world = rank_and_world()[1]
    if world == 1:
        return max(n_tokens, 1)
    total = torch.tensor([float(n_tokens)], device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(total)
    return max(total.item() / world, 1)


# ---------------------------------------------------------------------------------------------------
# Prompts (each string below is lm-eval's template; tests check them character by character)

def gsm8k_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def gsm8k_fewshot_prompt(question: str, shots: list) -> str:
    """Each shot is its question and full gold solution after a space; shots end with a blank line."""
    return "".join(f"{gsm8k_prompt(s['question'])} {s['answer']}\n\n" for s in shots) + gsm8k_prompt(question)


def gsm8k_shot_indices(n_train: int, n_test: int, shots: int, seed: int) -> list:
    """Train-set indices of the shots for each test question. lm-eval draws them from one
    random.Random(seed) per task, test question after test question; replaying the draws for the whole
    test set gives every question the shots it gets in a full lm-eval run, whichever subset we score."""
    rng = random.Random(seed)
    return [rng.sample(range(n_train), shots) for _ in range(n_test)]  # same draws as sampling the rows


def mmlu_question(row: dict) -> str:
    choices = "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", row["choices"]))
    return f"{row['question'].strip()}{choices}\nAnswer:"


def mmlu_prompt(row: dict, shots: list) -> str:
    """The subject's description, then its first k dev questions answered, then the question."""
    subject = row["subject"].replace("_", " ")
    description = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return description + "".join(f"{mmlu_question(s)} {'ABCD'[s['answer']]}\n\n" for s in shots) + mmlu_question(row)


TRUTHFULQA_PREAMBLE = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain.")


def truthfulqa_prompt(question: str) -> str:
    return f"{TRUTHFULQA_PREAMBLE}\n\nQ: {question}\nA:"


# ---------------------------------------------------------------------------------------------------
# Answer checking

GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")        # lm-eval "strict-match": the first '#### N'
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # "flexible-extract": the last number-like run
GSM8K_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")       # removed, in this order, from prediction and gold
GSM8K_STOP_STRINGS = ("Question:", "</s>", "<|im_end|>", "<|endoftext|>")  # generation ends at the first


def extract_gsm8k_answer(text: str, mode: str = "strict"):
    """The answer lm-eval's GSM8K filter extracts from a completion (a string such as '1,080.'), or None."""
    if mode not in ("strict", "flexible"):
        raise ValueError(f"mode must be 'strict' or 'flexible', not {mode!r}")
    matches = (GSM8K_STRICT if mode == "strict" else GSM8K_FLEXIBLE).findall(text)
    if not matches:
        return None
    match = matches[0] if mode == "strict" else matches[-1]
    if isinstance(match, tuple):  # one group per alternative of the flexible regex: the one that matched
        match = next(group for group in match if group)
    return match.strip()


def normalize_gsm8k(text: str) -> str:
    """lm-eval's exact_match normalisation for GSM8K (regexes_to_ignore, then ignore_case)."""
    for pattern in GSM8K_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def gsm8k_correct(prediction, gold: str) -> bool:
    """Exact match after normalisation, as lm-eval scores it: '1,080.' and '$1080' match '1080', '1080.0' does not."""
    return prediction is not None and normalize_gsm8k(prediction) == normalize_gsm8k(gold)


def truncate_at_stop(text: str) -> str:
    for stop in GSM8K_STOP_STRINGS:
        text = text.split(stop)[0]
    return text


def gsm8k_reward(completion_text: str, gold: str) -> float:
    """The RL reward: 1.0 when the completion's flexible-extracted answer equals the gold number
    numerically ('18.0' and '$18.' earn it for 18), else 0.0. The eval's flexible score is the same
    extraction with lm-eval's string match, which '18.0' fails: the reward does not punish a format."""
    answer = extract_gsm8k_answer(truncate_at_stop(completion_text), "flexible")
    try:
        return float(float(normalize_gsm8k(answer)) == float(normalize_gsm8k(gold)))
    except (TypeError, ValueError):  # nothing extracted, or not a number (e.g. '1.2.3')
        return 0.0


def mc2_score(logliks: list, labels: list) -> float:
    """Probability mass of the true choices (every choice labelled 1, wherever it is listed: lm-eval 0.4.13;
    up to 0.4.8 only those before the first 0 counted), normalised over all choices."""
    top = max(logliks)  # subtracted for stability; it cancels in the ratio
    probs = [math.exp(ll - top) for ll in logliks]
    return sum(p for p, label in zip(probs, labels) if label == 1) / sum(probs)


def argmax(values: list) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first, as numpy's argmax


# ---------------------------------------------------------------------------------------------------
# Scoring with the model: batched log-likelihoods and greedy generation, longest first

def encode_pair(tokenizer, context: str, continuation: str):
    """lm-eval's tokenisation of a (context, continuation) request: trailing spaces of the context move
    to the continuation, the concatenation is encoded whole, and the continuation is what follows the
    context's own encoding. So ' A' after 'Answer:' is scored as the tokens a model would see."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, context_ids = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: list, batch_size: int = 16, desc: str = "scoring") -> list:
    """Summed log-probability of each (context, continuation) request's continuation tokens, in batches
    of similar lengths. model.py's completion_logprobs projects only the continuation positions onto the
    vocabulary: for MMLU that is one position in ~600."""
    pairs = [encode_pair(tokenizer, context, continuation) for context, continuation in requests]
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results, bar = [0.0] * len(pairs), progress(total=len(pairs), desc=desc, unit="req", leave=False)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        logprobs, mask = completion_logprobs(model, [pairs[i][0] + pairs[i][1] for i in batch],
                                             [len(pairs[i][0]) for i in batch])
        for i, total in zip(batch, (logprobs * mask).sum(-1).tolist()):
            results[i] = total
        bar.update(len(batch))  # the longest come first: the rate rises as the bar goes
    bar.close()
    return results


@torch.no_grad()
def rollout(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
            stop_strings=(), batch_size: int = 128, desc: str = "sampling") -> list:
    """One completion (token ids) per prompt: the sampler every script shares. Prompts go through
    model.generate batch_size at a time, longest first (less padding); batch b draws with seed*1000+b.
    A completion ends with a stop token, with the token that completes one of stop_strings (text, such
    as "Question:", that is no single token; generate checks for them every 16 steps so that a batch
    ends when all its rows have), or at max_new_tokens. Autocast is the caller's."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    completions = [None] * len(prompts)
    # the bar counts decoding steps x rows, up to max_new_tokens a row: the ETA is an upper bound
    bar = progress(total=len(prompts) * max_new_tokens, desc=desc, unit="tok", unit_scale=True, leave=False)

    def has_stop(tokens):  # does their text hold a stop string?
        return any(stop in tokenizer.decode(tokens) for stop in stop_strings)

    def every_16_steps(rows):  # generate's hook: move the bar on, and end the rows that wrote a stop string
        bar.update(16 * len(rows))
        return list(map(has_stop, rows))
    for b, start in enumerate(range(0, len(order), batch_size)):
        batch = order[start:start + batch_size]
        new_tokens = model.generate([prompts[i] for i in batch], max_new_tokens, temperature=temperature,
                                    stop_token_ids=tokenizer.stop_ids, seed=seed * 1000 + b,
                                    vocab_limit=tokenizer.n_real_tokens,  # never the embedding's padding rows
                                    stop_fn=every_16_steps if stop_strings or not bar.disable else None)
        bar.update((start + len(batch)) * max_new_tokens - bar.n)  # rows that stopped early: their budget too
        for i, tokens in zip(batch, new_tokens):
            if has_stop(tokens):
                lo, hi = 1, len(tokens)  # binary search for the shortest prefix that holds one
                while lo < hi:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if has_stop(tokens[:mid]) else (mid + 1, hi)
                tokens = tokens[:hi]
            completions[i] = tokens
    bar.close()
    return completions


def greedy_completions(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int = 16) -> list:
    """Greedy completion text of each prompt, cut before the first stop token or stop string."""
    completions = rollout(model, tokenizer, tokenizer.encode_batch(prompts), max_new_tokens,
                          stop_strings=GSM8K_STOP_STRINGS, batch_size=batch_size, desc="gsm8k")
    return [truncate_at_stop(tokenizer.decode(tokens)) for tokens in completions]


def eval_gsm8k(model, tokenizer, settings, data_dir) -> dict:
    train, test = load_gsm8k("train", data_dir), load_gsm8k("test", data_dir)
    indices = subset(len(test), settings["limit"].get("gsm8k"), settings["seed"])
    shots = gsm8k_shot_indices(len(train), len(test), settings["gsm8k_shots"], settings["fewshot_seed"])
    prompts = [gsm8k_fewshot_prompt(test[i]["question"], [train[j] for j in shots[i]]) for i in indices]
    completions = greedy_completions(model, tokenizer, prompts, settings["max_new_tokens"], settings["batch_size"])
    samples = []
    for i, completion in zip(indices, completions):
        pred = {mode: extract_gsm8k_answer(completion, mode) for mode in ("strict", "flexible")}
        match = {mode: int(gsm8k_correct(pred[mode], test[i]["gold"])) for mode in pred}
        samples.append({"index": i, "pred": {**pred, "completion": completion}, "gold": test[i]["gold"],
                        "exact_match": match})
    metrics = {f"exact_match_{mode}": mean(s["exact_match"][mode] for s in samples) for mode in ("strict", "flexible")}
    return {"metrics": metrics, "n": len(samples), "samples": samples}


def eval_mmlu(model, tokenizer, settings, data_dir) -> dict:
    test, dev = load_mmlu("test", data_dir), load_mmlu("dev", data_dir)
    indices = subset(len(test), settings["limit"].get("mmlu"), settings["seed"])
    shots = {}
    for row in dev:  # lm-eval's first_n sampler: each subject's first k dev rows, in file order
        shots.setdefault(row["subject"], []).append(row)
    requests = []
    for i in indices:
        context = mmlu_prompt(test[i], shots[test[i]["subject"]][:settings["mmlu_shots"]])
        requests += [(context, f" {letter}") for letter in "ABCD"]
    logliks = loglikelihoods(model, tokenizer, requests, settings["batch_size"], desc="mmlu")
    samples, by_subject = [], {}
    for k, i in enumerate(indices):
        scores = logliks[4 * k:4 * k + 4]
        samples.append({"index": i, "subject": test[i]["subject"], "pred": argmax(scores),
                        "gold": test[i]["answer"], "logliks": scores})
        by_subject.setdefault(test[i]["subject"], []).append(samples[-1]["pred"] == samples[-1]["gold"])
    metrics = {"acc": mean(s["pred"] == s["gold"] for s in samples),  # micro: every question counts once
               "acc_per_subject": {subject: mean(hits) for subject, hits in sorted(by_subject.items())}}
    return {"metrics": metrics, "n": len(samples), "samples": samples}


def eval_truthfulqa(model, tokenizer, settings, data_dir, which: str) -> dict:
    rows, targets = load_truthfulqa(data_dir), f"{which}_targets"
    indices = subset(len(rows), settings["limit"].get(f"truthfulqa_{which}"), settings["seed"])  # MC1, MC2: same
    requests = [(truthfulqa_prompt(rows[i]["question"]), f" {choice}") for i in indices
                for choice in rows[i][targets]["choices"]]
    logliks = loglikelihoods(model, tokenizer, requests, settings["batch_size"], desc=f"truthfulqa_{which}")
    samples, start = [], 0
    for i in indices:
        labels = rows[i][targets]["labels"]
        scores, start = logliks[start:start + len(labels)], start + len(labels)
        if which == "mc1":  # the true choice is listed first
            samples.append({"index": i, "pred": argmax(scores), "gold": 0, "logliks": scores})
        else:
            samples.append({"index": i, "gold": labels, "logliks": scores, "score": mc2_score(scores, labels)})
    metrics = {"acc": mean(s["pred"] == 0 for s in samples)} if which == "mc1" else \
        {"mc2": mean(s["score"] for s in samples)}
    return {"metrics": metrics, "n": len(samples), "samples": samples}


def mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def evaluate(model, tokenizer, tasks=("gsm8k",), limit=None, seed=1234, batch_size=16, data_dir=DATA_DIR,
             gsm8k_shots=5, mmlu_shots=5, fewshot_seed=1234, max_new_tokens=256, verbose=False) -> dict:
    """Score `model` on `tasks`; returns {"settings": ..., "tasks": {task: {"metrics", "n", "samples"}}}.
    limit: None (full sets), an int for every task, or a {task: int} dict (see PAPER_LIMITS)."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {TASKS}")
    limits = {task: limit.get(task) if isinstance(limit, dict) else limit for task in tasks}
    settings = dict(tasks=list(tasks), limit=limits, seed=seed, fewshot_seed=fewshot_seed, gsm8k_shots=gsm8k_shots,
                    mmlu_shots=mmlu_shots, max_new_tokens=max_new_tokens, batch_size=batch_size)
    results = {}
    for task in tasks:
        began = time.time()
        if task == "gsm8k":
            results[task] = eval_gsm8k(model, tokenizer, settings, data_dir)
        elif task == "mmlu":
            results[task] = eval_mmlu(model, tokenizer, settings, data_dir)
        else:
            results[task] = eval_truthfulqa(model, tokenizer, settings, data_dir, task.split("_")[1])
        if verbose:
            shown = {k: round(v, 4) for k, v in results[task]["metrics"].items() if isinstance(v, float)}
            print(f"{task}: n={results[task]['n']} {shown} ({time.time() - began:.0f} s)", file=sys.stderr)
    return {"settings": settings, "tasks": results}


# ---------------------------------------------------------------------------------------------------
# Locality: how familiar the states a step supervises are to the learner (state_nll, every step), and how
# far the learner moved from its start on its own states (kl_to_start, at each periodic eval)


def starting_model(args, device, dtype):
    """The model a run started from, frozen, loaded once per run, held as the learner's weights are (fp32
    master weights, or a LoRA's base in the compute dtype): under the same autocast it computes exactly
    what the learner did at step 0, so kl_to_start reads 0 there and a KL penalty starts at 0."""
    return load_frozen(args.model, device, dtype if args.lora_rank else torch.float32)


@functools.lru_cache(maxsize=1)
def load_frozen(name_or_path, device, dtype):
    return Qwen3.from_pretrained(name_or_path, device=device, dtype=dtype).requires_grad_(False)


@torch.no_grad()
def kl_to_start(model, start, tokenizer, prompts: list, max_new_tokens: int, seed: int = 0, batch_size=16) -> float:
    """Per-token KL(learner || starting model) on the learner's own states: the learner answers the
    prompts at temperature 1, and log π(y_t|s_t) - log π_start(y_t|s_t) is averaged over the sampled
    tokens (a Monte Carlo estimate: exact in expectation, 0 for the starting model itself)."""
    answers = rollout(model, tokenizer, prompts, max_new_tokens, 1.0, seed, GSM8K_STOP_STRINGS, batch_size,
                      desc="kl_to_start")
    total = count = 0.0
    for i in range(0, len(prompts), batch_size):
        seqs = [p + a for p, a in zip(prompts[i:i + batch_size], answers[i:i + batch_size])]
        starts = [len(p) for p in prompts[i:i + batch_size]]
        logprobs, mask = completion_logprobs(model, seqs, starts, vocab_limit=tokenizer.n_real_tokens)
        start_logprobs, _ = completion_logprobs(start, seqs, starts, vocab_limit=tokenizer.n_real_tokens)
        total, count = total + ((logprobs - start_logprobs) * mask).sum().item(), count + mask.sum().item()
    return total / max(count, 1)


def state_nll(logprobs, mask) -> float:
    """Mean per-token NLL, under the current learner, of the state tokens a step trains on (SFT: dataset
    prefixes; RL and OPD: the learner's own samples; off-policy distillation: the teacher's)."""
    return -(logprobs.detach() * mask).sum().item() / max(1, mask.sum().item())


# ---------------------------------------------------------------------------------------------------
# Training-time measurement, shared by the trainers: metrics.jsonl and the periodic held-out eval


class MetricsLog:
    """metrics.jsonl, one JSON line per step (and one per eval), a progress line per step and a progress bar
    with rate and ETA (rank 0). "step" is the number of steps done: the eval at step N scores the model a
    checkpoint at N holds. A figure that is NaN or infinite is written null, its name listed in not_finite."""

    def __init__(self, out_dir, steps: int, start_step: int = 0):
        self.path, self.steps, self.on = Path(out_dir) / "metrics.jsonl", steps, rank_and_world()[0] == 0
        if self.on:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = self.path.read_text().splitlines() if self.path.exists() and start_step else []  # --resume
            self.path.write_text("".join(line + "\n" for line in kept if json.loads(line)["step"] <= start_step))
        self.bar = progress(total=steps, initial=start_step, desc="training", unit="step", disable=not self.on or None)
        self.t_last, self.step_times = time.time(), []

    def log(self, step: int, **figures):
        """A training step's figures (with tokens=, which becomes tokens/s and counts for the ETA) or an eval's."""
        now = time.time()
        if "tokens" in figures:
            self.step_times.append(now - self.t_last)
            figures["tokens_per_s"] = figures.pop("tokens") / self.step_times[-1]
            figures["step_s"] = self.step_times[-1]
            self.bar.update(1)
        self.t_last = now  # so an eval's time never counts as a step's
        if self.on:
            clean, n = finite_or_null(figures)
            not_finite = {"not_finite": [k for k in figures if clean[k] is None and figures[k] is not None]} if n else {}
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **clean, **not_finite}, allow_nan=False) + "\n")
            eta = (self.steps - step) * sum(self.step_times[-20:]) / max(1, len(self.step_times[-20:]))
            shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
            self.bar.write(f"step {step}/{self.steps} | {shown} | eta {eta // 3600:.0f}h{eta % 3600 // 60:02.0f}m")
            sys.stdout.flush()


KL_PROMPTS = 32  # fixed GSM8K test prompts the learner answers to measure its KL to the starting model


def eval_and_checkpoint(done: int, model, tokenizer, optimizer, metrics, args, dtype):
    """After `done` steps: held-out GSM8K (eval.py's protocol, a fixed subset of --eval_limit test questions)
    and the KL to the starting model on the learner's own states, every --eval_every steps and at the end,
    on rank 0; a checkpoint every --save_every steps."""
    if args.eval_every and (done % args.eval_every == 0 or done == args.steps):
        if rank_and_world()[0] == 0:
            questions = load_gsm8k("test", args.data_dir)[:KL_PROMPTS]
            prompts = tokenizer.encode_batch([gsm8k_prompt(q["question"]) for q in questions])
            with autocast(model.device, dtype):
                scores = evaluate(model, tokenizer, ("gsm8k",), limit=args.eval_limit, data_dir=args.data_dir,
                                  gsm8k_shots=args.eval_shots)
                kl = kl_to_start(model, starting_model(args, model.device, dtype), tokenizer, prompts,
                                 args.max_new_tokens, args.seed)
            accuracy = scores["tasks"]["gsm8k"]["metrics"]  # exact_match_flexible, exact_match_strict
            metrics.log(done, kl_to_start=kl, **{f"gsm8k_{name.split('_')[-1]}": value
                                                 for name, value in accuracy.items()})
        if rank_and_world()[1] > 1:
            torch.distributed.barrier()
    if done and args.save_every and done % args.save_every == 0:
        save_checkpoint(args.out_dir, model, optimizer, done)


# ---------------------------------------------------------------------------------------------------
# Drift: how far a trained model's own states moved from the base model's (the paper's MMD figure)
#
# A state is the prompt plus a generated prefix. Both models sample one rollout per prompt (same prompts, batches
# and seeds: a model against itself reads 0), each cut at 1/4, 1/2, 3/4 and all of its generated tokens (rounded
# up; a stop token stays in): fractions, not fixed positions, so every rollout gives the same number of states.

DRIFT_CUTS = (0.25, 0.5, 0.75, 1.0)
FEATURE_DIM = 4096  # hashed lexical feature buckets


def prefix_lengths(n_generated: int, cuts=DRIFT_CUTS) -> list:
    return [max(1, math.ceil(f * n_generated)) for f in cuts]


def lexical_features(texts, dim=FEATURE_DIM):
    """The paper's featurisation: counts of word unigrams, word bigrams and character 3-grams of the
    lowercased text, hashed into `dim` buckets by crc32 (stable across runs and machines, unlike hash()),
    then L2-normalised so that long and short prefixes are comparable."""
    feats = np.zeros((len(texts), dim))
    for row, text in enumerate(texts):
        text = text.lower()
        words = text.split()
        grams = ([f"w:{w}" for w in words] + [f"b:{a} {b}" for a, b in zip(words, words[1:])]
                 + [f"c:{text[i:i + 3]}" for i in range(len(text) - 2)])
        for g in grams:
            feats[row, zlib.crc32(g.encode()) % dim] += 1.0
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


@torch.no_grad()
def hidden_features(model, prompts: list, rollouts: list, cuts=DRIFT_CUTS, batch_size: int = 16):
    """Final-norm hidden states of `model`, mean-pooled over each state's generated tokens (the prompt is
    shared). The model is causal: one right-padded pass over prompt + rollout gives every prefix's states."""
    feats = []
    for start in range(0, len(prompts), batch_size):
        batch = list(zip(prompts[start:start + batch_size], rollouts[start:start + batch_size]))
        width = max(len(p) + len(r) for p, r in batch)
        idx = torch.tensor([p + r + [0] * (width - len(p) - len(r)) for p, r in batch], device=model.device)
        hidden = model(idx, return_hidden=True).float()
        for row, (prompt, rollout) in enumerate(batch):
            sums = hidden[row, len(prompt):len(prompt) + len(rollout)].cumsum(0)
            feats += [(sums[k - 1] / k).cpu().numpy() for k in prefix_lengths(len(rollout), cuts)]
    return np.stack(feats).astype(np.float64)


def squared_distances(x, y):
    return np.maximum((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T, 0.0)


def mmd2(x, y, bandwidth=None, unbiased=True, groups=None):
    """MMD² of samples x (m, d) and y (n, d), RBF kernel exp(-|a-b|² / 2bw²), bandwidth by default the median
    pairwise distance of the pooled samples; returns (mmd2, bandwidth). Unbiased leaves out the pairs of a point
    with itself, or with groups=(labels_x, labels_y) all pairs sharing a label: one prompt's states are not
    independent draws, and their pairs would read as drift between two samples of one model. Biased keeps all."""
    if bandwidth is None:
        pooled = np.concatenate([x, y])
        distances = np.sqrt(squared_distances(pooled, pooled)[np.triu_indices(len(pooled), k=1)])
        bandwidth = float(np.median(distances)) or 1.0  # all points equal: any bandwidth gives 0
    kernel = lambda a, b: np.exp(-squared_distances(a, b) / (2 * bandwidth ** 2))  # noqa: E731
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    if not unbiased:
        return float(kxx.mean() + kyy.mean() - 2 * kxy.mean()), bandwidth
    gx, gy = map(np.asarray, groups if groups is not None else (range(len(x)), range(len(x), len(x) + len(y))))
    term = lambda k, a, b: k[a[:, None] != b[None, :]].mean()  # noqa: E731
    return float(term(kxx, gx, gx) + term(kyy, gy, gy) - 2 * term(kxy, gx, gy)), bandwidth


def centroid_distance(x, y) -> float:
    return float(np.linalg.norm(x.mean(0) - y.mean(0)))


def sliced_wasserstein(x, y, n_projections=128, seed=0) -> float:
    """Mean over seeded random unit directions of the exact 1-D Wasserstein-1 distance of the projections:
    the integral of |quantile_x(u) - quantile_y(u)|, step functions summed over their merged steps."""
    directions = np.random.default_rng(seed).standard_normal((x.shape[1], n_projections))
    px, py = (np.sort(s @ (directions / np.linalg.norm(directions, axis=0)), axis=0) for s in (x, y))
    edges = np.unique(np.concatenate([np.linspace(0, 1, len(x) + 1), np.linspace(0, 1, len(y) + 1)]))
    mids = (edges[1:] + edges[:-1]) / 2
    gaps = np.abs(px[(mids * len(x)).astype(int)] - py[(mids * len(y)).astype(int)])
    return float((np.diff(edges)[:, None] * gaps).sum(0).mean())


def drift_distances(x, y, groups=None) -> dict:
    mmd, bandwidth = mmd2(x, y, groups=groups)
    return {"mmd2": mmd, "mmd2_biased": mmd2(x, y, bandwidth, unbiased=False)[0], "bandwidth": bandwidth,
            "centroid": centroid_distance(x, y), "sliced_wasserstein": sliced_wasserstein(x, y)}


@torch.no_grad()
def state_drift(model, reference, tokenizer, prompts: list, max_new_tokens=128, temperature=1.0, seed=0,
                batch_size=16, cuts=DRIFT_CUTS) -> dict:
    """Distances between the states of `model` and `reference` (the base) on the text `prompts`, featurised
    twice: lexically, and by the reference's hidden states (one feature map for both sets; the paper names
    its lexical-only features a limitation). tokenizer: encode_batch, decode, stop_ids, n_real_tokens."""
    encoded, states, lengths = tokenizer.encode_batch(prompts), {}, {}
    for name, sampler in (("model", model), ("reference", reference)):
        rollouts = rollout(sampler, tokenizer, encoded, max_new_tokens, temperature, seed, batch_size=batch_size,
                           desc=f"drift: {name}")
        texts = [tokenizer.decode(r[:k]) for r in rollouts for k in prefix_lengths(len(r), cuts)]
        states[name] = (lexical_features(texts), hidden_features(reference, encoded, rollouts, cuts, batch_size))
        lengths[name] = mean(len(r) for r in rollouts)
    groups = (np.repeat(np.arange(len(prompts)), len(cuts)),) * 2  # a state's label: its prompt
    return {"n_prompts": len(prompts), "n_states": len(prompts) * len(cuts), "cuts": list(cuts),
            "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed, "mean_new_tokens": lengths,
            **{kind: drift_distances(states["model"][i], states["reference"][i], groups)
               for i, kind in enumerate(("lexical", "hidden"))}}


# ---------------------------------------------------------------------------------------------------
# Table 2: scores, Forgetting and Retention


def headline(results: dict) -> dict:
    """One number per task, in percent: GSM8K flexible and strict, MMLU, TruthfulQA MC1 and MC2."""
    tasks, scores = results["tasks"], {}
    if "gsm8k" in tasks:
        scores["gsm8k_flexible"] = tasks["gsm8k"]["metrics"]["exact_match_flexible"]
        scores["gsm8k_strict"] = tasks["gsm8k"]["metrics"]["exact_match_strict"]
    for task, metric in (("mmlu", "acc"), ("truthfulqa_mc1", "acc"), ("truthfulqa_mc2", "mc2")):
        if task in tasks:
            scores[task] = tasks[task]["metrics"][metric]
    return {name: 100 * score for name, score in scores.items() if score is not None}  # null: not finite


def report(paths: list, truthfulqa: str = "mc2") -> str:
    """Markdown table: the first file is the base model. Forgetting (base - post, in points) and
    Retention (post / base) are averaged over TruthfulQA (MC1 or MC2) and MMLU, the paper's definition.
    Drift is the lexical state MMD² against the file's --drift_reference, where it has one."""
    runs = []
    for path in paths:
        try:
            runs.append((Path(path).stem, json.loads(Path(path).read_text(encoding="utf-8"))))
            runs[-1][1]["tasks"].items()
        except (OSError, ValueError, KeyError, AttributeError) as e:
            fail(f"--report {path}: not a results file of eval.py ({type(e).__name__}: {e})")
    base_name, base = runs[0]
    kept = ("mmlu", f"truthfulqa_{truthfulqa}")
    columns = ["gsm8k_flexible", "gsm8k_strict", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2"]
    lines = ["| run | GSM8K (flex) | GSM8K (strict) | MMLU | TruthfulQA MC1 | TruthfulQA MC2 | Forgetting ↓ "
             "| Retention ↑ | Drift (MMD²) |", "|---|---|---|---|---|---|---|---|---|"]
    base_scores = headline(base)
    for name, results in runs:
        for task in results["tasks"].keys() & base["tasks"].keys():
            if [s["index"] for s in results["tasks"][task]["samples"]] != \
                    [s["index"] for s in base["tasks"][task]["samples"]]:
                print(f"warning: {name} scored other {task} examples than {base_name} (--limit/--seed)",
                      file=sys.stderr)
        scores = headline(results)
        cells = [f"{scores[c]:.1f}" if c in scores else "–" for c in columns]
        if name != base_name and all(k in scores and base_scores.get(k) for k in kept):  # base 0: no ratio
            forgetting = mean(base_scores[k] - scores[k] for k in kept)
            retention = mean(scores[k] / base_scores[k] for k in kept)
            cells += [f"{forgetting:.1f}", f"{100 * retention:.1f}%"]
        else:
            cells += ["–", "–"]
        cells.append(f"{results['drift']['lexical']['mmd2']:.4f}" if "drift" in results else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"\nForgetting and Retention average MMLU and TruthfulQA {truthfulqa.upper()} against {base_name}.")
    drifts = [results["drift"] for _, results in runs if "drift" in results]
    for drift in sorted({f"{d['reference']} ({d['n_prompts']} GSM8K prompts, {d['max_new_tokens']} new tokens, "
                         f"temperature {d['temperature']}, seed {d['seed']})" for d in drifts}):
        lines.append(f"Drift: lexical state MMD² against {drift}.")  # one line per setting: compare within one
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# CLI

def parse_limit(text):
    """'500' -> 500; 'paper' -> PAPER_LIMITS; 'gsm8k=500,mmlu=500,truthfulqa=200' -> a dict
    ('truthfulqa' sets both MC1 and MC2, which then score the same questions)."""
    if text is None or text == "paper":
        return None if text is None else dict(PAPER_LIMITS)
    if text.isdigit() and int(text) > 0:
        return int(text)
    limits = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        matched = [task for task in TASKS if task == name or task.startswith(name + "_")]
        if not matched or not value.isdigit() or int(value) == 0:  # 0 would score nothing: a mean of nothing
            raise argparse.ArgumentTypeError(f"bad item {item!r}: expected N, 'paper' or TASK=N, with N >= 1")
        limits.update({task: int(value) for task in matched})
    return limits


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or Hugging Face hub id (with its tokenizer.json)")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma-separated subset of {','.join(TASKS)}; '' or none: no task (drift only)")
    parser.add_argument("--limit", type=parse_limit, default=None,
                        help="score a fixed seeded subset: N for every task, 'paper' (500 GSM8K, 500 MMLU, "
                             "200 TruthfulQA) or e.g. gsm8k=500,mmlu=500,truthfulqa=200; default: full test sets")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the --limit subsets (recorded in the output)")
    parser.add_argument("--fewshot_seed", type=int, default=1234,
                        help="seed of GSM8K's few-shot draws (lm-eval's default)")
    parser.add_argument("--gsm8k_shots", type=nonnegative_int, default=5,
                        help="GSM8K few-shot examples, from the train split")
    parser.add_argument("--mmlu_shots", type=nonnegative_int, default=5,
                        help="MMLU few-shot examples: each subject's first k dev rows (at most 5)")
    parser.add_argument("--max_new_tokens", type=positive_int, default=256,
                        help="GSM8K generation length (lm-eval's default)")
    parser.add_argument("--batch_size", type=positive_int, default=16, help="sequences per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="weights dtype; auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--data_dir", default=str(DATA_DIR), help="prepared data (downloaded here on first use)")
    parser.add_argument("--out", default="results.json", help="where to write the results")
    parser.add_argument("--drift_reference", metavar="BASE",
                        help="also measure state drift from BASE (folder or hub id)")
    parser.add_argument("--drift_prompts", type=positive_int, default=100,
                        help="GSM8K test questions to roll out (seeded; at least 2)")
    parser.add_argument("--drift_max_new_tokens", type=positive_int, default=128, help="rollout length for drift")
    parser.add_argument("--drift_temperature", type=nonnegative_float, default=1.0,
                        help="rollout sampling temperature")
    parser.add_argument("--drift_seed", type=int, default=0, help="seed of the drift prompts and rollouts")
    parser.add_argument("--report", nargs="+", metavar="RESULTS_JSON",
                        help="print Table 2 from results files instead of evaluating; the first is the base model")
    parser.add_argument("--truthfulqa_metric", default="mc2", choices=["mc1", "mc2"],
                        help="which TruthfulQA score Forgetting and Retention average with MMLU")
    args = parser.parse_args(argv)
    if args.report:
        print(report(args.report, args.truthfulqa_metric))
        return
    tasks = check_args(parser, args)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model, tokenizer = load_for_eval(args.model, args.device, dtype, "--model")
    reference = None
    if args.drift_reference:  # loaded before any scoring: a bad reference must not cost the evaluation
        reference, reference_tokenizer = load_for_eval(args.drift_reference, args.device, dtype, "--drift_reference")
        if reference_tokenizer.tok.to_str() != tokenizer.tok.to_str():
            fail(f"--drift_reference {args.drift_reference}: its tokenizer differs from --model {args.model}'s; "
                 "drift compares the two models' states token by token")
    check_data(parser, args, tasks)
    results = evaluate(model, tokenizer, tasks, args.limit, args.seed, args.batch_size, args.data_dir,
                       args.gsm8k_shots, args.mmlu_shots, args.fewshot_seed, args.max_new_tokens, verbose=True)
    settings = {**results["settings"], "device": args.device, "dtype": str(dtype).replace("torch.", "")}
    results = {"model": args.model, "settings": settings, "tasks": results["tasks"]}
    if reference is not None:
        test = load_gsm8k("test", args.data_dir)
        prompts = [gsm8k_prompt(test[i]["question"]) for i in subset(len(test), args.drift_prompts, args.drift_seed)]
        drift = state_drift(model, reference, tokenizer, prompts, args.drift_max_new_tokens, args.drift_temperature,
                            args.drift_seed, args.batch_size)
        results["drift"] = {"reference": args.drift_reference, **drift}
        del reference  # free its memory for whatever runs next in this process
        torch.cuda.empty_cache()  # a no-op where CUDA was never used
        print(f"drift: MMD² lexical {drift['lexical']['mmd2']:.4f} hidden {drift['hidden']['mmd2']:.4f}",
              file=sys.stderr)
    tmp = Path(f"{args.out}.tmp")  # written whole, then renamed: an older results file survives a failure
    tmp.write_text(json.dumps(no_nan(results), indent=1, allow_nan=False))
    os.replace(tmp, args.out)
    print(" ".join(f"{name}={score:.1f}" for name, score in headline(results).items()), f"-> {args.out}")


def check_args(parser, args) -> list:
    """Every flag, the output file and the data, before a model loads: a bad one is one line. Returns the tasks."""
    if not args.model:
        parser.error("--model is required (or --report)")
    tasks = [t for t in ("" if args.tasks == "none" else args.tasks).split(",") if t]
    if unknown := sorted(set(tasks) - set(TASKS)):
        parser.error(f"--tasks: unknown task(s) {', '.join(unknown)}; choose from {','.join(TASKS)}")
    if not tasks and not args.drift_reference:
        parser.error("--tasks: none given, and no --drift_reference: nothing to do")
    if args.drift_reference and args.drift_prompts < 2:
        parser.error("--drift_prompts must be at least 2 (MMD² compares states of different prompts)")
    check_device(args.device)
    check_writable_file(args.out, "--out")
    return tasks


def check_data(parser, args, tasks):
    """Every file the tasks read, checked row by row (and downloaded if missing), and the shots they have."""
    if "gsm8k" in tasks and args.gsm8k_shots > len(load_gsm8k("train", args.data_dir)):
        parser.error(f"--gsm8k_shots {args.gsm8k_shots}: more than the train split's "
                     f"{len(load_gsm8k('train', args.data_dir))} examples")
    if "mmlu" in tasks:
        dev_rows = {}
        for row in load_mmlu("dev", args.data_dir):
            dev_rows[row["subject"]] = dev_rows.get(row["subject"], 0) + 1
        if args.mmlu_shots > min(dev_rows.values()):
            parser.error(f"--mmlu_shots {args.mmlu_shots}: more than the {min(dev_rows.values())} dev examples "
                         "some subjects have")
        load_mmlu("test", args.data_dir)  # read (and checked) now rather than after GSM8K is scored
    if any(t.startswith("truthfulqa") for t in tasks):
        load_truthfulqa(args.data_dir)
    if args.drift_reference and args.drift_prompts > len(load_gsm8k("test", args.data_dir)):
        parser.error(f"--drift_prompts {args.drift_prompts}: more than the GSM8K test split's questions")


def load_for_eval(name, device, dtype, flag):
    """Model and tokenizer, with anything wrong, NaN weights included, one line naming the flag."""
    try:
        tokenizer = Tokenizer.from_pretrained(name)
        model = Qwen3.from_pretrained(name, device=device, dtype=dtype).eval()
    except (FileNotFoundError, ValueError) as e:  # bad input: one line naming the flag, no traceback
        raise SystemExit(f"{flag}: {e}")
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        fail(f"{flag} {name}: its weights hold NaN or infinite values, so every score would be meaningless")
    return model, tokenizer


def no_nan(results: dict) -> dict:
    """JSON has no NaN: a task with any non-finite number (a model whose log-likelihoods overflow) gets null
    metrics and the reason, never a score computed from NaN (MMLU's argmax would read 25%, not 'broken')."""
    for name, task in results["tasks"].items():
        task, n = finite_or_null(task)
        results["tasks"][name] = task
        if n:
            task["metrics"] = {k: None for k in task["metrics"]}
            task["invalid"] = f"{n} numbers are NaN or infinite: the model's outputs are not finite"
            print(f"warning: {name}: {task['invalid']}; its metrics are null", file=sys.stderr)
    return finite_or_null(results)[0]

if __name__ == "__main__":
    main()
