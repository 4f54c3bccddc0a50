"""The backbone's weights: the shipped Lite0 ImageNet weights classify a real photo correctly, and
a state dict that does not line up with the architecture fails loudly instead of loading."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

from hgad_edge.training.backbone import (
    BackboneError,
    lite_weights_path,
    load_pretrained,
    match_state_dict,
    read_state_dict,
)
from hgad_edge.training.config import BackboneConfig
from hgad_edge.training.data import load_image, resize_image

timm = pytest.importorskip("timm")
MILITARY_UNIFORM = 652  # ImageNet-1k class of matplotlib's sample photo of Grace Hopper in uniform


@pytest.fixture(scope="module")
def lite0():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    path = lite_weights_path("tf_efficientnet_lite0")
    return model, read_state_dict(path), path


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1"])  # both ship with [train]
def test_shipped_lite_weights_classify_a_real_photo(name):
    """Grace Hopper's portrait (shipped with matplotlib, a real photograph) is a military uniform."""
    from matplotlib import cbook

    model = timm.create_model(name, pretrained=False).eval()
    load_pretrained(model, BackboneConfig(name=name))
    image = load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    cfg = model.pretrained_cfg
    x = (resize_image(image, cfg["input_size"][1:]).astype(np.float32) / 255 - np.array(cfg["mean"])) / np.array(
        cfg["std"]
    )
    with torch.no_grad():
        probs = model(torch.from_numpy(x).permute(2, 0, 1)[None].float()).softmax(1)[0]
    assert int(probs.argmax()) == MILITARY_UNIFORM and float(probs[MILITARY_UNIFORM]) > 0.3


def test_renamed_weights_in_the_same_order_map(lite0):
    """The Lite package names its tensors differently from timm: mapped in order, every tensor."""
    model, state, path = lite0
    assert not set(model.state_dict()) <= set(state)  # really another naming scheme
    mapped = match_state_dict(model, state, path)
    assert list(mapped) == list(model.state_dict())
    assert all(a is b for a, b in zip(mapped.values(), state.values()))


def test_reordered_weights_fail_loudly(lite0):
    model, state, path = lite0
    keys = list(state)
    i = keys.index("_bn0.weight")
    swapped = keys[:i] + [keys[i + 1], keys[i]] + keys[i + 2 :]  # bias before weight: same shape (32,)
    with pytest.raises(BackboneError, match=r"_bn0\.bias lines up with timm's bn1\.weight"):
        match_state_dict(model, OrderedDict((k, state[k]) for k in swapped), path)
    rng = np.random.default_rng(0)
    shuffled = OrderedDict((keys[j], state[keys[j]]) for j in rng.permutation(len(keys)))
    with pytest.raises(BackboneError, match="has shape|lines up"):
        match_state_dict(model, shuffled, path)


def test_wrong_architecture_fails_loudly(lite0, tmp_path):
    model, state, path = lite0
    with pytest.raises(BackboneError, match="295 tensors, but the timm model has 296"):
        match_state_dict(model, OrderedDict(list(state.items())[1:]), path)
    timm_named = model.state_dict()
    other = timm.create_model("tf_efficientnet_lite1", pretrained=False).state_dict()  # Lite0's names are a subset
    with pytest.raises(BackboneError, match=r"tensor\(s\) are extra .* right architecture"):
        match_state_dict(model, other, path)
    renamed = OrderedDict(("typo" + k if k == "bn1.bias" else k, v) for k, v in timm_named.items())
    with pytest.raises(BackboneError, match="1 tensor.* extra .*typobn1.bias.* 1 missing .*bn1.bias"):
        match_state_dict(model, renamed, path)
    wide = OrderedDict((k, torch.zeros(64) if k == "bn1.bias" else v) for k, v in timm_named.items())
    with pytest.raises(BackboneError, match=r"bn1\.bias has shape \(64,\)"):
        match_state_dict(model, wide, path)
    with pytest.raises(BackboneError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(BackboneError, match="not a state dict"):
        read_state_dict(tmp_path / "list.pth")


def test_pool_border_zero_counts_the_padding_exclude_does_not():
    from hgad_edge.training.backbone import aggregate

    ones = torch.ones(1, 1, 3, 3)
    zero = aggregate(ones, 3, "zero")[0, 0]
    assert torch.allclose(zero, torch.tensor([[4, 6, 4], [6, 9, 6], [4, 6, 4]]) / 9.0)  # corner 4/9, edge 6/9
    assert torch.equal(aggregate(ones, 3, "exclude"), ones)  # averages of valid neighbours only
    assert torch.equal(aggregate(ones, 1, "zero"), ones)  # pool 1 is no pooling


def test_pool_per_stage_windows():
    """backbone.pool (1, 3): stage 2 unpooled, stage 3 averaged over 3x3; one value pools every stage."""
    from hgad_edge.training.backbone import Backbone, aggregate
    from hgad_edge.training.config import BackboneConfig

    x = torch.randn(1, 3, 64, 64)
    raw = Backbone(BackboneConfig(name="tf_efficientnet_lite0", stages=(2, 3), pool=(1,)), load_weights=False)
    mixed = Backbone(BackboneConfig(name="tf_efficientnet_lite0", stages=(2, 3), pool=(1, 3)), load_weights=False)
    mixed.load_state_dict(raw.state_dict())
    with torch.no_grad():
        plain, got = raw(x), mixed(x)
    assert torch.equal(got[0], plain[0])
    assert torch.allclose(got[1], aggregate(plain[1], 3, "zero"))


def test_a_repeated_stage_is_one_more_level_from_the_same_map():
    """stages (2, 3, 3) with pool (3, 3, 5): stage 3 computed once, read twice with two windows."""
    from hgad_edge.training.backbone import Backbone, aggregate

    x = torch.randn(1, 3, 64, 64)
    raw = Backbone(BackboneConfig(name="tf_efficientnet_lite0", stages=(2, 3), pool=(1,)), load_weights=False)
    multi = Backbone(
        BackboneConfig(name="tf_efficientnet_lite0", stages=(2, 3, 3), pool=(3, 3, 5)), load_weights=False
    )
    multi.load_state_dict(raw.state_dict())  # the same timm model: stage 3 is not built twice
    with torch.no_grad():
        plain, got = raw(x), multi(x)
    assert [lv.channels for lv in multi.levels] == [plain[0].shape[1], plain[1].shape[1], plain[1].shape[1]]
    assert [lv.stages for lv in multi.levels] == [(2,), (3,), (3,)]
    assert [lv.name for lv in multi.levels] == ["s2_x1_3x3", "s3_x1_3x3", "s3_x1_5x5"]  # unique: reports key on it
    assert [lv.name for lv in raw.levels] == ["s2_x1", "s3_x1"]
    assert torch.allclose(got[0], aggregate(plain[0], 3, "zero"))
    assert torch.allclose(got[1], aggregate(plain[1], 3, "zero"))
    assert torch.allclose(got[2], aggregate(plain[1], 5, "zero"))
