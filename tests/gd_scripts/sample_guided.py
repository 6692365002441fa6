"""A classifier-guided sampling script in the style of guided-diffusion's classifier_sample.py
(written for fastdiff's tests): the user's own cond_fn and model_fn, DDIM or ancestral."""

import argparse
import os

import numpy as np
import torch as th
import torch.distributed as dist
import torch.nn.functional as F
from guided_diffusion import dist_util, logger
from guided_diffusion.script_util import (
    NUM_CLASSES,
    add_dict_to_argparser,
    args_to_dict,
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)


def main():
    args = create_argparser().parse_args()
    dist_util.setup_dist()
    logger.configure()

    model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    model.load_state_dict(dist_util.load_state_dict(args.model_path, map_location="cpu"))
    model.to(dist_util.dev()).eval()
    classifier = create_classifier(**args_to_dict(args, classifier_defaults().keys()))
    classifier.load_state_dict(dist_util.load_state_dict(args.classifier_path, map_location="cpu"))
    classifier.to(dist_util.dev()).eval()

    def cond_fn(x, t, y=None):
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            chosen = log_probs[range(len(log_probs)), y.view(-1)]
            return th.autograd.grad(chosen.sum(), x_in)[0] * args.classifier_scale

    def model_fn(x, t, y=None):
        return model(x, t, y if args.class_cond else None)

    th.manual_seed(args.seed)  # after building: the model's init draws too
    images, labels = [], []
    while len(images) * args.batch_size < args.num_samples:
        classes = th.randint(0, NUM_CLASSES, (args.batch_size,), device=dist_util.dev())
        loop = diffusion.ddim_sample_loop if args.use_ddim else diffusion.p_sample_loop
        sample = loop(
            model_fn,
            (args.batch_size, 3, args.image_size, args.image_size),
            clip_denoised=args.clip_denoised,
            model_kwargs={"y": classes},
            cond_fn=cond_fn,
            device=dist_util.dev(),
        )
        sample = ((sample + 1) * 127.5).clamp(0, 255).to(th.uint8).permute(0, 2, 3, 1).contiguous()
        gathered = [th.zeros_like(sample) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, sample)
        images.extend(s.cpu().numpy() for s in gathered)
        gathered = [th.zeros_like(classes) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, classes)
        labels.extend(c.cpu().numpy() for c in gathered)
        logger.log(f"created {len(images) * args.batch_size} samples")

    arr = np.concatenate(images)[: args.num_samples]
    if dist.get_rank() == 0:
        out_path = os.path.join(logger.get_dir(), f"samples_{'x'.join(map(str, arr.shape))}.npz")
        np.savez(out_path, arr, np.concatenate(labels)[: args.num_samples])
    dist.barrier()
    logger.log("sampling complete")


def create_argparser():
    defaults = dict(
        clip_denoised=True,
        num_samples=16,
        batch_size=4,
        use_ddim=False,
        model_path="",
        classifier_path="",
        classifier_scale=1.0,
        seed=0,
    )
    defaults.update(model_and_diffusion_defaults())
    defaults.update(classifier_defaults())
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    main()
