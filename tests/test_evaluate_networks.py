"""Feature networks: the FID Inception-v3's architecture and outputs with random weights, its weight
loading and errors, the TF1 resize, and the bundled MNIST CNN as a feature network."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from fastdiff.evaluation.inception import FIDInceptionV3, resize_like_tf1
from fastdiff.evaluation.metrics import EvaluationError
from fastdiff.evaluation.networks import (
    BUNDLED_CNN,
    InceptionFeatures,
    compute_activations,
    load_inception,
    load_mnist_features,
)

# torchvision's Inception3(aux_logits=False, num_classes=1008) has the same names and shapes
# (checked once against torchvision 0.28); 23,850,960 parameters.
INCEPTION_PARAMS = 23_850_960


@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    with torch.no_grad():  # keep activations O(1) through 94 random layers
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.fill_(2.0)
    return net


def test_inception_architecture(inception):
    assert sum(p.numel() for p in inception.parameters()) == INCEPTION_PARAMS
    sd = inception.state_dict()
    assert sd["Mixed_6d.branch1x1.conv.weight"].shape == (192, 768, 1, 1)
    assert sd["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert sd["fc.weight"].shape == (1008, 2048)
    assert inception.Mixed_6d.branch1x1.bn.eps == 1e-3


def test_inception_outputs_and_spatial_layout(inception):
    x = torch.randint(0, 256, (2, 3, 64, 64)).float()
    seen = {}
    hook = inception.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.update(out=o))
    with torch.no_grad():
        pool, spatial, logits = inception(x)
    hook.remove()
    assert pool.shape == (2, 2048) and spatial.shape == (2, 17 * 17 * 7) and logits.shape == (2, 1008)
    assert seen["out"].shape == (2, 192, 17, 17) and (seen["out"] >= 0).all()  # after ReLU
    nhwc = seen["out"][:, :7].permute(0, 2, 3, 1)
    assert torch.equal(spatial.view(2, 17, 17, 7), nhwc)  # TF's NHWC order: precomputed mu_s fit
    assert torch.allclose(logits, pool @ inception.fc.weight.T)  # no bias, as the evaluator
    assert torch.isfinite(pool).all() and pool.abs().max() > 0


def tf1_resize_loops(img: np.ndarray, size: int) -> np.ndarray:
    """TF1 resize_bilinear (align_corners=False) written per pixel from its 4-corner formula."""
    h, w = img.shape
    out = np.zeros((size, size))
    for i in range(size):
        y = i * h / size
        y0, yf = int(np.floor(y)), y - np.floor(y)
        y1 = min(y0 + 1, h - 1)
        for j in range(size):
            x = j * w / size
            x0, xf = int(np.floor(x)), x - np.floor(x)
            x1 = min(x0 + 1, w - 1)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * xf
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * xf
            out[i, j] = top + (bottom - top) * yf
    return out


@pytest.mark.parametrize("h,size", [(8, 13), (13, 8), (5, 5)])
def test_resize_like_tf1(h, size):
    img = np.random.default_rng(h).uniform(0, 255, (h, h))
    ours = resize_like_tf1(torch.from_numpy(img)[None, None], size)[0, 0].numpy()
    np.testing.assert_allclose(ours, tf1_resize_loops(img, size), rtol=1e-12, atol=1e-9)


def test_load_inception_from_a_pytorch_fid_style_file(tmp_path, inception):
    sd = {k: v.clone() for k, v in inception.state_dict().items()}
    sd["fc.bias"] = torch.randn(1008)
    torch.save(sd, tmp_path / "pt_inception.pth")
    feats = load_inception(tmp_path / "pt_inception.pth")
    assert isinstance(feats, InceptionFeatures) and "pt_inception.pth" in feats.name
    images = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    acts = compute_activations(feats, images)
    with torch.no_grad():
        pool, spatial, logits = inception(torch.from_numpy(images).permute(0, 3, 1, 2).float())
    np.testing.assert_allclose(acts.pool, pool.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acts.logits, logits.numpy(), rtol=1e-5, atol=1e-5)
    # a 1000-logit classifier is sized by the file
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    torch.save({"state_dict": sd}, tmp_path / "w1000.pth")
    assert load_inception(tmp_path / "w1000.pth").net.fc.weight.shape == (1000, 2048)


def test_inception_weight_errors_are_one_line(tmp_path, inception):
    with pytest.raises(EvaluationError, match="pt_inception-2015-12-05-6726825d.pth") as e:
        load_inception(None)
    assert "\n" not in str(e.value) and "--inception" in str(e.value)
    with pytest.raises(EvaluationError, match="not found"):
        load_inception(tmp_path / "nothing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(EvaluationError, match="cannot read") as e:
        load_inception(tmp_path / "junk.pth")
    assert "\n" not in str(e.value)
    sd = dict(inception.state_dict())
    del sd["Mixed_5b.branch1x1.conv.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(EvaluationError, match="missing Mixed_5b.branch1x1.conv.weight"):
        load_inception(tmp_path / "partial.pth")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(EvaluationError, match="not an Inception-v3"):
        load_inception(tmp_path / "other.pth")


class _RunsCode:
    """Unpickling this would create ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_inception_file_that_would_run_code_is_one_line_and_runs_nothing(tmp_path, recwarn):
    """A pickle of protocol 4 also printed torch's two-line UserWarning above the error line."""
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"fc.weight": _RunsCode(tmp_path / "ran")}, f, protocol=4)
    with pytest.raises(EvaluationError, match="weights_only=True") as e:
        load_inception(tmp_path / "evil.pth")
    assert "\n" not in str(e.value) and not (tmp_path / "ran").exists()
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


@pytest.mark.skipif(not BUNDLED_CNN.is_file(), reason="bundled MNIST CNN missing")
def test_mnist_features():
    net = load_mnist_features()
    rng = np.random.default_rng(0)
    images32 = rng.integers(0, 256, (5, 32, 32, 1), dtype=np.uint8)
    acts = compute_activations(net, images32, batch_size=2)
    assert (
        acts.pool.shape == (5, 128) and acts.spatial.shape == (5, 8 * 8 * 7) and acts.logits.shape == (5, 10)
    )
    # 28-px digits are padded to 32 with background, as the training data
    images28 = images32[:, 2:-2, 2:-2]
    padded = np.pad(images28, ((0, 0), (2, 2), (2, 2), (0, 0)))
    np.testing.assert_allclose(compute_activations(net, images28).pool, compute_activations(net, padded).pool)
    with pytest.raises(EvaluationError, match="1-channel 28x28 or 32x32"):
        compute_activations(net, rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))


def test_activations_fill_one_array_per_feature_not_a_joined_list():
    """compute_activations writes each batch's features into arrays of every image's: joining
    per-batch parts held them twice (2 GB of Inception features for 50,000 samples). A rank's
    share of the batches (a partial last batch included) is those images' rows."""
    import tracemalloc
    import types

    def activations(x):  # numpy-backed features, which tracemalloc sees
        flat = x.numpy().reshape(len(x), -1).astype(np.float32)
        return tuple(torch.from_numpy(flat[:, :w].copy()) for w in (48, 16, 4))

    net = types.SimpleNamespace(check_images=lambda shape: None, activations=activations)
    images = np.random.default_rng(0).integers(0, 256, (1003, 4, 4, 3), dtype=np.uint8)
    compute_activations(net, images[:20], batch_size=10)  # its first-call allocations, untraced
    tracemalloc.start()
    try:
        acts = compute_activations(net, images, batch_size=10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    features = images.reshape(1003, -1).astype(np.float32)
    assert np.array_equal(acts.pool, features) and np.array_equal(acts.logits, features[:, :4])
    assert peak < 1.5 * (acts.pool.nbytes + acts.spatial.nbytes + acts.logits.nbytes)  # was over 2x
    share = compute_activations(net, images, batch_size=10, batches=range(95, 101))
    assert np.array_equal(share.spatial, features[950:, :16])
