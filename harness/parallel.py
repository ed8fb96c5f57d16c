"""
Past one GPU, on torch's own engines. torchrun starts one process per GPU; each trains on its own
slice of every step's questions (training.batch_at), and the engine sums the gradients.

    DistributedDataParallel   under torchrun: every GPU holds the whole model and AdamW state;
                              gradients are all-reduced in buckets, overlapped with the backward
    FSDP2 (--fsdp)            fully_shard: each decoder block and the root (embeddings, final norm,
                              head) is sharded over the GPUs with its gradients and AdamW state;
                              weights are all-gathered block by block in bf16 for each pass, and
                              gradients reduce-scattered in fp32 (mixed precision)

    wrap            the learner as the trainers call it (DDP-wrapped, sharded, or itself)
    micro_batches   a step's micro-batches: gradients sync on the last one only
    gathered        whole weights for generation and eval under FSDP (see below)
    unwrap          the model itself, for checkpoints and the final save
    tokens_per_rank what a loss divides by: a mean over every GPU's tokens

Generation under FSDP: sampling runs hundreds of forward passes of one token, and gathering the
weights block by block for each would cost an all-gather per block per token. So `gathered`
all-gathers every block once, keeps the whole weights (bf16, 2 bytes a parameter) on every GPU
while it samples or evaluates, and frees them after: a rollout costs one all-gather and, for that
time, the memory of the unsharded model.
"""
import contextlib
import math
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from model import completion_logprobs


def rank_and_world():
    """(this process's rank, the number of processes): (0, 1) without torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class DistributedLearner(DistributedDataParallel):
    """DDP whose attributes fall through to the model (model.device, .lm_head, .generate), so the
    trainers use one name for both: calling it (the forward) goes through DDP's gradient hooks,
    everything else reaches the model itself, and generation never syncs anything."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(model, fsdp: bool, device, dtype):
    """The learner: sharded with --fsdp (compute in dtype, gradients reduced in fp32), wrapped in
    DDP under torchrun, else the model itself."""
    if fsdp:
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        model.cuda_graphs = False  # FSDP's hooks run in every forward: no CUDA-graph capture
        for block in model.layers:  # one all-gather unit per decoder block
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # the rest: embeddings, final norm, (tied) head
        return model
    if rank_and_world()[1] > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedLearner(model, device_ids=device_ids)  # (Qwen3 has no buffers)
    return model


def global_rows(n: int) -> range:
    """The indices of this GPU's n items among every GPU's, when each has n (rank 1 of 2 with
    8: 8..15): what a single process would number them, which keeps sampling the same."""
    return range(rank_and_world()[0] * n, (rank_and_world()[0] + 1) * n)


def reduced(value: float, op=dist.ReduceOp.SUM) -> float:
    """value combined over every GPU (sum, min, max); value itself without torchrun."""
    if rank_and_world()[1] == 1:
        return value
    on_gpu = dist.get_backend() == "nccl"
    total = torch.tensor([float(value)], device="cuda" if on_gpu else "cpu")
    dist.all_reduce(total, op=op)
    return total.item()


def tokens_per_rank(n_tokens: int) -> float:
    """The step's token count averaged over GPUs. Losses divide by it, so that once
    optimizer_step has averaged the gradients over GPUs the loss is a mean over all the step's
    tokens, not a mean of means."""
    return max(reduced(n_tokens) / rank_and_world()[1], 1)


def all_finite(value: float) -> bool:
    """Is value finite on every GPU? (A stop that one GPU took alone would hang the others.)"""
    return reduced(float(math.isfinite(value)), op=dist.ReduceOp.MIN) == 1.0


def unwrap(model):
    return getattr(model, "module", model)


def micro_batches(model, n_items: int, size: int):
    """The start index of each micro-batch of `size` items; the caller's forward and backward
    for it run inside this loop. Under DDP gradients accumulate locally and are all-reduced in
    the last micro-batch's backward only (no_sync); under FSDP every backward reduce-scatters
    into the sharded gradients (skipping that would hold a whole fp32 gradient on each GPU).
    Every GPU must run as many passes as the busiest one (each pass is a collective under FSDP,
    and DDP syncs in the last): a GPU with fewer micro-batches (RL skips groups whose rewards are
    all equal) runs passes with a zero loss."""
    starts = list(range(0, n_items, size))
    n_passes = int(reduced(len(starts), op=dist.ReduceOp.MAX))  # the busiest GPU's count
    for k in range(n_passes):
        with gradient_sync(model, last=k == n_passes - 1):
            if k < len(starts):
                yield starts[k]
            else:
                zero_loss_pass(model)


@contextlib.contextmanager
def gradient_sync(model, last: bool):
    if isinstance(model, DistributedDataParallel) and not last:
        with model.no_sync():
            yield
        return
    yield


def zero_loss_pass(model):
    """A forward and backward of a two-token sequence with a zero loss: gradients unchanged."""
    logprobs, _ = completion_logprobs(model, [[0, 0]], [1])
    (logprobs.sum() * 0.0).backward()


@contextlib.contextmanager
def gathered(model):
    """Under FSDP: every block's whole weights, gathered once (on every rank together) and kept
    for all the forward passes inside (sampling, eval: none of them then talks to the other
    GPUs), freed after. Elsewhere a no-op."""
    if not isinstance(model, FSDPModule):
        yield
        return
    blocks = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    for block in blocks:  # (the root never reshards after its forward: it is needed next)
        block.set_reshard_after_forward(False, recurse=False)
    for module in [model, *blocks]:
        module.unshard()
    try:
        yield
    finally:
        for module in [model, *blocks]:
            module.reshard()
        for block in blocks:
            block.set_reshard_after_forward(True, recurse=False)
