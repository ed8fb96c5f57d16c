"""
The machinery that the trainers and scripts share, kept out of the methods' way. Nothing here is a
method: the methods are in the trainers, the model in model.py, sampling in sample.py, measurement
in eval.py. docs/harness.md maps these files.

    cli.py         bad input in one line (flag types, device and file checks, load_model), the
                   progress bar, the one-line stop on SIGINT or SIGTERM of every script
    stats.py       error bars, paired differences, permutation tests, two-sample distances
    adapter.py     LoRA adapters in PEFT's format: a LoRA run's out, any script's in
    watch.py       no silent no-ops: the warnings of a run that trains on nothing
    report.py      eval.py's results files, written whole and read; Table 2 with error bars
    flags.py       the flags every trainer shares, checked together before any work
    parallel.py    DDP and FSDP2 on torch's own engines; a loss's sums over GPUs
    tracking.py    optional W&B and TensorBoard
    faults.py      what a fault costs a run: the --out_dir lock, stops, metrics.jsonl's repair
    checkpoint.py  checkpoints and --resume; the --out_dir guard
    training.py    the training harness: set-up, data order, the update, metrics, the periodic
                   eval, the final model; a trainer's one door to the rest of this folder
"""
