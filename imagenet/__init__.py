"""Real data at scale: evaluate released checkpoints on an ImageNet-style folder, and
fine-tune pruned models, on one process or many (torchrun: NCCL on GPUs, Gloo on CPUs).

    alignscan evaluate --model vim_small --checkpoint vim_s.pth --data imagenet/val
    torchrun --nproc_per_node 8 -m alignscan evaluate --model vim_small --checkpoint vim_s.pth --data imagenet/val
    alignscan finetune --model vim_small --checkpoint vim_s.pth --data imagenet/train --mode align
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m alignscan finetune --model vim_small --checkpoint vim_s.pth --data imagenet/train --mode align

Modules: ``data`` (the folder, the transforms, the datasets), ``world`` (this process's place
under torchrun), ``options`` (the command-line options, their checks, the model they name),
``evaluate`` and ``finetune`` (the two subcommands).
"""
from .evaluate import evaluate_command, evaluate_markdown
from .finetune import finetune_command
from .options import (
                      EVALUATE_DOC,
                      EVALUATE_HELP,
                      FINETUNE_DOC,
                      FINETUNE_HELP,
                      DataError,
                      add_evaluate_arguments,
                      add_finetune_arguments,
                      check_arguments,
)

__all__ = ["evaluate_command", "evaluate_markdown", "finetune_command", "add_evaluate_arguments",
           "add_finetune_arguments", "check_arguments", "EVALUATE_HELP", "EVALUATE_DOC", "FINETUNE_HELP",
           "FINETUNE_DOC", "DataError"]
