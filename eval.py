"""Measurement: a Qwen3 checkpoint on GSM8K, MMLU and TruthfulQA MC1/MC2, scored as
lm-evaluation-harness does, and the state lens that the trainers and the paper's table read.

    python eval.py --model Qwen/Qwen3-0.6B-Base --limit paper --out base.json
    python eval.py --report base.json rl.json sft.json      # Table 2 with error bars
    python eval.py --model out/rl --drift_reference Qwen/Qwen3-0.6B-Base --out rl.json  # + drift

    tasks, prompts, answers  load_gsm8k, ...; gsm8k_prompt, ...; gsm8k_correct, gsm8k_reward
    scoring                  evaluate, loglikelihoods; error bars: harness/report.py, stats.py
    the state lens           state_nll, kl_to_start, continuation_quality, state_drift

The protocol is lm-eval's (0.4.13's task yamls gsm8k, mmlu, truthfulqa_mc1/mc2), so that numbers
can be compared with lm-eval's: the same prompts, the same few-shot examples, the same answer
extraction and normalisation, and log-likelihoods tokenised the same way. --limit draws a fixed
seeded subset (the paper used 500 GSM8K, 500 MMLU and 200 TruthfulQA questions: --limit paper);
without it, the full test sets. lm-eval's `mmlu` runs 0-shot unless given --num_fewshot 5 (ours:
5, the paper's; --mmlu_shots 0 is lm-eval's default); gsm8k is 5-shot in both. MC2 sums every
choice labelled true, wherever it is listed (0.4.13's rule).

Where we differ from lm-eval, on purpose: --limit samples (lm-eval takes the first N);
log-softmax runs in fp32 (lm-eval: the model's dtype); MC2 subtracts the max log-likelihood before
exp() (lm-eval's 0/0 is a number here); greedy decoding never picks the embedding's padding rows;
"Question:" is looked for every 16 generated tokens and the text cut there (the same text as
stopping at once); special tokens other than the stop tokens stay in the decoded completion
(lm-eval drops them).
"""
import argparse
import collections
import functools
import importlib.util
import math
import random
import re
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from harness.cli import (ArgumentParser, check_device, check_writable_file, fail, limits_of,
                         load_model, nonnegative_float, nonnegative_int, positive_int, progress,
                         stops_cleanly)
from harness.report import report, scores_line, task_means, with_stderrs, write_results
from harness.resources import memory_bound_by, print_whole
from harness.stats import DRIFT_PERMUTATIONS, drift_distances, mean
from model import completion_logprobs
from sample import rollout

DATA_DIR = Path(__file__).resolve().parent / "data"
TASKS = ("gsm8k", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2")
PAPER_LIMITS = {"gsm8k": 500, "mmlu": 500, "truthfulqa_mc1": 200, "truthfulqa_mc2": 200}

# Data: the jsonl files data/prepare.py writes (it documents their format) -------------------------


def read_data(data_dir, dataset: str, filename: str) -> list:
    """Rows of data_dir/dataset/filename, each checked, prepared (downloaded) on first use
    (data/prepare.py's load); a bad line or file, or no connection, is one line."""
    prepare = prepare_module()
    try:
        return prepare.load(data_dir, dataset, filename)
    except prepare.DataError as e:  # offline, or a damaged file: one line for whichever script
        fail(str(e))


@functools.lru_cache(maxsize=1)
def prepare_module():
    """data/prepare.py, loaded by path: data/ is not a package, and no other module named `data`
    can shadow it."""
    prepare_py = Path(__file__).resolve().parent / "data" / "prepare.py"
    spec = importlib.util.spec_from_file_location("prepare", prepare_py)
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    return prepare


def load_gsm8k(split: str, data_dir=DATA_DIR) -> list:
    """GSM8K rows: question, answer (the full gold solution) and gold (its final number, normalised
    as lm-eval normalises it: '#### 1,080' -> '1080')."""
    return [{**row, "gold": normalize_gsm8k(row["answer"])}
            for row in read_data(data_dir, "gsm8k", f"{split}.jsonl")]


def load_mmlu(split: str, data_dir=DATA_DIR) -> list:
    return read_data(data_dir, "mmlu", f"{split}.jsonl")


def most_mmlu_shots(data_dir=DATA_DIR) -> int:
    """The most few-shot examples every subject has: its dev rows, the fewest of any subject."""
    return min(collections.Counter(row["subject"] for row in load_mmlu("dev", data_dir)).values())


def load_truthfulqa(data_dir=DATA_DIR) -> list:
    return read_data(data_dir, "truthfulqa", "mc.jsonl")


def subset(n_total: int, limit, seed: int) -> list:
    """Indices of the examples to score: all of them, or a fixed seeded sample of `limit`, in
    order."""
    if limit is None or limit >= n_total:
        return list(range(n_total))
    return sorted(random.Random(seed).sample(range(n_total), limit))


# Prompts: lm-eval's templates (the tests check them character by character) -----------------------

def gsm8k_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def gsm8k_fewshot_prompt(question: str, shots: list) -> str:
    """Each shot is its question and full gold solution after a space; shots end with a blank
    line."""
    return "".join(f"{gsm8k_prompt(s['question'])} {s['answer']}\n\n"
                   for s in shots) + gsm8k_prompt(question)


def gsm8k_shot_indices(n_train: int, n_test: int, shots: int, seed: int) -> list:
    """Train-set indices of the shots for each test question. lm-eval draws them from one
    random.Random(seed) per task, test question after test question; replaying the draws for the
    whole test set gives every question the shots it gets in a full lm-eval run, whichever subset we
    score."""
    rng = random.Random(seed)
    # same draws as sampling the rows
    return [rng.sample(range(n_train), shots) for _ in range(n_test)]


def mmlu_question(row: dict) -> str:
    choices = "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", row["choices"]))
    return f"{row['question'].strip()}{choices}\nAnswer:"


def mmlu_prompt(row: dict, shots: list) -> str:
    """The subject's description, then its first k dev questions answered, then the question."""
    subject = row["subject"].replace("_", " ")
    description = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return description + "".join(f"{mmlu_question(s)} {'ABCD'[s['answer']]}\n\n"
                                 for s in shots) + mmlu_question(row)


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


# Answer checking ----------------------------------------------------------------------------------

GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")  # lm-eval "strict-match": the first '#### N'
# "flexible-extract": the last number-like run
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# removed, in this order, from prediction and gold
GSM8K_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
# generation ends at the first
GSM8K_STOP_STRINGS = ("Question:", "</s>", "<|im_end|>", "<|endoftext|>")


def extract_gsm8k_answer(text: str, mode: str = "strict"):
    """The answer lm-eval's GSM8K filter extracts from a completion (a string such as '1,080.'), or
    None."""
    if mode not in ("strict", "flexible"):
        raise ValueError(f"mode must be 'strict' or 'flexible', not {mode!r}")
    matches = (GSM8K_STRICT if mode == "strict" else GSM8K_FLEXIBLE).findall(text)
    if not matches:
        return None
    match = matches[0] if mode == "strict" else matches[-1]
    # one group per alternative of the flexible regex: the one that matched
    if isinstance(match, tuple):
        match = next(group for group in match if group)
    return match.strip()


def normalize_gsm8k(text: str) -> str:
    """lm-eval's exact_match normalisation for GSM8K (regexes_to_ignore, then ignore_case)."""
    for pattern in GSM8K_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def gsm8k_correct(prediction, gold: str) -> bool:
    """Exact match after normalisation, as lm-eval scores it: '1,080.' and '$1080' match '1080',
    '1080.0' does not."""
    return prediction is not None and normalize_gsm8k(prediction) == normalize_gsm8k(gold)


def truncate_at_stop(text: str) -> str:
    for stop in GSM8K_STOP_STRINGS:
        text = text.split(stop)[0]
    return text


def gsm8k_reward(completion_text: str, gold: str) -> float:
    """The RL reward: 1.0 when the completion's flexible-extracted answer equals the gold number
    numerically ('18.0' and '$18.' earn it for 18), else 0.0. The eval's flexible score is the same
    extraction with lm-eval's string match, which '18.0' fails: the reward does not punish a
    format."""
    answer = extract_gsm8k_answer(truncate_at_stop(completion_text), "flexible")
    try:
        return float(float(normalize_gsm8k(answer)) == float(normalize_gsm8k(gold)))
    except (TypeError, ValueError):  # nothing extracted, or not a number (e.g. '1.2.3')
        return 0.0


def mc2_score(logliks: list, labels: list) -> float:
    """Probability mass of the true choices (every choice labelled 1, wherever it is listed:
    lm-eval 0.4.13; up to 0.4.8 only those before the first 0 counted), normalised over all
    choices."""
    top = max(logliks)  # subtracted for stability; it cancels in the ratio
    probs = [math.exp(ll - top) for ll in logliks]
    return sum(p for p, label in zip(probs, labels) if label == 1) / sum(probs)


def choice_logprob(logliks: list, labels: list) -> float:
    """The log of the probability of a question's true choices (each labelled 1), normalised over
    its choices: the continuous retention figure, in nats (0: certain), which moves before an
    accuracy flips. MMLU and MC1: of the one true choice; MC2: log(mc2_score)."""
    logliks = torch.tensor(logliks, dtype=torch.float64)
    true = logliks[torch.tensor(labels) == 1]
    return (torch.logsumexp(true, 0) - torch.logsumexp(logliks, 0)).item()


def argmax(values: list) -> int:
    # ties: the first, as numpy's argmax
    return max(range(len(values)), key=lambda i: (values[i], -i))


# Scoring with the model: batched log-likelihoods and greedy generation ----------------------------

def encode_pair(tokenizer, context: str, continuation: str):
    """lm-eval's tokenisation of a (context, continuation) request: trailing spaces of the context
    move to the continuation, the concatenation is encoded whole, and the continuation is what
    follows the context's own encoding. So ' A' after 'Answer:' is scored as the tokens a model
    would see."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: list, batch_size: int = 16,
                   desc: str = "scoring") -> list:
    """Summed log-probability of each (context, continuation) request's continuation tokens, in
    batches of similar lengths. model.py's completion_logprobs projects only the continuation
    positions onto the vocabulary: for MMLU that is one position in ~600."""
    pairs = [encode_pair(tokenizer, context, continuation) for context, continuation in requests]
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results = [0.0] * len(pairs)
    bar = progress(total=len(pairs), desc=desc, unit="req", leave=False)
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        logprobs, mask = completion_logprobs(model, [pairs[i][0] + pairs[i][1] for i in batch],
                                             [len(pairs[i][0]) for i in batch])
        for i, total in zip(batch, (logprobs * mask).sum(-1).tolist()):
            results[i] = total
        bar.update(len(batch))  # the longest come first: the rate rises as the bar goes
    bar.close()
    return results


def greedy_completions(model, tokenizer, prompts: list, max_new_tokens: int,
                       batch_size: int = 16) -> list:
    """Greedy completion text of each prompt, cut before the first stop token or stop string."""
    completions = rollout(model=model, tokenizer=tokenizer, prompts=tokenizer.encode_batch(prompts),
                          max_new_tokens=max_new_tokens, stop_strings=GSM8K_STOP_STRINGS,
                          batch_size=batch_size, desc="gsm8k")
    return [truncate_at_stop(tokenizer.decode(tokens)) for tokens in completions]


def eval_gsm8k(model, tokenizer, settings, data_dir) -> dict:
    train, test = load_gsm8k("train", data_dir), load_gsm8k("test", data_dir)
    indices = subset(len(test), settings["limit"].get("gsm8k"), settings["seed"])
    shots = gsm8k_shot_indices(len(train), len(test), settings["gsm8k_shots"],
                               settings["fewshot_seed"])
    prompts = [gsm8k_fewshot_prompt(test[i]["question"], [train[j] for j in shots[i]])
               for i in indices]
    completions = greedy_completions(model, tokenizer, prompts, settings["max_new_tokens"],
                                     settings["batch_size"])
    samples = []
    for i, completion in zip(indices, completions):
        pred = {mode: extract_gsm8k_answer(completion, mode) for mode in ("strict", "flexible")}
        match = {mode: int(gsm8k_correct(pred[mode], test[i]["gold"])) for mode in pred}
        samples.append({"index": i, "pred": {**pred, "completion": completion},
                        "gold": test[i]["gold"], "exact_match": match})
    metrics = task_means(samples, ("exact_match_strict", "exact_match_flexible"))
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
    samples = []
    by_subject = {}
    for k, i in enumerate(indices):
        scores = logliks[4 * k:4 * k + 4]
        gold = test[i]["answer"]
        samples.append({"index": i, "subject": test[i]["subject"], "pred": argmax(scores),
                        "gold": gold, "logliks": scores,
                        "logprob": choice_logprob(scores, [int(c == gold) for c in range(4)])})
        by_subject.setdefault(test[i]["subject"],
                              []).append(samples[-1]["pred"] == samples[-1]["gold"])
    # micro: every question counts once
    metrics = {**task_means(samples, ["acc", "logprob"]),
               "acc_per_subject": {subject: mean(hits)
                                   for subject, hits in sorted(by_subject.items())}}
    return {"metrics": metrics, "n": len(samples), "samples": samples}


def eval_truthfulqa(model, tokenizer, settings, data_dir, which: str) -> dict:
    rows = load_truthfulqa(data_dir)
    targets = f"{which}_targets"
    # MC1, MC2: same
    indices = subset(len(rows), settings["limit"].get(f"truthfulqa_{which}"), settings["seed"])
    requests = [(truthfulqa_prompt(rows[i]["question"]), f" {choice}") for i in indices
                for choice in rows[i][targets]["choices"]]
    logliks = loglikelihoods(model, tokenizer, requests, settings["batch_size"],
                             desc=f"truthfulqa_{which}")
    samples = []
    offset = 0  # this question's first choice in logliks
    for i in indices:
        labels = rows[i][targets]["labels"]
        scores = logliks[offset:offset + len(labels)]
        offset += len(labels)
        logprob = choice_logprob(scores, labels)
        if which == "mc1":  # the true choice is listed first
            samples.append({"index": i, "pred": argmax(scores), "gold": 0, "logliks": scores,
                            "logprob": logprob})
        else:
            samples.append({"index": i, "gold": labels, "logliks": scores,
                            "score": mc2_score(scores, labels), "logprob": logprob})
    # MC1's gold is 0: the true answer is listed first
    metrics = task_means(samples, ["acc" if which == "mc1" else "mc2", "logprob"])
    return {"metrics": metrics, "n": len(samples), "samples": samples}


def evaluate(model, tokenizer, tasks=("gsm8k",), limit=None, seed=1234, batch_size=16,
             data_dir=DATA_DIR, gsm8k_shots=5, mmlu_shots=5, fewshot_seed=1234, max_new_tokens=256,
             verbose=False, stderr=False) -> dict:
    """Score `model` on `tasks`; returns {"settings": ..., "tasks": {task: {"metrics", "n",
    "samples"}}}. limit: None (full sets), an int for every task, or a {task: int} dict (see
    PAPER_LIMITS). stderr: also lm-eval's `<metric>_stderr` beside each metric (results.json has
    them; the trainers' periodic evals log the scores alone)."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {TASKS}")
    limits = {task: limit.get(task) if isinstance(limit, dict) else limit for task in tasks}
    settings = dict(tasks=list(tasks), limit=limits, seed=seed, fewshot_seed=fewshot_seed,
                    gsm8k_shots=gsm8k_shots,
                    mmlu_shots=mmlu_shots, max_new_tokens=max_new_tokens, batch_size=batch_size)
    results = {}
    for task in tasks:
        began = time.time()
        if task == "gsm8k":
            results[task] = eval_gsm8k(model, tokenizer, settings, data_dir)
        elif task == "mmlu":
            results[task] = eval_mmlu(model, tokenizer, settings, data_dir)
        else:
            results[task] = eval_truthfulqa(model, tokenizer, settings, data_dir,
                                            task.split("_")[1])
        if stderr:
            results[task]["metrics"] = with_stderrs(results[task])
        if verbose:
            shown = {k: round(v, 4)
                     for k, v in results[task]["metrics"].items() if isinstance(v, float)}
            print(f"{task}: n={results[task]['n']} {shown} ({time.time() - began:.0f} s)",
                  file=sys.stderr)
    return {"settings": settings, "tasks": results}


# The state lens -----------------------------------------------------------------------------------
# How familiar a step's states are to the learner (state_nll, every step), how far the learner
# moved from its start on its own states (kl_to_start, at each periodic eval), how good a
# teacher's guidance is on them (continuation_quality), and how far they drifted (state_drift)


@torch.no_grad()
def kl_to_start(model, start_model, tokenizer, prompts: list, max_new_tokens: int, seed: int = 0,
                batch_size=16) -> float:
    """Per-token KL(learner || starting model) on the learner's own states: the learner answers
    the prompts at temperature 1, and log π(y_t|s_t) - log π_start(y_t|s_t) is averaged over the
    sampled tokens (a Monte Carlo estimate: exact in expectation, 0 for the starting model)."""
    answers = rollout(model=model, tokenizer=tokenizer, prompts=prompts,
                      max_new_tokens=max_new_tokens, temperature=1.0, seed=seed,
                      stop_strings=GSM8K_STOP_STRINGS, batch_size=batch_size, desc="kl_to_start")
    total = count = 0.0
    for i in range(0, len(prompts), batch_size):
        seqs = [p + a for p, a in zip(prompts[i:i + batch_size], answers[i:i + batch_size])]
        starts = [len(p) for p in prompts[i:i + batch_size]]
        logprobs, mask = completion_logprobs(model, seqs, starts,
                                             n_real_tokens=tokenizer.n_real_tokens)
        start_logprobs, _ = completion_logprobs(start_model, seqs, starts,
                                                n_real_tokens=tokenizer.n_real_tokens)
        total += ((logprobs - start_logprobs) * mask).sum().item()
        count += mask.sum().item()
    return total / max(count, 1)


def state_nll(logprobs, mask) -> float:
    """Mean per-token NLL, under the current learner, of the state tokens a step trains on (SFT:
    dataset prefixes; RL and OPD: the learner's own samples; off-policy distillation: the
    teacher's)."""
    return -(logprobs.detach() * mask).sum().item() / max(1, mask.sum().item())


def continuation_quality(tokenizer, states, continuations, golds) -> dict:
    """How good a teacher's guidance is on given states (train_distill.py logs it each step):
    signal_answered, the share of states whose prefix and continuation reach a final answer, and
    signal_correct, the share of those answers that are right (scored as gsm8k_reward scores).
    states: (prompt ids, prefix ids) pairs; continuations: the ids after each; golds: answers."""
    texts = [tokenizer.decode(prefix + continuation)
             for (_, prefix), continuation in zip(states, continuations)]
    answered = [GSM8K_STRICT.search(text) is not None for text in texts]
    correct = [gsm8k_reward(text, gold) == 1.0
               for text, gold, done in zip(texts, golds, answered) if done]
    return dict(signal_answered=sum(answered) / max(1, len(texts)),
                signal_correct=sum(correct) / max(1, len(correct)))


# State drift, the paper's MMD figure (--drift_reference BASE; results.json's "drift"): how far a
# trained model's own states moved from the base's. Both models sample one rollout per prompt
# (same prompts, batches and seeds: a model against itself reads 0), each cut at 1/4, 1/2, 3/4 and
# all of its generated tokens (rounded up; a stop token stays in): as many states per rollout. They
# are featurised lexically (the paper's hashed n-grams) and by the base's hidden states, and the two
# sets compared (harness/stats.py: MMD² with a permutation test, centroid, sliced Wasserstein).

DRIFT_CUTS = (0.25, 0.5, 0.75, 1.0)
FEATURE_DIM = 4096  # hashed lexical feature buckets


def prefix_lengths(n_generated: int, cuts=DRIFT_CUTS) -> list:
    return [max(1, math.ceil(f * n_generated)) for f in cuts]


def lexical_features(texts, dim=FEATURE_DIM):
    """The paper's featurisation: counts of word unigrams, word bigrams and character 3-grams of the
    lowercased text, hashed into `dim` buckets by crc32 (stable across runs and machines, unlike
    hash()), then L2-normalised so that long and short prefixes are comparable."""
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
    """Final-norm hidden states of `model`, mean-pooled over each state's generated tokens (the
    prompt is shared). The model is causal: one right-padded pass over prompt + rollout gives every
    prefix's states."""
    feats = []
    for first in range(0, len(prompts), batch_size):
        last = first + batch_size
        batch = list(zip(prompts[first:last], rollouts[first:last]))
        width = max(len(p) + len(r) for p, r in batch)
        idx = torch.tensor([p + r + [0] * (width - len(p) - len(r)) for p, r in batch],
                           device=model.device)
        hidden = model(idx, return_hidden=True).float()
        for row, (prompt, generated) in enumerate(batch):
            # (len(generated), hidden): running sums over the generated tokens' states
            sums = hidden[row, len(prompt):len(prompt) + len(generated)].cumsum(0)
            cut_lengths = prefix_lengths(len(generated), cuts)
            feats += [(sums[k - 1] / k).cpu().numpy() for k in cut_lengths]
    return np.stack(feats).astype(np.float64)


@torch.no_grad()
def state_drift(model, reference, tokenizer, prompts: list, max_new_tokens=128, temperature=1.0,
                seed=0, batch_size=16, cuts=DRIFT_CUTS) -> dict:
    """Distances between the states of `model` and `reference` (the base) on the text `prompts`,
    featurised twice: lexically, and by the reference's hidden states (one feature map for both
    sets; the paper names its lexical-only features a limitation). tokenizer: encode_batch, decode,
    stop_ids, n_real_tokens."""
    encoded = tokenizer.encode_batch(prompts)
    states = {}
    lengths = {}
    for name, sampler in (("model", model), ("reference", reference)):
        rollouts = rollout(model=sampler, tokenizer=tokenizer, prompts=encoded,
                           max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                           batch_size=batch_size, desc=f"drift: {name}")
        texts = [tokenizer.decode(r[:k]) for r in rollouts for k in prefix_lengths(len(r), cuts)]
        states[name] = (lexical_features(texts),
                        hidden_features(reference, encoded, rollouts, cuts, batch_size))
        lengths[name] = sum(map(len, rollouts)) / len(rollouts)
    groups = (np.repeat(np.arange(len(prompts)), len(cuts)),) * 2  # a state's label: its prompt
    return {"n_prompts": len(prompts), "n_states": len(prompts) * len(cuts), "cuts": list(cuts),
            "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
            "n_permutations": DRIFT_PERMUTATIONS, "mean_new_tokens": lengths,
            **{kind: drift_distances(states["model"][i], states["reference"][i], groups, seed)
               for i, kind in enumerate(("lexical", "hidden"))}}


# CLI ----------------------------------------------------------------------------------------------

def main(argv=None):
    parser = ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument
    a("--model", help="model folder or Hugging Face hub id (with its tokenizer.json), or a LoRA "
      "adapter folder (PEFT's, a LoRA run's OUT_DIR/adapter)")
    a("--base_model", help="an adapter's base model (default: the one its config names)")
    a("--tasks", default=",".join(TASKS),
      help=f"comma-separated subset of {','.join(TASKS)}; '' or none: no task (drift only)")
    a("--limit", type=limits_of(TASKS, paper=PAPER_LIMITS), default=None,
      help="score a fixed seeded subset: N for every task, 'paper' (500 GSM8K, 500 MMLU, 200 "
           "TruthfulQA) or e.g. gsm8k=500,mmlu=500,truthfulqa=200; default: full test sets")
    a("--seed", type=int, default=1234, help="seed of the --limit subsets (recorded in the output)")
    a("--fewshot_seed", type=int, default=1234,
      help="seed of GSM8K's few-shot draws (lm-eval's default)")
    a("--gsm8k_shots", type=nonnegative_int, default=5,
      help="GSM8K few-shot examples, from the train split")
    a("--mmlu_shots", type=nonnegative_int, default=5,
      help="MMLU few-shot examples: each subject's first k dev rows (at most 5)")
    a("--max_new_tokens", type=positive_int, default=256,
      help="GSM8K generation length (lm-eval's default)")
    a("--batch_size", type=positive_int, default=16, help="sequences per forward pass")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
      help="weights dtype; auto: bfloat16 on GPU, float32 on CPU")
    a("--data_dir", default=str(DATA_DIR), help="prepared data (downloaded here on first use)")
    a("--out", default="results.json", help="where to write the results")
    a("--drift_reference", metavar="BASE",
      help="also measure state drift from BASE (folder or hub id)")
    a("--drift_prompts", type=positive_int, default=100,
      help="GSM8K test questions to roll out (seeded; at least 2)")
    a("--drift_max_new_tokens", type=positive_int, default=128, help="rollout length for drift")
    a("--drift_temperature", type=nonnegative_float, default=1.0,
      help="rollout sampling temperature")
    a("--drift_seed", type=int, default=0, help="seed of the drift prompts and rollouts")
    a("--report", nargs="+", metavar="RESULTS_JSON",
      help="print Table 2 from results files instead of evaluating, with error bars and each "
           "run's differences from the first file, the base model")
    a("--truthfulqa_metric", default="mc2", choices=["mc1", "mc2"],
      help="which TruthfulQA score Forgetting and Retention average with MMLU")
    args = parser.parse_args(argv)
    if args.report:
        print_whole(report(args.report, args.truthfulqa_metric))  # a full disk: one line
        return
    tasks = check_args(parser, args)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model, tokenizer = load_model(args.model, "--model", device=args.device, dtype=dtype,
                                  base=args.base_model)
    model.eval()
    reference = None
    # loaded before any scoring: a bad reference must not cost the evaluation
    if args.drift_reference:
        reference, _ = load_model(args.drift_reference, "--drift_reference", device=args.device,
                                  dtype=dtype, like=(f"--model {args.model}", model, tokenizer))
        reference.eval()
    check_data(parser, args, tasks)
    with memory_bound_by("--batch_size", args.batch_size, "scoring"):  # else one line
        results = evaluate(model, tokenizer, tasks, args.limit, args.seed, args.batch_size,
                           args.data_dir, args.gsm8k_shots, args.mmlu_shots, args.fewshot_seed,
                           args.max_new_tokens, verbose=True, stderr=True)
    settings = {**results["settings"], "device": args.device,
                "dtype": str(dtype).replace("torch.", "")}
    results = {"model": args.model, "settings": settings, "tasks": results["tasks"]}
    if reference is not None:
        test = load_gsm8k("test", args.data_dir)
        prompts = [gsm8k_prompt(test[i]["question"])
                   for i in subset(len(test), args.drift_prompts, args.drift_seed)]
        with memory_bound_by("--batch_size", args.batch_size, "the drift's rollouts"):
            drift = state_drift(model, reference, tokenizer, prompts, args.drift_max_new_tokens,
                                args.drift_temperature, args.drift_seed, args.batch_size)
        results["drift"] = {"reference": args.drift_reference, **drift}
        del reference  # free its memory for whatever runs next in this process
        torch.cuda.empty_cache()  # a no-op where CUDA was never used
        print(f"drift: MMD² lexical {drift['lexical']['mmd2']:.4f} hidden "
              f"{drift['hidden']['mmd2']:.4f}",
              file=sys.stderr)
    # whole or not at all: an older results file survives; a full disk prints the scores and
    # saves the file beside the model (report.py)
    write_results(args.out, results, beside=args.model)
    print(scores_line(results), f"-> {args.out}")  # each score ± its standard error, in points


def check_args(parser, args) -> list:
    """Every flag, the output file and the data, before a model loads: a bad one is one line.
    Returns the tasks."""
    if not args.model:
        parser.error("--model is required (or --report)")
    tasks = [t for t in ("" if args.tasks == "none" else args.tasks).split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        parser.error(f"--tasks: unknown task(s) {', '.join(unknown)}; choose from "
                     f"{','.join(TASKS)}")
    if not tasks and not args.drift_reference:
        parser.error("--tasks: none given, and no --drift_reference: nothing to do")
    if args.drift_reference and args.drift_prompts < 2:
        parser.error("--drift_prompts must be at least 2 (MMD² compares states of different"
                     " prompts)")
    check_device(args.device)
    check_writable_file(args.out, "--out")
    return tasks


def check_data(parser, args, tasks):
    """Every file the tasks read, checked row by row (and downloaded if missing), and the shots they
    have."""
    n_train = len(load_gsm8k("train", args.data_dir)) if "gsm8k" in tasks else 0
    if "gsm8k" in tasks and args.gsm8k_shots > n_train:
        parser.error(f"--gsm8k_shots {args.gsm8k_shots}: more than the train split's {n_train} "
                     "examples")
    if "mmlu" in tasks:
        fewest = most_mmlu_shots(args.data_dir)
        if args.mmlu_shots > fewest:
            parser.error(f"--mmlu_shots {args.mmlu_shots}: more than the {fewest} dev examples "
                         "some subjects have")
        load_mmlu("test", args.data_dir)  # read (and checked) now rather than after GSM8K is scored
    if any(t.startswith("truthfulqa") for t in tasks):
        load_truthfulqa(args.data_dir)
    if args.drift_reference and args.drift_prompts > len(load_gsm8k("test", args.data_dir)):
        parser.error(f"--drift_prompts {args.drift_prompts}: more than the GSM8K test split's"
                     " questions")


if __name__ == "__main__":
    stops_cleanly(main, kept="no results written (--out is written whole, at the end)")()
