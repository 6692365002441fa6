"""Architecture and process options at tiny sizes, as guided-diffusion computes them.

Each variant is a set of flags plus a fixed recipe of calls (a forward pass, a classifier's input
gradient, training losses, a DDIM reverse step, the bits-per-dim loop, guided DDPM and DDIM
loops; fp16 variants convert after loading fp32 weights, as the released scripts do).
:func:`run_variant` takes the module that builds the networks (guided-diffusion's
``script_util``, or fastdiff's compat layer, which serves the same functions) and torch, so the
generator and the tests run the very same calls on two implementations. Weights are not stored:
:func:`seeded_weights` draws them from the state_dict keys, which both implementations share.
"""

from __future__ import annotations

WEIGHT_SEED = 1234

# A UNet small enough for milliseconds a call: 16x16, two levels, attention at 8x8.
_UNET = dict(
    image_size=16,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="8",
    num_head_channels=32,
    class_cond=True,
    learn_sigma=True,
    use_scale_shift_norm=True,
    resblock_updown=True,
    use_new_attention_order=True,
)
# Processes run on a one-level 8x8 UNet: the options under test are the diffusion's.
_PROCESS_NET = dict(
    image_size=8,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1",
    attention_resolutions="8",
    num_head_channels=32,
    class_cond=True,
)
_CLASSIFIER = dict(
    image_size=64,
    classifier_width=32,
    classifier_depth=1,
    classifier_attention_resolutions="8",
    classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True,
    classifier_pool="attention",
)

VARIANTS = {
    # --- the UNet's options
    "unet_default": ("unet", {}),
    "unet_legacy_heads": ("unet", dict(use_new_attention_order=False, num_head_channels=-1, num_heads=2)),
    "unet_heads_upsample": ("unet", dict(num_head_channels=-1, num_heads=4, num_heads_upsample=2)),
    "unet_no_adagn": ("unet", dict(use_scale_shift_norm=False)),
    "unet_uncond_eps": ("unet", dict(class_cond=False, learn_sigma=False)),
    "unet_conv_resample": ("unet", dict(resblock_updown=False)),
    "unet_deeper": (
        "unet",
        dict(image_size=32, channel_mult="1,1,2", num_res_blocks=2, attention_resolutions="16,8"),
    ),
    "unet_dropout_eval": ("unet", dict(dropout=0.3)),
    "unet_fp16": ("unet", dict(use_fp16=True)),
    # --- the classifier's pools and blocks (its sizes start at 64)
    "classifier_attention": ("classifier", {}),
    "classifier_adaptive": ("classifier", dict(classifier_pool="adaptive")),
    "classifier_spatial": ("classifier", dict(classifier_pool="spatial")),
    "classifier_spatial_v2": ("classifier", dict(classifier_pool="spatial_v2")),
    "classifier_fp16": ("classifier", dict(classifier_use_fp16=True)),
    "classifier_plain_blocks": (
        "classifier",
        dict(classifier_use_scale_shift_norm=False, classifier_resblock_updown=False, classifier_depth=2),
    ),
    # --- the upsampler (sizes 64/256/512 only)
    "superres_64": (
        "superres",
        dict(
            large_size=64,
            small_size=16,
            num_channels=32,
            num_res_blocks=1,
            attention_resolutions="8",
            num_head_channels=32,
            class_cond=True,
            learn_sigma=True,
            use_scale_shift_norm=True,
            resblock_updown=True,
        ),
    ),
    # --- the process's options (losses and guided loops)
    "process_hybrid_cosine": ("process", dict(learn_sigma=True, noise_schedule="cosine")),
    "process_kl": ("process", dict(learn_sigma=True, use_kl=True)),
    "process_xstart": ("process", dict(predict_xstart=True)),
    "process_rescaled_t": ("process", dict(rescale_timesteps=True, learn_sigma=True, diffusion_steps=100)),
    "process_100_steps": ("process", dict(diffusion_steps=100, learn_sigma=True)),
    "process_unscaled_sigmas": ("process", dict(learn_sigma=True, rescale_learned_sigmas=False)),
}


def seeded_weights(model, th, seed: int = WEIGHT_SEED) -> None:
    """Every parameter drawn fresh (none zero: zero-initialised output convs would hide most of
    the network), in sorted key order, so any implementation with the same keys gets the same
    weights."""
    g = th.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with th.no_grad():
        for key in sorted(params):
            p = params[key]
            p.copy_((th.randn(p.shape, generator=g) * 0.1).to(p.dtype))


def _flags(gd, kind: str, overrides: dict) -> dict:
    if kind == "classifier":
        flags = gd.classifier_defaults()
        flags.update(_CLASSIFIER)
    elif kind == "superres":
        flags = gd.sr_model_and_diffusion_defaults()
    else:
        flags = gd.model_and_diffusion_defaults()
        flags.update(_PROCESS_NET if kind == "process" else _UNET)
    flags.update(overrides)
    return flags


def _cond_fn(th):
    """A guidance gradient that depends on x, the label and the timestep the loop hands over (so a
    wrong timestep map or label would show)."""

    def cond_fn(x, t, y=None, **_):  # an upsampler also hands over low_res
        scale = (1 + t.float() / 1000) * (1 + y.float() / 1000)
        return 0.05 * th.cos(x) * scale.view(-1, 1, 1, 1)

    return cond_fn


def run_variant(gd, th, kind: str, flags: dict) -> dict:
    """The outputs of one variant's calls, computed by ``gd`` (script_util or fastdiff's compat)."""
    g = th.Generator().manual_seed(0)
    if kind == "classifier":
        model = gd.create_classifier(**flags)
        seeded_weights(model, th)
        if flags["classifier_use_fp16"]:
            model.convert_to_fp16()  # after loading fp32 weights, as the released scripts do
        model.eval()
        size = flags["image_size"]
        x = th.randn(1, 3, size, size, generator=g)  # one sample: 64x64 gradients are the bulk of the file
        t, y = th.tensor([613]), th.tensor([917])
        x_in = x.clone().requires_grad_(True)
        logits = model(x_in, t)
        selected = th.log_softmax(logits, dim=-1)[th.arange(1), y].sum()
        (grad,) = th.autograd.grad(selected, x_in)
        return {"logits": logits.detach(), "grad": grad}
    if kind == "superres":
        model, diffusion = gd.sr_create_model_and_diffusion(**flags)
    else:
        model, diffusion = gd.create_model_and_diffusion(**flags)
    seeded_weights(model, th)
    if flags["use_fp16"]:
        model.convert_to_fp16()
    model.eval()
    size = flags.get("large_size", flags.get("image_size"))
    n = 1 if kind == "superres" else 2
    kw = {}
    if flags["class_cond"]:
        kw["y"] = th.tensor([1, 998][:n])
    if kind == "superres":
        kw["low_res"] = th.randn(n, 3, flags["small_size"], flags["small_size"], generator=g)
    x, t = th.randn(n, 3, size, size, generator=g), th.tensor([613, 0][:n])
    with th.no_grad():
        out = model(x, t, **kw)
    result = {"out": out}
    if kind == "unet":
        return result
    x_start = th.randn(n, 3, size, size, generator=g).clamp(-1, 1)
    noise = th.randn(n, 3, size, size, generator=g)
    t_train = th.tensor([7, flags["diffusion_steps"] - 1][:n])
    with th.no_grad():
        losses = diffusion.training_losses(model, x_start, t_train, model_kwargs=kw, noise=noise)
        result["losses"] = {k: v for k, v in losses.items()}
        reverse = diffusion.ddim_reverse_sample(model, x_start, t_train, model_kwargs=kw)
        result["ddim_reverse"] = reverse["sample"]
        if flags["diffusion_steps"] <= 100:  # one forward pass per timestep
            th.manual_seed(9)  # each timestep's q_sample noise: the global generator, as the original
            bpd = diffusion.calc_bpd_loop(model, x_start, clip_denoised=True, model_kwargs=kw)
            result["bpd"] = {k: bpd[k] for k in ("total_bpd", "prior_bpd", "vb", "xstart_mse", "mse")}
    x_T = th.randn(n, 3, size, size, generator=g)
    cond_fn = _cond_fn(th)
    for name, respacing, loop, extra in (
        ("ddpm", "5", "p_sample_loop", {}),
        ("ddim", "ddim4", "ddim_sample_loop", {"eta": 0.5}),
    ):
        spaced = gd.create_gaussian_diffusion(
            **process_flags(gd, flags), steps=flags["diffusion_steps"], timestep_respacing=respacing
        )
        th.manual_seed(5)  # the loops' per-step noise: the global generator, as the original draws it
        result[name] = getattr(spaced, loop)(
            model, x_T.shape, noise=x_T, clip_denoised=True, model_kwargs=kw, cond_fn=cond_fn, **extra
        )
    return result


def process_flags(gd, flags: dict) -> dict:
    """The flags create_gaussian_diffusion takes besides steps and respacing, as ``flags`` set them."""
    skip = ("diffusion_steps", "timestep_respacing")
    return {k: flags[k] for k in gd.diffusion_defaults() if k not in skip}


FP16_FLAGS = ("use_fp16", "classifier_use_fp16")


def _owned(outputs: dict) -> dict:
    """Each tensor with its own storage: a view would save the whole tensor it was cut from."""
    return {
        k: {a: b.clone() for a, b in v.items()} if isinstance(v, dict) else v.clone()
        for k, v in outputs.items()
    }


def make_variants(gd, th) -> dict:
    """{name: {kind, flags, outputs}} for every variant, from ``gd``. An fp16 variant also holds
    ``fp32_outputs`` (the same weights in float32): its own rounding error sets the tolerance."""
    th.set_num_threads(1)
    cases = {}
    for name, (kind, overrides) in VARIANTS.items():
        flags = _flags(gd, kind, overrides)
        cases[name] = {"kind": kind, "flags": flags, "outputs": _owned(run_variant(gd, th, kind, flags))}
        if any(flags.get(f) for f in FP16_FLAGS):
            fp32 = {**flags, **{f: False for f in FP16_FLAGS if f in flags}}
            cases[name]["fp32_outputs"] = _owned(run_variant(gd, th, kind, fp32))
    return {"weight_seed": WEIGHT_SEED, "cases": cases}
