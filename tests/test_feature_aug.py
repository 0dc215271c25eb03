"""Feature-space augmentation (Chu et al., ECCV 2020)."""
import numpy as np
import pytest
import torch

from conftest import make_config
from ltsearch.config import ConfigError
from ltsearch.runconfig import config_from_dict
from ltsearch.recipes.stage2.feature_aug import (class_activation_map, confusing_head_classes,
                                                 fuse, split_masks, tail_classes)
from ltsearch.trainer import Trainer

FA = {"name": "feature_aug", "stage2": {"tau_s": 0.6, "tau_g": 0.3, "k": 2, "aug_per_tail": 3,
                                       "tail_count": 40, "epochs": 2, "lr": 0.02}}


def test_cam_of_a_hand_built_feature_map():
    # f: 2 channels on a 2×2 grid; class 1's classifier row w = (2, −1).
    f = torch.tensor([[[[1.0, 0.0], [2.0, 1.0]],
                       [[0.0, 1.0], [1.0, 3.0]]]])
    w = torch.tensor([[0.0, 0.0], [2.0, -1.0]])
    # M = 2·f0 − f1 = [[2, −1], [3, −1]]; min −1, max 3 → (M + 1)/4
    cam = class_activation_map(f, w, torch.tensor([1]))
    torch.testing.assert_close(cam, torch.tensor([[[0.75, 0.0], [1.0, 0.0]]]))
    spec, gen = split_masks(cam, tau_s=0.7, tau_g=0.2)
    assert spec.squeeze().tolist() == [[1, 0], [1, 0]]
    assert gen.squeeze().tolist() == [[0, 1], [0, 1]]
    spec, gen = split_masks(cam, tau_s=0.8, tau_g=0.75)
    assert spec.squeeze().tolist() == [[0, 0], [1, 0]] and gen.squeeze().tolist() == [[1, 1], [0, 1]]


def test_fusion_takes_tail_specific_and_head_generic_parts():
    f_t = torch.full((1, 1, 2, 2), 5.0)
    f_h = torch.full((1, 1, 2, 2), 7.0)
    cam_t = torch.tensor([[[0.9, 0.1], [0.5, 0.8]]])  # specific (≥0.6): (0,0), (1,1)
    cam_h = torch.tensor([[[0.1, 0.2], [0.9, 0.1]]])  # generic (≤0.3): (0,0), (0,1), (1,1)
    fused = fuse(f_t, cam_t, f_h, cam_h, 0.6, 0.3)
    # tail where its specific mask is on; head where the head is generic and the tail is not
    assert fused.squeeze().tolist() == [[5.0, 7.0], [0.0, 5.0]]


def test_confusing_classes_are_top_k_by_mean_confidence():
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.3, 0.3, 0.3, 0.1],   # class 3's images
                          [0.6, 0.1, 0.1, 0.2]])                       # class 0's image
    labels = torch.tensor([3, 3, 0])
    # mean confidence on class 3's images over heads 0, 1, 2: 0.2, 0.4, 0.3
    assert confusing_head_classes(probs, labels, [3], [0, 1, 2], 2).tolist() == [[1, 2]]
    assert confusing_head_classes(probs, labels, [3], [0, 1, 2], 1).tolist() == [[1]]


def test_tail_classes():
    counts = [500, 300, 100, 60, 40]
    assert tail_classes(counts, share=0.1) == [3, 4]  # under 10 % of 1000 images
    assert tail_classes(counts, count=70) == [3, 4] and tail_classes(counts, count=50) == [4]
    assert tail_classes(counts) == [2, 3, 4]  # the rarest half (rounded)
    assert tail_classes([5, 9, 5, 1], fraction=0.5) == [0, 3]  # ties by label


@pytest.mark.parametrize("num_classes", [10, 100])
def test_default_tail_split_works_on_cifar_lt(num_classes):
    """CIFAR-100-LT IF=100: every class holds under 5 % of the images, so the old default
    (tail_share 0.05) made all 100 classes tail classes and the method refused to run."""
    from ltsearch.data import class_counts
    from ltsearch.recipes.stage2.feature_aug import FeatureAugParams

    counts = class_counts("exp", 5000 if num_classes == 10 else 500, num_classes, 100)
    assert all(n < 0.05 * sum(counts) for n in counts) == (num_classes == 100)
    p = FeatureAugParams()
    tails = tail_classes(counts, p.tail_fraction, p.tail_share, p.tail_count)
    assert len(tails) == num_classes // 2 and tails == list(range(num_classes // 2, num_classes))


def test_tau_pair_is_validated():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"method": {"name": "feature_aug", "stage2": {"tau_s": 0.4, "tau_g": 0.5}}})
    assert e.value.key == "method.stage2.tau_g" and "below tau_s" in str(e.value)


@pytest.mark.parametrize("stage2,key,text", [
    ({"k": 6}, "method.stage2.k", "needs 6 head classes; the tail split leaves 5"),
    ({"tail_share": 0.5}, "method.stage2.tail_share", "tail_share=0.5 leaves 0 head classes"),
    ({"tail_count": 10}, "method.stage2.tail_count", "tail_count=10 leaves no tail class"),
])
def test_a_tail_split_the_data_cannot_give_names_its_key(digits_data, stage2, key, text):
    """digits-LT (10 classes, 128 down to 14 images): 5 tail classes by default, every class
    under half of the images, none under 10."""
    cfg = make_config({"name": "feature_aug", "stage2": stage2})
    with pytest.raises(ConfigError) as e:
        Trainer(cfg, digits_data)
    assert e.value.key == key and text in str(e.value)


def test_feature_aug_after_any_first_stage(digits_data):
    cfg = make_config({**FA, "loss": {"name": "ldam"}, "weights": {"start": 1}}, train={"epochs": 2})
    result = Trainer(cfg, digits_data).fit()
    assert result.status == "finished" and result.epochs == 4


@pytest.fixture(scope="module")
def trained(digits_data):
    """A feature_aug run stopped right after stage 1 (2 epochs), and its stage-2 start."""
    t = Trainer(make_config(FA), digits_data)
    t.fit(max_epochs=2)
    body = {k: v.clone() for k, v in t.model.body.state_dict().items()}
    head = {k: v.clone() for k, v in t.model.classifier.state_dict().items()}
    return t, body, head


def test_stage2_confusing_classes_and_fused_labels(trained):
    t, _, _ = trained
    t._enter_phase(1, resumed=False)  # what train_epoch does at the phase boundary
    m = t.method.stage2
    assert m.tails == [c for c, n in enumerate(t.data.counts) if n < 40]
    # recompute the stage-1 model's mean confidences by hand
    with torch.no_grad():
        x, y = t.train_set.batch(torch.arange(len(t.train_set)), augment=False)
        t.model.eval()
        probs = t.model(x).softmax(1)
    for row, tail in zip(m.confusing.tolist(), m.tails):
        conf = probs[y == tail].mean(0)
        ranked = sorted(m.heads, key=lambda h: -conf[h].item())
        assert row == ranked[:2]
    # every fused sample carries its tail image's own label
    tail_idx = torch.cat([torch.nonzero(y == c).flatten()[:2] for c in m.tails])
    tx, ty = t.train_set.batch(tail_idx, augment=False)
    feats, labels = m.fused_samples(tx, ty, torch.Generator().manual_seed(0))
    assert labels.tolist() == ty.repeat_interleave(3).tolist()
    assert feats.shape == (len(tail_idx) * 3, 64, 2, 2)


def test_stage2_freezes_features_and_tunes_classifier(trained, digits_data):
    t, body, head = trained
    result = t.fit()
    assert result.status == "finished" and result.epochs == 4
    for k, v in t.model.body.state_dict().items():
        assert torch.equal(v, body[k]), k  # weights and BatchNorm statistics
    assert not torch.equal(t.model.classifier.weight, head["weight"])
    assert "stage1/test/top1" in result.metrics and "test/few" in result.metrics
    assert [h["phase"] for h in result.history] == ["stage1", "stage1", "stage2", "stage2"]


def test_feature_aug_trains_on_digits(digits_data):
    """The stage-1 numbers are those of the same run stopped after stage 1; the final ones
    come from the final predictions; the stage changed them (its augmentation acted)."""
    from ltsearch.metrics import shot_groups

    result = Trainer(make_config(FA), digits_data).fit()
    assert result.status == "finished"
    assert result.metrics["val/balanced_acc"] > 0.6  # reaches ≈0.8; chance is 0.1
    first = Trainer(make_config(FA), digits_data)
    first.fit(max_epochs=2)
    stage1 = first.evaluate(first.test_set, "test")
    for k in ("top1", "balanced_acc", "many", "medium", "few"):
        assert result.metrics[f"stage1/test/{k}"] == pytest.approx(stage1[f"test/{k}"]), k
    few = shot_groups(digits_data.counts)["few"]
    assert result.metrics["test/few"] == pytest.approx(np.mean([result.metrics["test/per_class"][c] for c in few]))
    assert result.metrics["test/per_class"] != stage1["test/per_class"]


def test_resume_inside_stage2_keeps_confusing_classes(tmp_path, digits_data):
    cfg = make_config(FA)
    full = Trainer(cfg, digits_data).fit()
    first = Trainer(cfg, digits_data)
    first.fit(max_epochs=3)
    first.save(tmp_path / "c.pt")
    second = Trainer(cfg, digits_data)
    second.load(tmp_path / "c.pt")
    assert torch.equal(second.method.stage2.confusing, first.method.stage2.confusing)
    resumed = second.fit()
    assert resumed.metrics["val/per_class"] == full.metrics["val/per_class"]
