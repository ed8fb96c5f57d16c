"""
Sampling as every script samples: rollout, generate() over whole lists of prompts with stop strings
and a progress bar, and the nucleus of top-k / top-p without sorting the vocabulary, which
model.sample_next uses when it finds this file (it keeps the same tokens as model.py's sort-based
definition, sorted_nucleus_draw, to the bit; with no host sync off the CPU, so a CUDA graph can
hold it).

top-k and top-p keep the first tokens of a stable sort by probability (the most likely first;
equal probabilities in id order), and the draw inverts the kept CDF, in that order, at one uniform
number per row. Sorting 151,936 logits per row used to dominate a CPU decode step; here the token
at a given cumulative mass of that order is found by a radix search over the probabilities' bits
(SortedOrder), a few passes over the vocabulary whatever the logits look like. The search compares
sums of probabilities with top_p: in model.masses' integer units, exact in any order, so a sum
within rounding of top_p keeps the same tokens on every path and device (tests/test_model.py
checks them against the sort).
"""
import math

import torch

from cli import progress
from model import MASS_UNIT, masses

# Rollouts: generate() for whole lists of prompts, as every script samples ------------------------


@torch.no_grad()
def rollout(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float = 0.0,
            seed: int = 0, stop_strings=(), batch_size: int = 128, desc: str = "sampling",
            rows=None) -> list:
    """One completion (token ids) per prompt: the sampler every script shares. Prompts go through
    model.generate batch_size at a time, longest first (less padding). Prompt i draws with row
    rows[i] (default i) of seed's uniform numbers (its index among every GPU's prompts, say), so
    a sample depends neither on its batch nor on how many GPUs share the work. A completion ends
    with a stop token, with the token that completes one of stop_strings (text such as
    "Question:"; checked every 16 steps), or at max_new_tokens. A progress bar (`desc`) counts
    rows x tokens on a terminal. Autocast is the caller's."""
    if not prompts:
        return []
    rows = list(range(len(prompts))) if rows is None else list(rows)
    stream = torch.Generator().manual_seed(seed)
    uniforms = torch.rand(max(rows) + 1, max_new_tokens, generator=stream)[rows]  # (n, steps)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    completions = [None] * len(prompts)
    bar = progress(total=len(prompts) * max_new_tokens, desc=desc, unit="tok", unit_scale=True,
                   leave=False)  # rows x steps, at most: the ETA is an upper bound

    def has_stop(tokens):  # does their text hold a stop string?
        return any(stop in tokenizer.decode(tokens) for stop in stop_strings)

    def every_16_steps(rows):  # generate's stop_fn: move the bar, end the rows with a stop string
        bar.update(16 * len(rows))
        return list(map(has_stop, rows))
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        new_tokens = model.generate([prompts[i] for i in batch], max_new_tokens,
                                    temperature=temperature, stop_token_ids=tokenizer.stop_ids,
                                    uniforms=uniforms[batch], n_real_tokens=tokenizer.n_real_tokens,
                                    stop_fn=every_16_steps if stop_strings or not bar.disable
                                    else None)
        bar.update((first + len(batch)) * max_new_tokens - bar.n)  # early stops: their budget
        for i, tokens in zip(batch, new_tokens):
            if has_stop(tokens):  # binary search for the shortest prefix that holds one
                lo, hi = 1, len(tokens)
                while lo < hi:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if has_stop(tokens[:mid]) else (mid + 1, hi)
                tokens = tokens[:hi]
            completions[i] = tokens
    bar.close()
    return completions


# top-k and top-p without a sort -------------------------------------------------------------------

TOP_P_CANDIDATES = 1024  # on CPU, top-p first looks for the nucleus among this many top tokens


class SortedOrder:
    """The stable sort of probs (B, n) by probability (largest first, ties by position), without
    sorting. fp32 probabilities (never negative) viewed as int32 order as the floats do, so a
    token ranks by its bits, < 2^30. crossing() finds where the cumulative mass along that order
    first exceeds a target, a digit of the bits at a time from the top (a radix search): a
    histogram of the mass over the tokens' digits finds the digit, and the next histogram looks
    only inside it. Then the position among equal probabilities."""

    def __init__(self, probs, mass):
        self.bits = probs.view(torch.int32)  # (B, n)
        self.mass = mass
        # Digits of `width` bits (15 for Qwen's vocabulary: two digits, at shifts 15 and 0); fewer
        # for small n, as a histogram holds 2^width + 2 bins per row
        self.width = min(max(probs.shape[-1].bit_length() - 1, 4), 15)
        self.shifts = [*range(30 - self.width, 0, -self.width), 0]
        self.first = self.binned(torch.zeros_like(mass[:, :1]), self.shifts[0])  # for every search
        self.total = self.first[1][:, -1:]  # (B, 1): all of a row's mass

    def binned(self, base, shift):
        """The mass of the tokens per digit at `shift`, for those whose higher bits equal base's
        (B, 1): hist (B, 2^width + 2), from the largest digit down, after a first bin with the
        mass of all more likely tokens and before a last one with the less likely; and its
        running sum cum (B, 2^width + 2)."""
        bins = 2 ** self.width + 2
        # window (B, n): (bits - base) >> shift, plus 1, clipped: the bin of each token's mass
        window = (self.bits - (base - (1 << shift)).int()) >> shift
        window = window.clamp_(0, bins - 1)
        rows = torch.arange(len(window), dtype=torch.int32, device=window.device)[:, None]
        flat = window.add_(rows * bins).view(-1)  # each row's bins after the previous row's
        hist = torch.zeros(len(window) * bins, dtype=self.mass.dtype, device=window.device)
        hist = hist.index_add_(0, flat, self.mass.view(-1)).view(len(window), bins).flip(-1)
        return hist, hist.cumsum(-1)

    def crossing(self, target):
        """The first token in the order whose cumulative mass exceeds target (B, 1), for target
        below the total: its bits (B, 1) int64, j (B, 1): how many tokens of the same probability
        come before it, and the cumulative mass through it (B, 1)."""
        base = torch.zeros_like(target)  # (B, 1): the crossing's bits, one digit at a time
        for shift in self.shifts:
            hist, cum = self.first if shift == self.shifts[0] else self.binned(base, shift)
            i = torch.searchsorted(cum, target, right=True)  # the first bin past target
            base = base + ((2 ** self.width - i) << shift)  # bin i holds digit 2^width - i
        before = cum.gather(1, i) - hist.gather(1, i)  # the mass of all more likely tokens
        # Tokens of equal probability have equal masses (the mass of these bits' probability):
        # the cumulative mass passes target at the (j+1)-th of them
        tie_mass = masses(base.int().view(torch.float32))
        j = (target - before) // tie_mass
        return base, j, before + (j + 1) * tie_mass

    def position(self, bits, j):
        """The position (B, 1) of the (j+1)-th token whose probability has these bits (B, 1)."""
        count = (self.bits == bits.int()).cumsum(-1, dtype=torch.int32)  # (B, n): so far
        return torch.searchsorted(count, j.int(), right=True)


def draw(order: SortedOrder, threshold, u):
    """Keep the first tokens of the order through the one at which the cumulative mass reaches
    threshold (B, 1) (top-p's nucleus; at most all of them) and invert their CDF, in that order,
    at the uniform numbers u (B, 1) -> (the drawn positions (B, 1), their log-probs (B, 1) under
    the kept distribution)."""
    threshold = torch.minimum(threshold, order.total)  # the masses sum to a hair off 2^52
    _, _, kept = order.crossing(threshold - 1)  # integers: "exceeds threshold - 1" is ">= it"
    bits, j, _ = order.crossing((u.double() * kept.double()).long())  # floor: in [0, kept)
    pick = order.position(bits, j)
    return pick, (order.mass.gather(1, pick).double() / kept.double()).log().float()


def nucleus_draw(probs, top_k, top_p: float, u):
    """model.sorted_nucleus_draw's tokens and log-probs (B, 1) from probs (B, V), without sorting
    the vocabulary: top-k keeps the top_k most likely tokens, top-p then the fewest most likely
    whose mass reaches top_p (of top-k's mass, with top-k), and the kept CDF is inverted at u."""
    # top-p in masses: the nucleus ends at the token whose cumulative mass reaches top_p * 2^52,
    # top_p of the whole probability (the first token at least; at most the row's mass, draw())
    threshold = torch.full_like(u, max(math.ceil(top_p * MASS_UNIT), 1), dtype=torch.long)
    # On CPU a topk is cheaper than a search: first the C most likely tokens (unless even C
    # tokens as likely as the most likely one fall short of top_p), in id order (B, C). If the
    # ones more likely than the least of them reach the threshold, every token up to the
    # crossing is among them, and searching them is searching all.
    c = min(TOP_P_CANDIDATES, probs.shape[-1])
    if (top_k is None and probs.device.type == "cpu"
            and bool((probs.amax(-1) * c >= top_p).all())):  # host syncs, on CPU only
        ids = probs.topk(c, sorted=False).indices.sort(-1).values
        top = probs.gather(1, ids)
        top_mass = masses(top)
        sure = torch.where(top > top.amin(-1, keepdim=True), top_mass, 0).sum(-1, keepdim=True)
        if bool((sure >= threshold).all()):
            pick, logprobs = draw(SortedOrder(top, top_mass), threshold, u)
            return ids.gather(1, pick), logprobs
    mass = masses(probs)  # (B, vocab)
    if top_k is not None:
        # top-k keeps the tokens more likely than the k-th most likely one and, of those as
        # likely as it, the lowest ids up to k tokens: their mass (B, 1); top-p takes its share
        k = min(top_k, probs.shape[-1])
        kth = probs.topk(k).values[:, -1:]  # the k-th largest probability (B, 1)
        above = probs > kth
        kept_by_k = (torch.where(above, mass, 0).sum(-1, keepdim=True)
                     + (k - above.sum(-1, keepdim=True)) * masses(kth))
        threshold = (kept_by_k.double() * top_p).ceil().long()
    return draw(SortedOrder(probs, mass), threshold.clamp(min=1), u)
