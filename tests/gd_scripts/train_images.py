"""A training script in the style of guided-diffusion's image_train.py (written for fastdiff's
tests): it only knows the ``guided_diffusion`` package, so ``fastdiff gd-run`` runs it on
fastdiff and plain ``python`` runs it on a guided-diffusion checkout. ``--init_path`` and
``--seed`` let the two start from the same weights and random state."""

import argparse
import random

import numpy as np
import torch as th
from guided_diffusion import dist_util, logger
from guided_diffusion.image_datasets import load_data
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.train_util import TrainLoop


def main():
    args = create_argparser().parse_args()
    dist_util.setup_dist()
    logger.configure()

    logger.log("building the model and the process...")
    model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    if args.init_path:
        model.load_state_dict(dist_util.load_state_dict(args.init_path, map_location="cpu"))
    model.to(dist_util.dev())
    if args.seed >= 0:  # after building: the two codebases' initialisations draw differently
        random.seed(args.seed)
        np.random.seed(args.seed)
        th.manual_seed(args.seed)
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        deterministic=args.deterministic,
        random_flip=args.random_flip,
    )
    logger.log("training...")
    TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        ema_rate=args.ema_rate,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        use_fp16=args.use_fp16,
        fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=schedule_sampler,
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
    ).run_loop()
    logger.log("training complete")


def create_argparser():
    defaults = dict(
        data_dir="",
        init_path="",
        seed=-1,
        deterministic=False,
        random_flip=True,
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        batch_size=2,
        microbatch=-1,
        ema_rate="0.9999",
        log_interval=1,
        save_interval=1000,
        resume_checkpoint="",
        use_fp16=False,
        fp16_scale_growth=1e-3,
    )
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    main()
