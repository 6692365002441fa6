"""A noisy-classifier training script in the style of guided-diffusion's classifier_train.py
(written for fastdiff's tests). Unlike the original it wraps the model in DDP only on CUDA with
device ids (the original's ``device_ids=[dev()]`` needs a GPU), so it runs on the CPU too."""

import argparse
import os

import torch as th
import torch.distributed as dist
import torch.nn.functional as F
from guided_diffusion import dist_util, logger
from guided_diffusion.fp16_util import MixedPrecisionTrainer
from guided_diffusion.image_datasets import load_data
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
)
from guided_diffusion.train_util import log_loss_dict, parse_resume_step_from_filename
from torch.nn.parallel import DistributedDataParallel
from torch.optim import AdamW


def main():
    args = create_argparser().parse_args()
    dist_util.setup_dist()
    logger.configure()

    model, diffusion = create_classifier_and_diffusion(
        **args_to_dict(args, classifier_and_diffusion_defaults().keys())
    )
    model.to(dist_util.dev())
    sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)
    start = 0
    if args.resume_checkpoint:
        start = parse_resume_step_from_filename(args.resume_checkpoint)
        logger.log(f"resuming from {args.resume_checkpoint} at step {start}")
        model.load_state_dict(dist_util.load_state_dict(args.resume_checkpoint, map_location=dist_util.dev()))
    dist_util.sync_params(model.parameters())
    trainer = MixedPrecisionTrainer(
        model=model, use_fp16=args.classifier_use_fp16, initial_lg_loss_scale=16.0
    )
    net = model
    if th.cuda.is_available():
        net = DistributedDataParallel(model, device_ids=[dist_util.dev()], output_device=dist_util.dev())

    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=True,
        random_crop=True,
    )
    opt = AdamW(trainer.master_params, lr=args.lr, weight_decay=args.weight_decay)
    if args.resume_checkpoint:
        opt_path = os.path.join(os.path.dirname(args.resume_checkpoint), f"opt{start:06}.pt")
        opt.load_state_dict(dist_util.load_state_dict(opt_path, map_location=dist_util.dev()))

    for step in range(start, args.iterations):
        images, extra = next(data)
        labels = extra["y"].to(dist_util.dev())
        t, _ = sampler.sample(images.shape[0], dist_util.dev())
        noisy = diffusion.q_sample(images.to(dist_util.dev()), t)
        logits = net(noisy, timesteps=t)
        losses = F.cross_entropy(logits, labels, reduction="none")
        accuracy = (logits.argmax(dim=-1) == labels).float()
        log_loss_dict(diffusion, t, {"train_loss": losses.detach(), "train_acc@1": accuracy})
        trainer.zero_grad()
        trainer.backward(losses.mean())
        trainer.optimize(opt)
        logger.logkv("step", step)
        logger.logkv("samples", (step + 1) * args.batch_size * dist.get_world_size())
        logger.dumpkvs()

    if dist.get_rank() == 0:
        state = trainer.master_params_to_state_dict(trainer.master_params)
        th.save(state, os.path.join(logger.get_dir(), f"model{args.iterations:06d}.pt"))
        th.save(opt.state_dict(), os.path.join(logger.get_dir(), f"opt{args.iterations:06d}.pt"))
    dist.barrier()


def create_argparser():
    defaults = dict(
        data_dir="",
        iterations=2,
        lr=3e-4,
        weight_decay=0.0,
        batch_size=2,
        schedule_sampler="uniform",
        resume_checkpoint="",
    )
    defaults.update(classifier_and_diffusion_defaults())
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    main()
