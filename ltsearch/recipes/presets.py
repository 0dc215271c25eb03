"""Presets: named recipes as data — the parts they set, and (``train``) the training recipe of
their paper, which fills the train keys a config does not give. Any part may be overridden in
``method:``; ``custom`` starts from the defaults for a free composition.

Epoch-valued defaults are fractions of the run (DRW at 0.8 is epoch 160 of 200), so a preset is
valid at any length.
"""
from __future__ import annotations

# Deferred re-weighting as LDAM-DRW's code does it: effective-number weights (β = 0.9999) from
# 80 % of the run, in F.cross_entropy(weight=w), i.e. divided by Σ w_y.
DRW = {"scheme": "effective", "beta": 0.9999, "start": 0.8, "normalize": "weight_sum"}

# LIFT's training recipe (its configs' num_epochs, lr, weight_decay, batch_size, momentum; cosine).
LIFT_TRAIN = {"preset": "none", "epochs": 10, "lr": 0.01, "weight_decay": 5e-4, "batch_size": 128,
              "momentum": 0.9, "schedule": "cosine", "warmup_epochs": 0}

PRESETS: dict[str, dict] = {
    # Plain cross-entropy, instance sampling: the baseline.
    "ce": {},
    # Start from the defaults and compose the parts (the leaderboard names the trial by them).
    "custom": {},
    # Class-balanced loss (Cui et al., CVPR 2019): weights from the first epoch, Σ w·ℓ / B.
    "reweight": {"weights": {"scheme": "effective", "beta": 0.9999, "start": "always",
                             "normalize": "batch"}},
    # Class-balanced re-sampling.
    "resample": {"sampler": {"name": "balanced"}},
    # Two-stage re-balancing, DRW by default; DRS: sampler {then: balanced, start: 0.8};
    # cRT: stage2 {name: crt}.
    "two_stage": {"weights": DRW},
    # BBN (Zhou et al., CVPR 2020) with its own schedule: Nesterov, ×0.01 at 120 and 160 of 200.
    "bbn": {"arch": {"name": "bilateral"}, "train": {"preset": "bbn_cifar"}},
    # Feature-space augmentation (Chu et al., ECCV 2020) after a plain stage 1.
    "feature_aug": {"stage2": {"name": "feature_aug"}},
    # LDAM-DRW (Cao et al., NeurIPS 2019): LDAM loss on the normed classifier, DRW at 80 %.
    "ldam_drw": {"loss": {"name": "ldam", "max_m": 0.5, "s": 30.0},
                 "arch": {"name": "plain", "classifier": "normed"}, "weights": DRW},
    # Logit-adjusted loss (Menon et al., ICLR 2021), τ = 1.
    "logit_adjust": {"loss": {"name": "logit_adjust", "tau": 1.0}},
    # Balanced softmax (Ren et al., NeurIPS 2020); compose mixup with `mixup: {alpha: 1.0}`.
    "balanced_softmax": {"loss": {"name": "balanced_softmax"}},
    # Input mixup through stage 1 with deferred re-weighting.
    "mixup_drw": {"mixup": {"alpha": 1.0}, "weights": DRW},
    # MiSLAS (Zhong et al., CVPR 2021), its CIFAR-10-LT IF=100 configs: mixup (α 1) in stage 1;
    # stage 2 fine-tunes the stage-1 classifier with learnable weight scaling, label-aware
    # smoothing (0.3 → 0.0) and class-balanced sampling, 10 epochs at lr 0.1 (cosine). Their
    # CIFAR-100-LT configs use smoothing 0.4 → 0.1 and `bn: update` (shift_bn); their classifier
    # learning-rate factor (0.5 here) is not modelled: classifier and scales share the lr.
    "mislas": {"mixup": {"alpha": 1.0},
               "stage2": {"name": "crt", "epochs": 10, "lr": 0.1, "bn": "frozen", "reset": False,
                          "scales": True, "sampler": "balanced",
                          "loss": {"name": "las", "smooth_head": 0.3, "smooth_tail": 0.0,
                                   "shape": "concave"}}},
    # Weight balancing (Alshammari et al., CVPR 2022): weight decay 5e-3 in stage 1 (their demo
    # also trains 320 epochs at lr 0.01, cosine, batch 64 — give those in train: to match), then
    # the classifier fine-tuned with a class-balanced loss, weight decay 0.1 and MaxNorm.
    "weight_balancing": {"train": {"weight_decay": 5e-3},
                         "stage2": {"name": "maxnorm", "epochs": 10, "lr": 0.01}},
    # LIFT (Shi et al., ICML 2024; shijxcs/LIFT configs/model/clip_vit_b16_peft.yaml): a
    # pretrained ViT with AdaptFormer adapters, the logit-adjusted loss, a cosine head (s = 25)
    # initialised from the class names' text features (an OpenCLIP backbone; any other:
    # `arch.classifier.init: class_mean`), 10 epochs of SGD at lr 0.01, weight decay 5e-4,
    # batch 128, cosine schedule, and its test-time ensemble of five crops (test_ensemble: True).
    "lift": {"finetune": {"name": "adaptformer"}, "loss": {"name": "logit_adjust", "tau": 1.0},
             "arch": {"name": "plain", "classifier": {"name": "cosine", "scale": 25.0, "init": "text"}},
             "train": {**LIFT_TRAIN, "tta": "five_crop"}},
    # A linear probe: the pretrained backbone frozen, the classifier learns with the
    # logit-adjusted loss (LIFT's classifier-only row), LIFT's training recipe.
    "linear_probe": {"finetune": {"name": "linear"}, "loss": {"name": "logit_adjust", "tau": 1.0},
                     "train": LIFT_TRAIN},
}
# The presets that need a pretrained backbone (`model.weights`) to mean what their paper means.
PRETRAINED = ("lift", "linear_probe")
