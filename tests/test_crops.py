"""Random-resized-crop boxes against torchvision's own draws, within their bounds; the boxes cut
and resized in one batched call; the evaluation's centre crop deterministic."""
import math

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import RandomResizedCrop

from ltsearch.data.crops import centre_crop, crop_resize, rrc_boxes

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def _stats(w, h, H, W):
    return (w * h / (H * W)).mean().item(), torch.log(w / h).mean().item(), torch.log(w / h).std().item()


def test_boxes_are_drawn_as_torchvisions_random_resized_crop_draws_them():
    H, W, n = 48, 64, 20000
    gen = torch.Generator().manual_seed(0)
    b = rrc_boxes(n, H, W, SCALE, RATIO, gen, "cpu")
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= W).all() and (b[:, 3] <= H).all()
    area = w * h / (H * W)  # within the bounds up to the rounding of w and h
    assert area.min() >= SCALE[0] * 0.8 and area.max() <= 1.0
    assert (w / h).min() >= RATIO[0] * 0.9 and (w / h).max() <= RATIO[1] * 1.1
    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, H, W), list(SCALE), list(RATIO))
                        for _ in range(n)], dtype=torch.float32)  # (top, left, h, w)
    ours, theirs = _stats(w, h, H, W), _stats(ref[:, 3], ref[:, 2], H, W)
    for a, t in zip(ours, theirs):  # mean area, mean and spread of the log aspect ratio
        assert abs(a - t) < 0.015, (ours, theirs)
    centre_x = ((b[:, 0] + b[:, 2]) / 2 / W).mean().item()  # placed uniformly: centred on average
    centre_y = ((b[:, 1] + b[:, 3]) / 2 / H).mean().item()
    assert abs(centre_x - 0.5) < 0.01 and abs(centre_y - 0.5) < 0.01


def test_a_box_that_cannot_fit_falls_back_to_the_centre_at_the_nearest_ratio():
    b = rrc_boxes(5, 10, 100, (0.9, 1.0), RATIO, torch.Generator().manual_seed(0), "cpu")
    w = round(10 * RATIO[1])  # the widest allowed box of full height
    assert b.tolist() == [[(100 - w) // 2, 0, (100 - w) // 2 + w, 10]] * 5


def test_crop_resize_of_the_whole_image_is_a_bilinear_resize():
    x = torch.rand(2, 3, 12, 16)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 12.0]] * 2)
    out = crop_resize(x, boxes, (24, 32))  # upscaling: one sample per output pixel
    assert torch.allclose(out, F.interpolate(x, size=(24, 32), mode="bilinear", align_corners=False), atol=1e-5)
    part = crop_resize(x, torch.tensor([[4.0, 2.0, 8.0, 6.0], [0.0, 0.0, 4.0, 4.0]]), (4, 4))
    assert torch.allclose(part[0], x[0, :, 2:6, 4:8], atol=1e-6)  # a same-size box: the pixels
    assert torch.allclose(part[1], x[1, :, 0:4, 0:4], atol=1e-6)


def test_the_evaluation_crop_is_timms_resize_then_centre_crop():
    x = torch.rand(2, 3, 32, 32)
    resize = lambda t, s: F.interpolate(t, size=s, mode="bicubic", align_corners=False)  # noqa: E731
    got = centre_crop(x, (28, 28), 0.875, resize)
    big = math.floor(28 / 0.875)
    assert torch.equal(got, TF.center_crop(resize(x, (big, big)), [28, 28]))
    assert torch.equal(got, centre_crop(x, (28, 28), 0.875, resize))  # deterministic


def test_a_trainer_with_random_resized_crops_trains_at_the_models_size_and_caches_nothing():
    import copy

    from conftest import DIGITS
    from ltsearch.data import build_data
    from ltsearch.runconfig import config_from_dict
    from ltsearch.trainer import Trainer

    d = copy.deepcopy(DIGITS)
    d["data"]["augment"] = {"crop_pad": 0, "hflip": True, "random_resized_crop": True,
                            "scale": [0.5, 1.0], "eval_crop_pct": 0.875}
    d["method"] = {"name": "ce", "finetune": "linear"}
    cfg = config_from_dict(d)
    trainer = Trainer(cfg, build_data(cfg.data), "cpu")
    gen = torch.Generator().manual_seed(0)
    x, _ = trainer.train_set.batch(torch.arange(8), gen)
    assert x.shape == (8, 1, 8, 8)
    a, _ = trainer.val_set.batch(torch.arange(8), augment=False)
    b, _ = trainer.val_set.batch(torch.arange(8), augment=False)
    assert torch.equal(a, b)
    trainer.train_epoch()
    assert trainer._features is None  # augmented: features differ every epoch


def test_a_uint8_batch_on_the_cpu_is_cropped_as_torchvisions_tensor_random_resized_crop():
    """Image by image, torchvision's own resized_crop (antialiased bilinear) of each box, to the
    bit; and where the box is enlarged, the float path's bilinear within the uint8 rounding."""
    import torchvision.transforms.v2.functional as F2

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 40, 52), dtype=torch.uint8, generator=gen)
    boxes = rrc_boxes(6, 40, 52, (0.08, 1.0), RATIO, gen, "cpu")
    out = crop_resize(x, boxes, (24, 24))
    assert out.dtype == torch.uint8 and out.is_contiguous(memory_format=torch.channels_last)
    for n, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        want = F2.resized_crop(x[n], y1, x1, y2 - y1, x2 - x1, [24, 24], antialias=True)
        assert torch.equal(out[n], want), n
    small = torch.tensor([[4.0, 2.0, 16.0, 14.0]] * 6)  # 12 px → 24 px: enlarged
    diff = (crop_resize(x, small, (24, 24)).float() - crop_resize(x.float(), small, (24, 24))).abs()
    # (the border pixels differ: the crop is resized alone, roi_align reads the pixels beside it)
    assert diff[:, :, 1:-1, 1:-1].max() <= 1.0 and diff[:, :, 0].max() > 1


def test_crops_normalised_as_they_are_made_equal_crops_then_normalised():
    """``affine`` scales each crop as it is cut (the CPU's uint8 path) and the float path's
    output: the same numbers, to the bit, as cropping first and then normalising the batch."""
    from ltsearch.data.device import DeviceImages
    from ltsearch.data.sources import ImageSet

    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (5, 3, 30, 36), dtype=torch.uint8, generator=gen)
    images = DeviceImages(ImageSet(x.numpy(), np.zeros(5, dtype=np.int64)), torch.device("cpu"),
                          torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3]))
    boxes = rrc_boxes(5, 30, 36, (0.08, 1.0), RATIO, gen, "cpu")
    flip = torch.tensor([True, False, True, True, False])
    for source in (x, x.float()):  # uint8 (image by image) and float (roi_align)
        fused = crop_resize(source, boxes, (20, 20), flip, images._affine())
        after = images._normalized(crop_resize(source, boxes, (20, 20), flip))
        assert fused.dtype == torch.float32 and fused.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(fused, after)
    assert fused.std() > 0.5  # normalised values, not 0–255
