"""A likelihood script in the style of guided-diffusion's image_nll.py (written for fastdiff's
tests): bits per dimension of a model on an image folder, with ``calc_bpd_loop``."""

import argparse
import os

import numpy as np
import torch.distributed as dist
from guided_diffusion import dist_util, logger
from guided_diffusion.image_datasets import load_data
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)


def main():
    args = create_argparser().parse_args()
    dist_util.setup_dist()
    logger.configure()

    model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    model.load_state_dict(dist_util.load_state_dict(args.model_path, map_location="cpu"))
    model.to(dist_util.dev())
    model.eval()
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        deterministic=True,
    )

    bpds, terms = [], {"vb": [], "mse": [], "xstart_mse": []}
    done = 0
    while done < args.num_samples:
        batch, kwargs = next(data)
        batch = batch.to(dist_util.dev())
        kwargs = {k: v.to(dist_util.dev()) for k, v in kwargs.items()}
        out = diffusion.calc_bpd_loop(model, batch, clip_denoised=args.clip_denoised, model_kwargs=kwargs)
        for name, values in terms.items():
            mean = out[name].mean(dim=0) / dist.get_world_size()
            dist.all_reduce(mean)
            values.append(mean.cpu().numpy())
        bpd = out["total_bpd"].mean() / dist.get_world_size()
        dist.all_reduce(bpd)
        bpds.append(bpd.item())
        done += dist.get_world_size() * batch.shape[0]
        logger.log(f"{done} images: bpd={np.mean(bpds)}")

    if dist.get_rank() == 0:
        for name, values in terms.items():
            np.savez(os.path.join(logger.get_dir(), f"{name}_terms.npz"), np.mean(np.stack(values), axis=0))
        np.savez(os.path.join(logger.get_dir(), "bpd.npz"), np.array(bpds))
    dist.barrier()
    logger.log("evaluation complete")


def create_argparser():
    defaults = dict(data_dir="", clip_denoised=True, num_samples=4, batch_size=2, model_path="")
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    main()
