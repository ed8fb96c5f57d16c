"""
The fused sampler of model.generate: one step of temperature, top-k, top-p and a draw, for a batch
of next-token logits, with no sort of the vocabulary and, on CUDA, no host sync (a CUDA graph can
hold it).

top-k and top-p keep the first tokens of a stable sort by probability (the most likely first;
equal probabilities in id order), and the draw inverts the kept CDF, in that order, at one uniform
number per row. Sorting 151,936 logits per row used to dominate a CPU decode step; here the token
at a given cumulative mass of that order is found by a radix search over the probabilities' bits
(SortedOrder), a few passes over the vocabulary whatever the logits look like.

Exact to the bit. The search compares sums of probabilities with top_p; float sums depend on
their order (a sort's cumulative sum, a histogram's, a GPU's parallel scan differ in the last
bits), so a sum within rounding of top_p could keep a token on one path and drop it on another.
So top-k and top-p count probability in integer masses of 2^-52 (masses()): integer sums are
exact in any order, and the kept set and the drawn token are those of the sort-based definition
in these units, on any device (tests/test_model.py checks them against a sort).
"""
import math

import torch

MASS_UNIT = 2.0 ** 52  # p * 2^52 is exact in fp32 and floors exactly to int64; a row sums < 2^53
TOP_P_CANDIDATES = 1024  # on CPU, top-p first looks for the nucleus among this many top tokens


def masses(probs):
    """fp32 probabilities (any shape) -> int64 masses floor(p * 2^52), exactly, token by token."""
    return (probs * MASS_UNIT).long()


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


def sample_next(logits, temperature: float, top_k=None, top_p=None, n_real_tokens=None,
                u=None):
    """One sampling step for a batch of next-token logits (B, vocab) -> (tokens (B,), logprobs
    (B,)). Drops rows past the tokenizer (n_real_tokens), applies temperature, keeps the top_k
    most likely tokens, then the fewest most likely tokens whose probability reaches top_p (of
    what top-k kept; the token crossing p is kept; equal probabilities in id order), and draws by
    inverting the kept CDF at one uniform number per row (u (B, 1), else torch's; no host sync
    off CPU); log-probs are under that distribution."""
    logits = logits[:, :n_real_tokens].float()  # a prefix of the vocabulary: ids are unchanged
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    probs = (logits / temperature).softmax(-1)  # (B, vocab)
    u = torch.rand(len(probs), 1, device=probs.device) if u is None else u
    top_p = 1.0 if top_p is None else min(top_p, 1.0)
    if top_k is None and top_p >= 1:  # plain sampling: the CDF in vocabulary order
        cdf = probs.cumsum(-1)
        pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1)
        return pick.squeeze(-1), (probs.gather(-1, pick) / cdf[:, -1:]).log().squeeze(-1)
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
            return ids.gather(1, pick).squeeze(-1), logprobs.squeeze(-1)
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
    pick, logprobs = draw(SortedOrder(probs, mass), threshold.clamp(min=1), u)
    return pick.squeeze(-1), logprobs.squeeze(-1)
