"""``FitConfig``: one model configuration, as ``train.fit`` trains it and ``config.json`` records it."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FitConfig:
    model: str = "efficientnet_lite0"
    input_size: int = 224
    weights: str | None = None  # None, "imagenet", a weights file, or a model bundle (its int8 model, read back)
    dropout: float = 0.2
    batchnorm: bool = False  # baseline only
    freeze_bn: bool = True  # pretrained backbones: keep batch-norm statistics (see README)
    trainable_from: str = ""  # freeze every layer before the first one whose name starts with this
    augment: bool = True  # rotation 30 deg, zoom 0.2, shift 0.1, no flips
    photometric: float = 0.0  # random gamma / contrast / brightness of this strength (0 = off)
    aspect: bool = False  # rescale each training image's width to a film ratio drawn regardless of class
    #                       (train.aspect: the squash otherwise tells normal from pneumonia films)
    framing: float = 0.0  # crop each training image to a random window of [framing, 1] of each side,
    #                       whatever its class (train.framing: normal films otherwise show more of the
    #                       child); 0 = off
    framing_full: float = 0.0  # under framing, the share of training images left whole (drawn at random)
    intensity: str = "none"  # the input's intensity normalisation (cxr_edge.intensity: none, equalize or
    #                          equalize_clip), in training, export and the runtime alike (the card carries it)
    acquisition: float = 0.0  # under framing, the share of training images given one random acquisition shift
    #                           (train.shifts: exposure, noise, blur, JPEG, low resolution, rotation, framing,
    #                           collimation, burned-in text, the portable-film look); 0 = off
    optimizer: str = "sgd"  # sgd (momentum 0.9) or adam
    lr: float = 1e-3
    schedule: str = "constant"  # constant or cosine
    batch: int = 16
    epochs: int = 100
    patience: int = 10  # early stopping on val loss, best weights restored
    label_smoothing: float = 0.0
    class_weight: bool = False  # balanced class weights (per-image loss weights)
    mixup: float = 0.0  # mixup Beta(a, a) on training batches (0 = off)
    ema: float = 0.0  # validate, keep and return an exponential moving average of the weights (its momentum
    #                   per step, 0.998 say; 0 = off, the raw weights)
    teachers: list = field(default_factory=list)  # run ids: distil their mean probabilities
    distill_alpha: float = 0.3  # weight of the hard label against the teachers' soft targets
    monitor: str = "val_loss"  # early stopping and best epoch: val_loss, val_accuracy or val_macro_f1; under
    #                            ``aspect`` or ``framing`` also val_neutral_loss / _accuracy / _macro_f1
    #                            (train.aspect, train.framing); under ``acquisition`` also val_shifted_* (the
    #                            neutral copies, each shifted) and val_robust_loss (mean of the two losses)
    precision: str = "float32"  # float32 or bf16 (mixed, GPU)
    protocol: str = "grouped"  # grouped (patient-grouped val from train/) or seed (report, leaky)
    val_fraction: float = 0.15
    seed: int = 0  # initial weights, batch order, augmentation
    split_seed: int = 0  # the validation split: the same for every run unless set (teachers with other seeds
    #                      must not train on the images their students are validated on)
    deadline_s: float | None = None  # stop after this many seconds of training (best weights kept)
    limit: int = 0  # smoke tests: a seeded sample of N images per split (0 = all)
    name: str = ""  # run id prefix; the report-table row name, say
    notes: str = ""
    extra: dict = field(default_factory=dict)

