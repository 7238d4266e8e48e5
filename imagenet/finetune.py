"""``finetune``: a pruned model fine-tuned from a checkpoint on an ImageNet-style train folder,
one process or many (DistributedDataParallel), a checkpoint in the official layout every
epoch, ``--resume``, and a JSON-lines log."""
from __future__ import annotations

import json
import math
import random
import time

from alignscan import registry
from alignscan.outputs import progress_bar

from . import recipe as recipes
from .data import Images, collate, image_folder, train_transform
from .options import DataError, build, check_resumable, load_weights
from .world import World

__all__ = ["finetune_command"]


def finetune_command(args, backend=None):
    """The `finetune` subcommand (``args``: its parsed options; ``backend``: the scan backend
    the model is built with, None for the registry's default); returns its summary (steps,
    checkpoint, log, settings)."""
    world = World()
    try:
        return _finetune(args, backend, world)[0]
    finally:
        world.close()


def _finetune(args, backend, world):
    import torch

    from alignscan.bridges import resolve_backend
    from alignscan.models.checkpoints import checkpoint_state_dict, write_checkpoint
    cfg = recipes.resolve(registry.family(args.model), args)
    cfg["epochs"] = args.epochs
    random.seed(args.seed + world.rank)               # timm's augmentations draw from random and torch
    torch.manual_seed(args.seed + world.rank)
    folder = image_folder(args.data, args.limit)
    model = build(args.model, len(folder.classes), args.mode, args.keep, args.conv, args.metric,
                  backend, args.img_size, drop_path=cfg["drop_path"])
    if args.checkpoint is not None and args.resume is None:
        load_weights(model, args.checkpoint, len(folder.classes))
    elif args.resume is None and world.main:
        print(f"finetune: training {args.model} from random weights (--from-scratch): no checkpoint given")
    model = model.to(world.device)
    dataset = Images(folder, range(len(folder)), train_transform(args.img_size, cfg))
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=world.size, rank=world.rank,
                                                              shuffle=True, seed=args.seed, drop_last=True) \
        if world.size > 1 else None
    generator = torch.Generator().manual_seed(args.seed)
    # Every rank gets the same number of images (the sampler drops the remainder of n / world)
    # and so the same number of steps; a last, smaller batch is kept, so that a folder smaller
    # than one batch (--limit) still trains.
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=sampler is None, sampler=sampler,
                                         num_workers=args.workers, drop_last=False, generator=generator,
                                         collate_fn=collate)
    if len(dataset) < world.size:
        raise DataError(f"--data {args.data}: {len(dataset)} image(s) for {world.size} processes: each needs one")
    steps_per_epoch = max(1, len(loader))
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    step, blob = 0, None
    if args.resume is not None:
        blob = check_resumable(args.resume)
        try:
            model.load_state_dict(checkpoint_state_dict(blob, args.resume))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise DataError(f"--resume {args.resume} does not fit {args.model} ({args.mode}): "
                            f"{str(exc).splitlines()[0][:300]}") from None
        step = int(blob["step"])
    parts = recipes.Recipe(cfg, model, len(folder.classes), args.epochs)    # EMA starts from these weights
    if blob is not None:
        try:
            lacking = parts.load_state_dict(blob)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise DataError(f"--resume {args.resume}: its optimizer or EMA does not fit this run: "
                            f"{str(exc).splitlines()[0][:300]}") from None
        if lacking and world.main:
            consequence = {"model_ema": "the EMA restarts from its weights",
                           "scheduler": "the schedule is recomputed from the epoch"}
            print(f"finetune: --resume {args.resume} has no {' or '.join(lacking)} (an older checkpoint): "
                  f"{'; '.join(consequence[k] for k in lacking)}")
    wrapped = model
    if world.size > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[world.local_rank] if world.device.type == "cuda" else None)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "finetune_log.jsonl"
    if world.main:
        # A fresh run (--overwrite, checked before any work) starts a new log; a resumed one
        # marks where it took over, so the step numbers read on.
        start = {"run": "resumed" if args.resume is not None else "started", "step": step,
                 "from": str(args.resume or args.checkpoint or "random weights"), "time": time.time(),
                 "recipe": cfg}
        with open(log_path, "a" if args.resume is not None else "w") as log:
            log.write(json.dumps(start) + "\n")
    unreadable = 0
    last_checkpoint = None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg["amp"] and world.device.type == "cuda" else None
    wrapped.train()
    start_epoch = step // steps_per_epoch
    for epoch in range(start_epoch, args.epochs):
        if step >= total_steps:
            break
        dataset.epoch = epoch
        if sampler is not None:
            sampler.set_epoch(epoch)
        skip = step - epoch * steps_per_epoch          # batches of this epoch done before a resume
        lr = parts.start_epoch(epoch)
        bar = progress_bar(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not world.main,
                           leave=False)
        t0, seen, value = time.perf_counter(), 0, float("nan")
        for k, (_, images, labels, bad) in enumerate(loader):
            if k < skip:
                continue
            if step >= total_steps:
                break
            if bad and not args.skip_unreadable:
                raise DataError(f"unreadable image {bad[0][1]} (use --skip-unreadable to skip and count them)")
            unreadable += len(bad)
            if images is None:
                raise DataError(f"a whole batch of images is unreadable (first: {bad[0][1]}): nothing to train on")
            mixed = parts.mix(images.to(world.device), labels.to(world.device))
            if mixed is None:                          # a last batch of one image: nothing to mix
                continue
            images, targets = mixed
            if autocast is not None:
                with autocast:
                    loss = parts.loss(wrapped(images), targets)
            else:
                loss = parts.loss(wrapped(images), targets)
            parts.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            parts.clip(model)
            parts.optimizer.step()
            if parts.ema is not None:
                parts.ema.update(model, step=step)
            step += 1
            seen += len(images) * world.size
            value = loss.detach().float()
            world.all_reduce(value)
            value = float(value) / world.size
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss is not finite at step {step}: {value}")
            bar.update(1)
            if world.main:
                record = {"epoch": epoch + 1, "step": step, "loss": value, "lr": lr,
                          "images_per_s": seen / (time.perf_counter() - t0)}
                with open(log_path, "a") as log:
                    log.write(json.dumps(record) + "\n")
        bar.close()
        if world.main:
            extra = {"epoch": epoch + 1, "step": step, **parts.state_dict(), "recipe": cfg,
                     "args": {k: str(v) for k, v in vars(args).items()},
                     "meta": {"epoch": epoch + 1, "step": step, "alignscan": "finetune"}}
            last_checkpoint = args.out / f"checkpoint_{args.model}_{args.mode}.pth"
            write_checkpoint(last_checkpoint, args.model, model.state_dict(), extra)
            print(f"epoch {epoch + 1}: step {step}, loss {value:.4f}, checkpoint {last_checkpoint}")
        world.barrier()
    summary = {"backend": resolve_backend(world.device.type, backend), "model": args.model, "mode": args.mode, "steps": step, "world_size": world.size, "recipe": cfg,
               "unreadable_skipped": unreadable,
               "checkpoint": str(last_checkpoint) if last_checkpoint else None, "log": str(log_path)}
    return summary, model
