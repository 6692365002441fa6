"""guided-diffusion's training and likelihood modules on fastdiff (train_util, image_datasets,
resample, fp16_util, gaussian_diffusion, respace, losses, nn) and ``fastdiff gd-run`` running
training and NLL scripts.

tests/gd_scripts/train_images.py and image_bpd.py are fastdiff's own scripts in the style of the
original's image_train.py and image_nll.py. They train a tiny model for a few steps on a folder
of generated images, resume it, and score it; the checkpoints must be the original's files. With
FASTDIFF_GUIDED_DIFFUSION pointing at a guided-diffusion checkout, the slow tests run the same
script on the original code (through stand-ins for mpi4py and blobfile) and compare the losses,
and run the original's own training and NLL scripts unedited through gd-run.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_compat_scripts import ORIGINAL, SCRIPTS, flag_args, gd_run, needs_original

from fastdiff.compat import (
    fp16_util,
    gaussian_diffusion,
    image_datasets,
    nn,
    resample,
    respace,
    train_util,
    unet,
)
from fastdiff.compat import guided_diffusion as gd
from fastdiff.diffusion import losses
from fastdiff.training import ConfigError, DataError, TrainingError

# A tiny class-conditional ADM with learned sigma (the hybrid loss: mse + vb), 25 steps.
TINY = dict(
    image_size=32,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="16",
    learn_sigma=True,
    class_cond=True,
    diffusion_steps=25,
)
# Class = the file name's prefix: bird 0, cat 1, dog 2 (subfolders do not name classes).
IMAGES = ["cat_1.png", "dog_2.png", "cat_3.jpg", "sub/bird_4.png", "sub/dog_5.png", "dog_6.png"]
LABELS = [1, 1, 2, 2, 0, 2]  # of the files in sorted order: cat_1 cat_3 dog_2 dog_6 sub/bird_4 sub/dog_5


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Six non-square RGB images (so resizing and cropping matter)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in IMAGES:
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / name)
    return folder


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def train_args(images: Path, *extra: str) -> list[str]:
    return [str(SCRIPTS / "train_images.py"), "--data_dir", str(images), *flag_args(TINY), *extra]


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory) -> Path:
    """Three steps through gd-run, saving every 2: the files of steps 0 and 2."""
    logdir = tmp_path_factory.mktemp("run")
    res = gd_run(train_args(images, "--lr_anneal_steps", "3", "--save_interval", "2"), logdir)
    assert res.returncode == 0, res.stderr[-3000:]
    return logdir


# ---------------------------------------------------------------- the modules


# The names the original scripts import, and the public names user scripts reach for (also
# through ``from guided_diffusion.X import *``, which gives the names the original imports too).
NAMES = {
    train_util: "TrainLoop parse_resume_step_from_filename log_loss_dict get_blob_logdir"
    " find_resume_checkpoint find_ema_checkpoint INITIAL_LOG_LOSS_SCALE MixedPrecisionTrainer"
    " UniformSampler LossAwareSampler update_ema",
    image_datasets: "load_data ImageDataset center_crop_arr random_crop_arr",
    resample: "create_named_schedule_sampler ScheduleSampler UniformSampler LossAwareSampler"
    " LossSecondMomentResampler",
    fp16_util: "MixedPrecisionTrainer INITIAL_LOG_LOSS_SCALE convert_module_to_f16 convert_module_to_f32"
    " check_overflow zero_grad",
    gaussian_diffusion: "GaussianDiffusion get_named_beta_schedule betas_for_alpha_bar ModelMeanType"
    " ModelVarType LossType mean_flat normal_kl discretized_gaussian_log_likelihood _extract_into_tensor",
    respace: "SpacedDiffusion space_timesteps GaussianDiffusion _WrappedModel",
    losses: "normal_kl approx_standard_normal_cdf discretized_gaussian_log_likelihood",
    nn: "GroupNorm32 SiLU conv_nd linear avg_pool_nd update_ema zero_module scale_module mean_flat"
    " normalization timestep_embedding checkpoint",
    unet: "UNetModel SuperResModel EncoderUNetModel AttentionBlock QKVAttention QKVAttentionLegacy"
    " count_flops_attn convert_module_to_f16 convert_module_to_f32 normalization timestep_embedding"
    " conv_nd linear zero_module checkpoint avg_pool_nd",
}


def star_import(module) -> set[str]:
    namespace = {}
    exec(f"from {module.__name__} import *", namespace)
    return set(namespace)


@pytest.mark.parametrize("module", list(NAMES), ids=lambda m: m.__name__.split(".")[-1])
def test_the_names_scripts_use(module):
    assert [n for n in NAMES[module].split() if not hasattr(module, n)] == []
    public = [n for n in NAMES[module].split() if not n.startswith("_")]
    assert [n for n in public if n not in star_import(module)] == []


# The original's names fastdiff leaves out, and why: the fp16 flat-master-weight helpers (fp32
# weights under autocast have no flat copy); checkpointing's autograd function (torch checkpoints
# non-reentrantly); the MPI rendezvous's port search (torchrun's or an in-memory store instead);
# and the TensorBoard log format (it needs TensorFlow; asking for it is a clear error).
LEFT_OUT = set(
    "make_master_params model_grads_to_master_grads master_params_to_model_params unflatten_master_params"
    " get_param_groups_and_shapes master_params_to_state_dict state_dict_to_master_params zero_master_grads"
    " param_grad_or_zeros CheckpointFunction _find_free_port TensorBoardOutputFormat".split()
)


@needs_original
def test_every_name_of_the_originals_modules(monkeypatch):
    """Each of the original's own names (defined there or imported from its package) is here,
    but for LEFT_OUT, and ``import *`` gives its public ones. What the original imports from
    elsewhere (torch's AdamW, abc's ABC) is not re-exported: import it from where it lives."""
    import importlib
    import inspect
    import types

    from fastdiff.compat.package import MODULES

    mpi4py = types.ModuleType("mpi4py")  # the original's dist_util imports it; never called here
    mpi4py.MPI = types.ModuleType("mpi4py.MPI")
    monkeypatch.setitem(sys.modules, "mpi4py", mpi4py)
    monkeypatch.setitem(sys.modules, "blobfile", importlib.import_module("fastdiff.compat.blobfile"))
    monkeypatch.syspath_prepend(ORIGINAL)
    for name in MODULES:
        original = importlib.import_module(f"guided_diffusion.{name}")
        ours = importlib.import_module(MODULES[name])
        names = [
            n
            for n, v in vars(original).items()
            if not n.startswith("__")
            and not inspect.ismodule(v)
            and getattr(v, "__module__", "guided_diffusion").startswith("guided_diffusion")
            and n not in LEFT_OUT
        ]
        assert [n for n in names if not hasattr(ours, n)] == [], name
        exported = star_import(ours)
        assert [n for n in names if not n.startswith("_") and n not in exported] == [], name


def test_load_data_yields_the_originals_batches(images):
    data = image_datasets.load_data(
        data_dir=str(images),
        batch_size=2,
        image_size=32,
        class_cond=True,
        deterministic=True,
        random_flip=False,
    )
    batches = [next(data) for _ in range(4)]  # 3 batches an epoch, then again: endless
    for x, cond in batches:
        assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() < x.max() <= 1
        assert cond["y"].dtype == torch.int64
    assert torch.cat([c["y"] for _, c in batches[:3]]).tolist() == LABELS
    assert torch.equal(batches[3][0], batches[0][0])
    # The center crop of fastdiff's ADM resize, scaled to [-1, 1].
    with Image.open(images / "cat_1.png") as img:
        want = image_datasets.center_crop_arr(img.convert("RGB"), 32).astype(np.float32) / 127.5 - 1
    assert np.array_equal(batches[0][0][0].numpy(), want.transpose(2, 0, 1))
    unlabelled = next(image_datasets.load_data(data_dir=str(images), batch_size=3, image_size=16))
    assert unlabelled[0].shape == (3, 3, 16, 16) and unlabelled[1] == {}
    # Rank 1 of 2 reads files 1, 3, 5; random crops stay in the image.
    shard = image_datasets.ImageDataset(32, sorted(map(str, images.rglob("*.*"))), shard=1, num_shards=2)
    assert len(shard) == 3 and shard.local_images[0].endswith("cat_3.jpg")
    assert image_datasets.random_crop_arr(Image.new("RGB", (48, 40)), 32).shape == (32, 32, 3)


def test_random_crops_draw_short_sides_up_to_image_size_over_min_crop_frac(monkeypatch):
    """As the original's random_crop_arr: the short side is drawn from ceil(size / max_crop_frac)
    to ceil(size / min_crop_frac), both included (8..10 for size 8)."""
    import random

    from fastdiff.compat import image_datasets

    sides = []
    resize = image_datasets.resize_short_side
    monkeypatch.setattr(
        image_datasets, "resize_short_side", lambda img, size: sides.append(size) or resize(img, size)
    )
    random.seed(0)
    for _ in range(30):
        assert image_datasets.random_crop_arr(Image.new("RGB", (12, 10)), 8).shape == (8, 8, 3)
    assert set(sides) == {8, 9, 10}


def test_load_data_bad_input(tmp_path, images):
    for kwargs, message in [
        (dict(data_dir=""), "unspecified data directory"),
        (dict(data_dir=str(tmp_path / "missing")), "not found"),
        (dict(data_dir=str(tmp_path)), "no images"),
        (dict(data_dir=str(images), batch_size=7), "fewer than one batch"),
    ]:
        with pytest.raises(DataError, match=message):
            next(image_datasets.load_data(**{"batch_size": 2, "image_size": 32, **kwargs}))
    (tmp_path / "bad_1.png").write_bytes((images / "cat_1.png").read_bytes()[:100])
    with pytest.raises(DataError, match="truncated image .*bad_1.png"):
        next(image_datasets.load_data(data_dir=str(tmp_path), batch_size=1, image_size=32))


def test_schedule_samplers_draw_as_the_original():
    _, diffusion = gd.create_model_and_diffusion(**TINY)
    uniform = resample.create_named_schedule_sampler("uniform", diffusion)
    np.random.seed(3)
    t, w = uniform.sample(5, "cpu")
    np.random.seed(3)
    assert t.tolist() == np.random.choice(25, size=(5,), p=np.full(25, 1 / 25)).tolist()
    assert torch.equal(w, torch.ones(5)) and isinstance(uniform, resample.UniformSampler)
    second = resample.create_named_schedule_sampler("loss-second-moment", diffusion)
    assert isinstance(second, resample.LossAwareSampler)
    for step in range(10):
        second.update_with_local_losses(torch.arange(25), torch.linspace(0.1, 2.5, 25) * (1 + step % 2))
    weights = second.weights()  # warmed up: the loss' RMS per t, with uniform_prob mixed in
    rms = np.linspace(0.1, 2.5, 25) * np.sqrt((1 + 4) / 2)
    assert isinstance(weights, np.ndarray)
    assert np.allclose(weights, rms / rms.sum() * 0.999 + 0.001 / 25, rtol=1e-6)
    t, w = second.sample(1000, "cpu")
    assert t.float().mean() > 15 and torch.allclose(w, torch.from_numpy(1 / (25 * weights[t])).float())
    with pytest.raises(ConfigError, match="unknown schedule sampler 'triangle'"):
        resample.create_named_schedule_sampler("triangle", diffusion)


def test_the_processes_and_their_enums():
    built = gd.create_gaussian_diffusion(steps=25, learn_sigma=True, timestep_respacing="5")
    by_hand = respace.SpacedDiffusion(
        use_timesteps=respace.space_timesteps(25, "5"),
        betas=gaussian_diffusion.get_named_beta_schedule("linear", 25),
        model_mean_type=gaussian_diffusion.ModelMeanType.EPSILON,
        model_var_type=gaussian_diffusion.ModelVarType.LEARNED_RANGE,
        loss_type=gaussian_diffusion.LossType.MSE,
    )
    for d in (built, by_hand):
        assert type(d) is respace.SpacedDiffusion and isinstance(d, gaussian_diffusion.GaussianDiffusion)
        assert d.model_var_type is gaussian_diffusion.ModelVarType.LEARNED_RANGE
        assert d.model_var_type == "learned_range" and not d.loss_type.is_vb()
    assert np.array_equal(built.timestep_map, by_hand.timestep_map) and built.original_num_steps == 25
    assert np.array_equal(built.betas, by_hand.betas)  # bit for bit: the same respacing
    kl = gd.create_gaussian_diffusion(steps=25, use_kl=True, predict_xstart=True)
    assert kl.loss_type.is_vb() and kl.model_mean_type == gaussian_diffusion.ModelMeanType.START_X
    t = torch.tensor([0, 4])
    values = gaussian_diffusion._extract_into_tensor(built.betas, t, (2, 3, 4, 4))
    assert values.shape == (2, 3, 4, 4) and values[1, 2, 3, 3] == np.float32(built.betas[4])


def test_mixed_precision_trainer(capsys):
    torch.manual_seed(0)
    for use_fp16 in (False, True):
        model = gd.create_classifier(
            image_size=32,
            classifier_width=32,
            classifier_depth=1,
            classifier_attention_resolutions="8",
            classifier_use_fp16=use_fp16,
        )
        trainer = fp16_util.MixedPrecisionTrainer(model=model, use_fp16=use_fp16, initial_lg_loss_scale=16.0)
        assert all(p.dtype == torch.float32 for p in trainer.master_params)  # fp32 weights even so
        opt = torch.optim.AdamW(trainer.master_params, lr=1e-3)
        before = [p.detach().clone() for p in trainer.master_params]
        logits = model(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
        assert logits.dtype == torch.float32
        trainer.zero_grad()
        trainer.backward(torch.nn.functional.cross_entropy(logits, torch.tensor([3, 4])))
        assert trainer.optimize(opt) is True
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.master_params, strict=True))
        kvs = gd_logger_kvs()
        assert kvs["grad_norm"] > 0 and kvs["param_norm"] > 0 and ("lg_loss_scale" in kvs) == use_fp16
        state = trainer.master_params_to_state_dict(trainer.master_params)
        assert state.keys() == model.state_dict().keys()
        grad_norm, param_norm = trainer._compute_norms()
        assert trainer._compute_norms(grad_scale=4.0) == (grad_norm / 4, param_norm)  # the original's
    # An fp16 overflow skips the step and halves the scale (lg_loss_scale - 1), as the original.
    trainer = fp16_util.MixedPrecisionTrainer(model=model, use_fp16=True, initial_lg_loss_scale=16.0)
    opt = torch.optim.AdamW(trainer.master_params, lr=1e-3)
    before = [p.detach().clone() for p in trainer.master_params]
    trainer.zero_grad()
    trainer.backward(model(torch.randn(2, 3, 32, 32), torch.tensor([1, 2])).sum() * float("inf"))
    assert trainer.optimize(opt) is False and trainer.lg_loss_scale == 15.0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.master_params, strict=True))
    assert "Found NaN, decreased lg_loss_scale to 15.0" in capsys.readouterr().out


def gd_logger_kvs() -> dict:
    from fastdiff.compat import logger

    kvs = dict(logger.getkvs())
    logger.get_current().name2val.clear()
    logger.get_current().name2cnt.clear()
    return kvs


def test_fp16_master_params_are_the_originals_flat_masters(capsys):
    """classifier_train.py builds AdamW over ``master_params`` and saves / loads its state itself:
    in fp16 they are the original's two flat fp32 masters, which the model's weights are views
    of, and ``lg_loss_scale`` follows the original's schedule (what progress.csv logs)."""
    torch.manual_seed(0)
    flags = dict(image_size=32, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="8")

    def trainer_and_opt():
        model = gd.create_classifier(**flags, classifier_use_fp16=True)
        trainer = fp16_util.MixedPrecisionTrainer(
            model=model, use_fp16=True, fp16_scale_growth=0.25, initial_lg_loss_scale=4.0
        )
        return model, trainer, torch.optim.AdamW(trainer.master_params, lr=1e-3)

    def step(scale=1.0):
        trainer.zero_grad()
        logits = model(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
        trainer.backward(torch.nn.functional.cross_entropy(logits, torch.tensor([3, 4])) * scale)
        return trainer.optimize(opt), gd_logger_kvs()

    model, trainer, opt = trainer_and_opt()
    params = dict(model.named_parameters())
    vectors = sum(p.numel() for p in params.values() if p.ndim <= 1)
    assert [tuple(m.shape) for m in trainer.master_params] == [
        (vectors,),
        (1, sum(p.numel() for p in params.values()) - vectors),
    ]
    assert {m.dtype for m in trainer.master_params} == {torch.float32}
    assert all(p.dtype == torch.float32 for p in params.values())
    before = {n: p.detach().clone() for n, p in params.items()}
    ok, kvs = step()
    assert ok and kvs["lg_loss_scale"] == 4.0
    # the step on the masters is the model's step: the weights are views into them
    state = trainer.master_params_to_state_dict(trainer.master_params)
    assert all(torch.equal(state[n], p) for n, p in params.items())
    assert any(not torch.equal(before[n], p) for n, p in params.items())
    assert all(
        torch.equal(a, b)
        for a, b in zip(trainer.state_dict_to_master_params(state), trainer.master_params, strict=True)
    )
    # +fp16_scale_growth per good step, -1 on an overflow (the step skipped), logged before
    assert trainer.lg_loss_scale == 4.25
    ok, kvs = step(float("inf"))
    assert not ok and kvs == {"lg_loss_scale": 4.25} and trainer.lg_loss_scale == 3.25
    assert "Found NaN, decreased lg_loss_scale to 3.25" in capsys.readouterr().out
    ok, kvs = step()
    assert ok and kvs["lg_loss_scale"] == 3.25 and trainer.lg_loss_scale == 3.5
    assert trainer.scaler.get_scale() == pytest.approx(2.0**3.5)  # what the next backward scales by
    saved = opt.state_dict()
    assert saved["param_groups"][0]["params"] == [0, 1]
    assert [tuple(saved["state"][i]["exp_avg"].shape) for i in (0, 1)] == [
        tuple(m.shape) for m in trainer.master_params
    ]
    model, trainer, opt = trainer_and_opt()  # the script's resume: opt.load_state_dict(its file)
    opt.load_state_dict(saved)
    assert int(opt.state_dict()["state"][1]["step"]) == 2


def test_fp16_networks_are_built_fp32_so_a_resume_is_exact():
    """classifier_train.py loads --resume_checkpoint before MixedPrecisionTrainer casts anything:
    the builders (and the unet classes) give fp32 weights whatever use_fp16 says, as the
    original's, so the resumed fp32 weights are the masters bit for bit, not rounded to fp16."""
    flags = dict(image_size=32, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="8")
    torch.manual_seed(0)
    state = {k: v + 1e-4 * torch.randn_like(v) for k, v in gd.create_classifier(**flags).state_dict().items()}
    classifier = gd.create_classifier(**flags, classifier_use_fp16=True)
    assert classifier.config.use_fp16 and classifier.dtype == torch.float32
    classifier.load_state_dict(state)
    trainer = fp16_util.MixedPrecisionTrainer(model=classifier, use_fp16=True)
    saved = trainer.master_params_to_state_dict(trainer.master_params)
    assert all(torch.equal(saved[k], v) for k, v in state.items())
    model = unet.UNetModel(32, 3, 32, 6, 1, (2,), channel_mult=(1, 2), use_fp16=True)
    assert model.config.use_fp16 and model.dtype == torch.float32
    model.convert_to_fp16()  # what the sampling scripts do once the weights are in
    assert model.dtype == torch.float16


def _two_steps_with_dropout(model) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Gradients of two seeded training forwards (dropout on), and the next draw after them."""
    model.train()
    x, t = torch.linspace(-1, 1, 2 * 3 * 16 * 16).view(2, 3, 16, 16), torch.tensor([3, 20])
    torch.manual_seed(1)
    grads = []
    for _ in range(2):
        model.zero_grad()
        model(x, t).square().mean().backward()
        grads += [p.grad.clone() for p in model.parameters()]
    return grads, torch.randn(1)


CHECKPOINTED = dict(
    image_size=16,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="8",
    dropout=0.5,
    use_scale_shift_norm=False,
)


def test_checkpointed_res_blocks_draw_new_masks_as_the_originals():
    """use_checkpoint with dropout: the backward pass recomputes each res block with masks drawn
    then, as the original's CheckpointFunction (torch's checkpointing replayed the forward's
    masks, so the global stream, and with it every later step's draws, was the original's only
    without use_checkpoint)."""
    torch.manual_seed(0)
    plain, _ = gd.create_model_and_diffusion(**CHECKPOINTED)
    checkpointed, _ = gd.create_model_and_diffusion(**CHECKPOINTED, use_checkpoint=True)
    by_hand = unet.UNetModel(16, 3, 32, 3, 1, (2,), dropout=0.5, channel_mult=(1, 2), use_checkpoint=True)
    for model in (checkpointed, by_hand):
        model.load_state_dict(plain.state_dict())
        _, after = _two_steps_with_dropout(model)
        assert not torch.equal(after, _two_steps_with_dropout(plain)[1])  # the recompute drew too
    calls = []

    def draws(x):
        calls.append(torch.rand(1))
        return x * x

    nn.checkpoint(draws, (torch.ones(1, requires_grad=True),), (), True).backward()
    assert not torch.equal(calls[0], calls[1])  # the original's checkpoint() recomputes afresh too


@needs_original
def test_checkpointed_training_steps_are_the_originals(monkeypatch):
    """Two training steps of a network with use_checkpoint and dropout, seeded alike: the
    original's gradients (from the backward pass's masks) and random stream after them."""
    import importlib

    monkeypatch.syspath_prepend(ORIGINAL)
    original = importlib.import_module("guided_diffusion.script_util")
    flags = {**CHECKPOINTED, "use_checkpoint": True}
    torch.manual_seed(0)
    om, _ = original.create_model_and_diffusion(**{**original.model_and_diffusion_defaults(), **flags})
    with torch.no_grad():
        for p in om.parameters():  # the zero-initialized output convs would pass no gradient back
            p.add_(0.02 * torch.randn_like(p))
    fm, _ = gd.create_model_and_diffusion(**flags)
    fm.load_state_dict(om.state_dict())
    (want, want_after), (got, got_after) = _two_steps_with_dropout(om), _two_steps_with_dropout(fm)
    assert torch.equal(want_after, got_after)
    assert max((a - b).abs().max().item() for a, b in zip(want, got, strict=True)) < 1e-5


@needs_original
def test_fp16_optimizer_files_go_both_ways_with_the_original(monkeypatch):
    """The original's fp16 MixedPrecisionTrainer has the same masters, in the same order: each
    side's AdamW state loads into the other's."""
    import importlib

    monkeypatch.syspath_prepend(ORIGINAL)
    original_util = importlib.import_module("guided_diffusion.script_util")
    original_fp16 = importlib.import_module("guided_diffusion.fp16_util")
    flags = {**TINY, "image_size": 16, "use_fp16": True}
    model, _ = gd.create_model_and_diffusion(**flags)
    theirs, _ = original_util.create_model_and_diffusion(
        **{**original_util.model_and_diffusion_defaults(), **flags}
    )
    theirs.load_state_dict(model.state_dict())
    trainer = fp16_util.MixedPrecisionTrainer(model=model, use_fp16=True)
    their_trainer = original_fp16.MixedPrecisionTrainer(model=theirs, use_fp16=True)
    for ours, their in zip(trainer.master_params, their_trainer.master_params, strict=True):
        assert torch.equal(ours, their)
    opt = torch.optim.AdamW(trainer.master_params, lr=1e-4)
    trainer.backward(model(torch.randn(1, 3, 16, 16), torch.tensor([3]), y=torch.tensor([1])).square().mean())
    assert trainer.optimize(opt)
    their_opt = torch.optim.AdamW(their_trainer.master_params, lr=1e-4)
    their_opt.load_state_dict(opt.state_dict())
    opt.load_state_dict(their_opt.state_dict())


def test_resume_step_names_and_loss_logging():
    assert train_util.parse_resume_step_from_filename("/runs/a/model012345.pt") == 12345
    assert train_util.parse_resume_step_from_filename("/models/model.pt") == 0
    assert train_util.parse_resume_step_from_filename("ema_0.9999_000010.pt") == 0
    _, diffusion = gd.create_model_and_diffusion(**TINY)
    gd_logger_kvs()
    train_util.log_loss_dict(diffusion, torch.tensor([0, 6, 7, 24]), {"loss": torch.tensor([1.0, 2, 4, 8])})
    kvs = gd_logger_kvs()  # quartile int(4 t / T): 0, 0, 1, 3
    assert kvs == {"loss": 3.75, "loss_q0": 1.5, "loss_q1": 4.0, "loss_q3": 8.0}
    targets, sources = [torch.ones(2)], [torch.zeros(2)]
    nn.update_ema(targets, sources, rate=0.75)
    assert torch.equal(targets[0], torch.full((2,), 0.75))


def test_train_loop_in_fp16_resumes_its_weights_exactly(tmp_path):
    """In-process, a model built with use_fp16 (fp16 convs): trained under autocast over fp32
    weights (the torso in fp16, as the original) with the original's loss scale, saved in fp32,
    and loaded back bit for bit on resume."""
    from fastdiff.compat import logger

    flags = {**TINY, "image_size": 16, "use_fp16": True}  # fp16 autocast is slow on the CPU

    def loop(**kwargs):
        model, diffusion = gd.create_model_and_diffusion(**flags)
        batches = iter(lambda: (torch.rand(2, 3, 16, 16) * 2 - 1, {"y": torch.tensor([0, 1])}), None)
        settings = dict(batch_size=2, microbatch=1, lr=1e-4, ema_rate="0.9,0.99", log_interval=1)
        settings.update(save_interval=10, use_fp16=True, lr_anneal_steps=6, **kwargs)
        return train_util.TrainLoop(model=model, diffusion=diffusion, data=batches, **settings)

    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    try:
        first = loop(resume_checkpoint="")
        first.run_loop()
        kinds = ("ema_0.99_", "ema_0.9_", "model", "opt")
        assert sorted(p.name for p in tmp_path.glob("*.pt")) == [
            f"{k}{s:06d}.pt" for k in kinds for s in (0, 6)
        ]
        saved = torch.load(tmp_path / "model000006.pt", weights_only=True)
        assert {v.dtype for v in saved.values()} == {torch.float32}
        resumed = loop(resume_checkpoint=str(tmp_path / "model000006.pt"))
        assert resumed.resume_step == 6
        for name, value in resumed.model.state_dict().items():
            assert torch.equal(value, saved[name]), name
        ema = torch.load(tmp_path / "ema_0.9_000006.pt", weights_only=True)
        names = [n for n, _ in resumed.model.named_parameters()]
        assert all(torch.equal(p, ema[n]) for n, p in zip(names, resumed.ema_params[0], strict=True))
        # The optimizer file has the original's fp16 layout (two flat masters) and loads back.
        opt = torch.load(tmp_path / "opt000006.pt", weights_only=True)
        assert opt["param_groups"][0]["params"] == [0, 1] and opt["state"][1]["exp_avg"].shape[0] == 1
        want, got = first.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
        assert want.keys() == got.keys()
        for i in want:
            assert all(torch.equal(want[i][k], got[i][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    finally:
        logger.get_current().close()
    log = rows(tmp_path / "progress.csv")
    # As in the original, the output head computes in fp32, so its weight gradient (a sum over
    # every pixel) does not overflow the initial 2**20 loss scale: no step is skipped.
    assert [r["step"] for r in log] == list("012345")
    # The original's schedule: lg_loss_scale grows by fp16_scale_growth (1e-3) per good step.
    assert [float(r["lg_loss_scale"]) for r in log] == pytest.approx([20 + k / 1000 for k in range(6)])
    assert all(r["grad_norm"] for r in log)


# ---------------------------------------------------------------- gd-run


def test_gd_run_trains_and_writes_the_originals_files(trained):
    names = sorted(p.name for p in trained.iterdir() if p.suffix == ".pt")
    assert names == [f"{kind}{step:06d}.pt" for kind in ("ema_0.9999_", "model", "opt") for step in (0, 2)]
    log = rows(trained / "progress.csv")
    assert [int(r["step"]) for r in log] == [0, 1, 2] and [int(r["samples"]) for r in log] == [2, 4, 6]
    assert {"loss", "mse", "vb", "grad_norm", "param_norm"} <= set(log[0])
    assert any(k.startswith("loss_q") and r[k] for r in log for k in r)
    for r in log:
        assert float(r["loss"]) == pytest.approx(float(r["mse"]) + float(r["vb"]), rel=1e-5)
    # The original's model loads them as they are: strict, every key, fp32.
    model, _ = gd.create_model_and_diffusion(**TINY)
    for name in ("model000002.pt", "ema_0.9999_000002.pt"):
        state = torch.load(trained / name, weights_only=True)
        model.load_state_dict(state, strict=True)
        assert {v.dtype for v in state.values()} == {torch.float32}
    opt = torch.optim.AdamW(model.parameters())
    opt.load_state_dict(torch.load(trained / "opt000002.pt", weights_only=True))
    assert {int(s["step"]) for s in opt.state.values()} == {3}  # steps 0, 1 and 2


@pytest.mark.slow  # another gd-run process (seconds of start-up): CI's slow stage runs it
def test_gd_run_resumes_from_the_checkpoint(trained, images, tmp_path):
    resume = ["--resume_checkpoint", str(trained / "model000002.pt"), "--lr_anneal_steps", "4"]
    res = gd_run(train_args(images, *resume, "--save_interval", "2"), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    log = rows(tmp_path / "progress.csv")
    # The original's numbering: the log goes on at the file's step, and the files are named so.
    assert [int(r["step"]) for r in log] == [2, 3] and [int(r["samples"]) for r in log] == [6, 8]
    text = (tmp_path / "log.txt").read_text()
    for what in ("model from checkpoint", "optimizer state from checkpoint", "EMA from checkpoint"):
        assert f"loading {what}" in text
    assert (tmp_path / "model000004.pt").is_file() and (tmp_path / "ema_0.9999_000004.pt").is_file()
    opt = torch.load(tmp_path / "opt000004.pt", weights_only=True)
    assert {int(s["step"]) for s in opt["state"].values()} == {5}  # 3 before, 2 after the resume
    assert opt["param_groups"][0]["lr"] == pytest.approx(1e-4 * (1 - 3 / 4))


def test_bad_input_is_one_line(tmp_path):
    """fastdiff's input errors raised inside a script end gd-run with one line, exit 1."""
    model, diffusion = gd.create_model_and_diffusion(**TINY)
    with pytest.raises(TrainingError, match="resume checkpoint not found: .*model000009.pt"):
        train_util.TrainLoop(
            model=model,
            diffusion=diffusion,
            data=None,
            batch_size=2,
            microbatch=-1,
            lr=1e-4,
            ema_rate="0.9999",
            log_interval=1,
            save_interval=1,
            resume_checkpoint=str(tmp_path / "model000009.pt"),
        )
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from guided_diffusion.image_datasets import load_data\n"
        "next(load_data(data_dir='', batch_size=1, image_size=32))\n"
    )
    res = gd_run([str(probe)], tmp_path)
    assert res.returncode == 1 and res.stderr.strip() == "Error: unspecified data directory (pass --data_dir)"


@pytest.mark.slow  # another gd-run process (seconds of start-up): CI's slow stage runs it
def test_gd_run_scores_the_model(trained, images, tmp_path):
    args = [str(SCRIPTS / "image_bpd.py"), "--data_dir", str(images), "--model_path"]
    args += [str(trained / "ema_0.9999_000002.pt"), *flag_args(TINY), "--num_samples", "2"]
    res = gd_run(args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "evaluation complete" in (tmp_path / "log.txt").read_text()
    for name in ("vb", "mse", "xstart_mse"):
        with np.load(tmp_path / f"{name}_terms.npz") as npz:
            assert npz["arr_0"].shape == (25,) and np.isfinite(npz["arr_0"]).all()
    with np.load(tmp_path / "bpd.npz") as npz:
        assert npz["arr_0"].shape == (1,) and 0 < npz["arr_0"][0] < 100


@pytest.mark.slow
def test_gd_run_trains_a_noisy_classifier_in_fp16(images, tmp_path):
    """classifier_train.py's use of the modules (MixedPrecisionTrainer, random crops, the
    sampler's draws, log_loss_dict, resume by file name), in fp16 autocast on the CPU too."""
    flags = dict(image_size=32, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="8")
    args = [str(SCRIPTS / "train_classifier.py"), "--data_dir", str(images), *flag_args(flags)]
    args += ["--diffusion_steps", "25", "--classifier_use_fp16", "True"]
    res = gd_run([*args, "--iterations", "2"], tmp_path / "a")
    assert res.returncode == 0, res.stderr[-3000:]
    log = rows(tmp_path / "a" / "progress.csv")
    assert [r["step"] for r in log] == ["0", "1"]
    # lg_loss_scale starts at 16, grows by 1e-3 per good step and drops by 1 on a step whose fp16
    # gradients overflow, as the original's; whether one does depends on the unseeded draws (as
    # in classifier_train.py).
    scales = [float(r["lg_loss_scale"]) for r in log]
    assert scales[0] == 16.0 and scales[1] in (15.0, 16.001)
    assert any(k.startswith("train_acc@1_q") for k in log[0])
    # a step that overflowed logs no grad_norm (it was skipped), as the original's
    norms = [r.get("grad_norm") for r in log]
    assert all(float(n) > 0 for n in norms if n) and (any(norms) or scales[-1] < 16.0)
    resume = ["--iterations", "3", "--resume_checkpoint", str(tmp_path / "a" / "model000002.pt")]
    res = gd_run([*args, *resume], tmp_path / "b")
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["step"] for r in rows(tmp_path / "b" / "progress.csv")] == ["2"]
    classifier = gd.create_classifier(**flags)
    classifier.load_state_dict(torch.load(tmp_path / "b" / "model000003.pt", weights_only=True), strict=True)


@pytest.mark.slow
def test_gd_run_trains_under_torchrun(images, tmp_path):
    """Two CPU ranks (gloo): DDP, sharded data, the loss-aware sampler's gathered losses."""
    args = train_args(images, "--lr_anneal_steps", "2", "--schedule_sampler", "loss-second-moment")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["OPENAI_LOGDIR"] = str(tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*torchrun, "-m", "fastdiff.cli.gd_run", *args]
    res = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["samples"] for r in rows(tmp_path / "progress.csv")] == ["4", "8"]  # 2 ranks x 2
    assert (tmp_path / "model000002.pt").is_file() and (tmp_path / "log-rank001.txt").is_file()


# ---------------------------------------------------------------- beside the original code


def _original_env(tmp_path: Path) -> dict:
    """PYTHONPATH for plain ``python`` on the checkout: stand-ins for mpi4py (one rank) and
    blobfile (fastdiff's local-files one), which the original imports and this venv lacks."""
    stub = tmp_path / "stub"
    (stub / "mpi4py").mkdir(parents=True)
    (stub / "mpi4py" / "__init__.py").write_text("")
    (stub / "mpi4py" / "MPI.py").write_text(
        "class _World:\n"
        "    rank, size = 0, 1\n"
        "    Get_rank = lambda self: 0\n"
        "    Get_size = lambda self: 1\n"
        "    bcast = lambda self, obj, root=0: obj\n"
        "COMM_WORLD = _World()\n"
    )
    (stub / "blobfile.py").write_text("from fastdiff.compat.blobfile import *  # noqa: F403\n")
    repo = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env["PYTHONPATH"] = os.pathsep.join([str(stub), ORIGINAL, repo])
    return env


def _run_original(args: list[str], logdir: Path, env: dict) -> subprocess.CompletedProcess:
    env = {**env, "OPENAI_LOGDIR": str(logdir)}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)


@needs_original
@pytest.mark.slow
def test_training_losses_are_the_originals(images, tmp_path):
    """The same script, seeded, from the same weights: on the original code (plain python) and on
    fastdiff (gd-run), 4 steps, then 2 more resumed from the step-2 files, each codebase from its
    own files and from the other's; the logged losses match."""
    torch.manual_seed(0)
    model, _ = gd.create_model_and_diffusion(**TINY)
    torch.save(model.state_dict(), tmp_path / "init.pt")
    env = _original_env(tmp_path)
    seeded = ["--seed", "0", "--init_path", str(tmp_path / "init.pt"), "--save_interval", "2"]

    def run(who: str, logdir: Path, *extra: str) -> list[dict]:
        args = train_args(images, *seeded, "--lr_anneal_steps", "4", *extra)
        res = _run_original(args, logdir, env) if who == "original" else gd_run(args, logdir)
        assert res.returncode == 0, (who, res.stderr[-3000:])
        return rows(logdir / "progress.csv")

    fresh = {who: run(who, tmp_path / who) for who in ("original", "fastdiff")}
    resumed = {}
    for who in ("original", "fastdiff"):
        for files in ("original", "fastdiff"):
            checkpoint = str(tmp_path / files / "model000002.pt")
            resumed[who, files] = run(
                who, tmp_path / f"{who}-from-{files}", "--resume_checkpoint", checkpoint
            )
    assert [r["step"] for r in fresh["fastdiff"]] == [r["step"] for r in fresh["original"]] == list("0123")
    pairs = list(zip(fresh["original"], fresh["fastdiff"], strict=True))
    for key, log in resumed.items():
        assert [r["step"] for r in log] == ["2", "3"], key
        pairs += list(zip(resumed["original", "original"], log, strict=True))
    for want, got in pairs:
        for key in ("loss", "mse", "vb", "grad_norm"):
            # Same draws (timesteps, noise, data order, flips); only the kernels' rounding differs
            # (fastdiff's fused GroupNorm and attention), ~1e-7 relative per forward: measured
            # bit-equal losses and <1e-6 weight differences after 4 steps.
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-4), (want["step"], key)
    for name in ("model000004.pt", "ema_0.9999_000004.pt", "model000002.pt"):
        want = torch.load(tmp_path / "original-from-original" / name, weights_only=True)
        for who, files in resumed:
            got = torch.load(tmp_path / f"{who}-from-{files}" / name, weights_only=True)
            assert want.keys() == got.keys()
            assert max((want[k] - got[k]).abs().max().item() for k in want) < 1e-4, (name, who, files)


@needs_original
@pytest.mark.slow
def test_fp16_training_losses_are_the_originals(images, tmp_path):
    """--use_fp16 True, seeded, from the same weights: the same losses on both codebases, and no
    step skipped on either (both compute the output head in fp32: an fp16 one overflowed)."""
    torch.manual_seed(0)
    model, _ = gd.create_model_and_diffusion(**TINY)
    torch.save(model.state_dict(), tmp_path / "init.pt")
    env = _original_env(tmp_path)
    args = train_args(images, "--seed", "0", "--init_path", str(tmp_path / "init.pt"), "--use_fp16", "True")
    args += ["--lr_anneal_steps", "4", "--save_interval", "4"]
    logs = {}
    for who in ("original", "fastdiff"):
        logdir = tmp_path / who
        res = _run_original(args, logdir, env) if who == "original" else gd_run(args, logdir)
        assert res.returncode == 0, (who, res.stderr[-3000:])
        assert "Found NaN" not in (logdir / "log.txt").read_text(), who
        logs[who] = rows(logdir / "progress.csv")
    assert [r["step"] for r in logs["fastdiff"]] == [r["step"] for r in logs["original"]] == list("0123")
    for want, got in zip(logs["original"], logs["fastdiff"], strict=True):
        for key in ("loss", "mse", "vb", "grad_norm"):
            # fp16 torsos on both sides: only rounding differs (measured: ~1e-6 relative)
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-3), (want["step"], key)


@needs_original
@pytest.mark.slow
def test_the_original_training_scripts_run_unedited(images, tmp_path):
    """image_train.py, image_nll.py and super_res_train.py from the checkout, through gd-run; the
    checkpoints load into the original's own model, strict."""
    sys.path.insert(0, ORIGINAL)
    try:
        import guided_diffusion.script_util as original
    finally:
        sys.path.remove(ORIGINAL)
    scripts = Path(ORIGINAL) / "scripts"
    common = [*flag_args(TINY), "--data_dir", str(images), "--batch_size", "2"]
    train = [str(scripts / "image_train.py"), *common, "--lr_anneal_steps", "2", "--save_interval", "1"]
    res = gd_run(train, tmp_path / "train")
    assert res.returncode == 0, res.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "train").glob("*.pt"))
    assert files == [f"{k}{s:06d}.pt" for k in ("ema_0.9999_", "model", "opt") for s in (0, 1)]
    model, _ = original.create_model_and_diffusion(**{**original.model_and_diffusion_defaults(), **TINY})
    model.load_state_dict(torch.load(tmp_path / "train" / "model000001.pt", weights_only=True), strict=True)
    model.load_state_dict(torch.load(tmp_path / "train" / "ema_0.9999_000001.pt", weights_only=True))

    nll = [str(scripts / "image_nll.py"), *common, "--model_path", str(tmp_path / "train" / "model000001.pt")]
    res = gd_run([*nll, "--num_samples", "2"], tmp_path / "nll")
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("vb", "mse", "xstart_mse"):
        with np.load(tmp_path / "nll" / f"{name}_terms.npz") as npz:
            assert npz["arr_0"].shape == (25,)

    sr = {k: v for k, v in TINY.items() if k not in ("image_size", "channel_mult")}
    sr_args = [*flag_args(sr), "--large_size", "64", "--small_size", "32", "--data_dir", str(images)]
    res = gd_run([str(scripts / "super_res_train.py"), *sr_args, "--lr_anneal_steps", "1"], tmp_path / "sr")
    assert res.returncode == 0, res.stderr[-3000:]
    sr_model, _ = original.sr_create_model_and_diffusion(
        **{**original.sr_model_and_diffusion_defaults(), **sr, "large_size": 64, "small_size": 32}
    )
    sr_model.load_state_dict(torch.load(tmp_path / "sr" / "model000000.pt", weights_only=True), strict=True)


# The original's sampling and likelihood scripts, unedited, on plain python and through gd-run,
# seeded as their work starts (tests/gd_scripts/seeded_run.py): script, the network's flags (over
# _SIDE_NET; "classifier" or "sr" pick those builders too), and the script's other flags.
_SIDE_NET = dict(
    image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
    learn_sigma=True, class_cond=True, diffusion_steps=100,
)  # fmt: skip
_SIDE_GUIDED = dict(image_size=64, channel_mult="1,2,2", attention_resolutions="16")
_SIDE_CLASSIFIER = dict(classifier_width=32, classifier_depth=1, classifier_attention_resolutions="8")
_SIDE_SR = dict(large_size=64, small_size=8, num_channels=32, num_res_blocks=1, attention_resolutions="8")
SCRIPTS_SIDE_BY_SIDE = {
    "image_sample-ddim7": ("image_sample.py", {}, "--timestep_respacing ddim7 --use_ddim True"),
    "image_sample-sections-unclipped-cosine-eps": (
        "image_sample.py",
        dict(noise_schedule="cosine", learn_sigma=False, resblock_updown=True, use_new_attention_order=True),
        "--timestep_respacing 10,5,3 --clip_denoised False",
    ),
    "classifier_sample-spatial-rescaled-t": (
        "classifier_sample.py",
        {
            **_SIDE_GUIDED,
            "rescale_timesteps": True,
            "classifier": {**_SIDE_CLASSIFIER, "classifier_pool": "spatial"},
        },
        "--timestep_respacing 5 --classifier_scale 10",
    ),
    "super_res_sample-8-to-64": ("super_res_sample.py", {"sr": _SIDE_SR}, "--timestep_respacing 5"),
    "image_nll-3-of-2-respaced": ("image_nll.py", dict(diffusion_steps=40), "--timestep_respacing 10"),
}


def _npz_arrays(folder: Path) -> dict:
    arrays = {}
    for path in sorted(folder.glob("*.npz")):
        with np.load(path) as npz:
            arrays.update({f"{path.name}:{k}": npz[k] for k in npz.files})
    return arrays


@needs_original
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCRIPTS_SIDE_BY_SIDE))
def test_the_original_scripts_compute_the_originals_outputs(images, name, tmp_path):
    """Respacing strings, processes, blocks, classifier pools, an upsampler's other sizes and a
    sample count that is no multiple of the batch: the same npz files as the original's run."""
    sys.path.insert(0, ORIGINAL)
    try:
        import guided_diffusion.script_util as original
    finally:
        sys.path.remove(ORIGINAL)
    script, overrides, rest = SCRIPTS_SIDE_BY_SIDE[name]
    overrides = dict(overrides)
    classifier_flags, sr_flags = overrides.pop("classifier", None), overrides.pop("sr", None)
    torch.manual_seed(0)
    if sr_flags is not None:
        flags = {
            **{k: v for k, v in _SIDE_NET.items() if k not in ("image_size", "channel_mult")},
            **sr_flags,
        }
        model, _ = original.sr_create_model_and_diffusion(
            **{**original.sr_model_and_diffusion_defaults(), **flags}
        )
    else:
        flags = {**_SIDE_NET, **overrides}
        model, _ = original.create_model_and_diffusion(**{**original.model_and_diffusion_defaults(), **flags})
    networks = {"model_path": model}
    if classifier_flags is not None:
        classifier_flags = {**classifier_flags, "image_size": flags["image_size"]}
        networks["classifier_path"] = original.create_classifier(
            **{**original.classifier_defaults(), **classifier_flags}
        )
        flags.update(classifier_flags)
    args = [str(SCRIPTS / "seeded_run.py"), "3", str(Path(ORIGINAL) / "scripts" / script), *flag_args(flags)]
    for option, network in networks.items():
        with torch.no_grad():  # no zeroed output convs: they would make every eps 0
            for p in network.parameters():
                p.add_(0.03 * torch.randn_like(p))
        torch.save(network.state_dict(), tmp_path / f"{option}.pt")
        args += [f"--{option}", str(tmp_path / f"{option}.pt")]
    if script == "super_res_sample.py":
        low_res = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
        np.savez(tmp_path / "base.npz", low_res, np.array([1, 2, 3, 998]))
        args += ["--base_samples", str(tmp_path / "base.npz")]
    if script == "image_nll.py":
        args += ["--data_dir", str(images)]
    args += [*rest.split(), "--num_samples", "3", "--batch_size", "2"]
    res = _run_original(args, tmp_path / "original", _original_env(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    res = gd_run(args, tmp_path / "fastdiff")
    assert res.returncode == 0, res.stderr[-3000:]
    want, got = _npz_arrays(tmp_path / "original"), _npz_arrays(tmp_path / "fastdiff")
    assert want and got.keys() == want.keys()
    for key, w in want.items():
        g = got[key]
        assert g.shape == w.shape and g.dtype == w.dtype, key
        if w.dtype == np.uint8:  # float order alone (fastdiff's kernels) may move a rare pixel a level
            levels = np.abs(g.astype(int) - w.astype(int))
            assert levels.max() <= 1 and (levels > 0).mean() < 1e-2, (key, levels.max(), (levels > 0).sum())
        else:  # bits-per-dim terms (measured: 2e-7 relative)
            assert np.abs(g - w).max() <= 1e-5 * np.abs(w).max(), key
