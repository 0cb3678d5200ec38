"""`livevlm train RECIPE.yaml [section.key=value …]`: train a streaming model, resuming where it stopped.

Several GPUs: `accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml -m livevlm.cli train
RECIPE.yaml` (also `deepspeed_zero3.yaml`, `fsdp.yaml`).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

from livevlm.cli import CommandError


@dataclass
class TrainArgs:
    """Arguments of `livevlm train RECIPE.yaml [section.key=value …]`."""

    recipe: str = field(metadata={"help": "YAML recipe (see recipes/)"})
    overrides: list[str] = field(default_factory=list, metadata={
        "nargs": "*", "help": "recipe overrides, e.g. train.lr=1e-4 train.max_steps=100"})
    resume: str = field(default="auto", metadata={
        "help": "'auto': continue from the newest complete checkpoint in train.output_dir; 'never': start "
                "over; or a checkpoint-N folder"})
    keep_checkpoints: int = field(default=2, metadata={"help": "Trainer checkpoints kept (oldest deleted)"})


def train(args: TrainArgs) -> int:
    """Load the recipe, size the CPU thread pool to this process's share, train, print the result."""
    from livevlm.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # a bad key is named before anything loads
    if args.keep_checkpoints < 1:
        raise CommandError(f"--keep-checkpoints must be at least 1 (resuming needs one), got {args.keep_checkpoints}")
    import torch

    from livevlm import runtime
    from livevlm.train import train as train_model

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # processes on this machine (torchrun/accelerate)
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if local_world > gpus:  # NCCL would fail later with "Duplicate GPU detected"
            raise CommandError(f"{local_world} training processes were launched on this machine but it has {gpus} "
                               f"visible GPU(s): launch at most {gpus} per machine (--nproc_per_node / "
                               "--num_processes), or set CUDA_VISIBLE_DEVICES= to train on the CPU")
    else:  # one process per core group under a CPU launcher
        torch.set_num_threads(max(1, runtime.usable_cores() // local_world))
    finished = False
    try:
        folder = train_model(recipe, resume=args.resume, keep_checkpoints=args.keep_checkpoints)
        finished = True
    finally:
        end_process_group(finished)
    print(f"livevlm checkpoint: {folder}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one of several processes (torchrun/accelerate)
        leave_without_finalizing(0)
    return 0


def end_process_group(finished: bool = False) -> None:
    """Destroy the process group a multi-process launch made (the Trainer's accelerate creates it), if any.

    Why: a process that exits with a live gloo group can abort in interpreter shutdown ("terminate called
    without an active exception", SIGABRT) when gloo's worker threads outlive Python; a training that
    finished and wrote its checkpoint would then exit non-zero. The command owns the process, so it ends
    the group; the library's `train()` leaves it alone for callers that train again in one process. The
    ranks first wait for each other (`finished`: a rank that tore its group down while rank 0 still wrote
    the checkpoint aborted about one run in four on 2 CPU cores); after a failure they do not, as the other
    ranks may never arrive.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def leave_without_finalizing(code: int) -> None:
    """End a finished rank of a multi-process training now, without the interpreter's finalisation.

    Why: destroying the group does not stop gloo's worker threads at once (the Trainer's DDP wrapper still
    holds the group). A worker that completed the last barrier may still be releasing it, and with it the
    collective before it, whose tensors hold Python objects; if the interpreter is finalising by then, the
    worker's GIL acquisition ends the thread inside a noexcept destructor: std::terminate, SIGABRT, and
    torchrun reports a finished run as failed. Seen on 2 CPU cores in about 1 run in 15–40 of the
    two-process test under load, with the barrier in place; the core dump's failing thread is
    `ProcessGroupGloo::runLoop → ~AsyncBarrierWork → ~AsyncAllgatherWork → decref_pyobject → take_gil →
    pthread_exit` while the main thread is in `Py_FinalizeEx`. Everything the rank had to do is done and
    written (checkpoint, logs), so it leaves with `os._exit` after flushing, and no finalisation runs for
    that thread to race (torch's own attempt at an exit hook, pytorch/pytorch#179291, was abandoned).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(code)
