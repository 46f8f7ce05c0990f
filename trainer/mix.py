"""Mixup and CutMix of a training batch on its device, after the loader: the images and their one-hot targets are
blended with the batch's mirror image (the batch reversed), as timm's Mixup pairs them.

- Mixup (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization"): x = lam x_i + (1 - lam) x_j.
- CutMix (Yun et al. 2019, "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable
  Features"): a box of about (1 - lam) of the area is pasted from x_j, and lam becomes the area kept.

lam ~ Beta(alpha, alpha); with both on, each batch takes one of the two at even odds (torchvision's references and
timm's switch_prob=0.5). Every draw is made on the host from a seed the caller derives from the run's seed, the step
and the rank, so a resumed run mixes exactly as an uninterrupted one, with no state to save, and nothing waits for
the device: the box is host integers, the weights host floats.
"""
import numpy as np
import torch


class BatchMix:
    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int):
        self.mixup_alpha, self.cutmix_alpha, self.num_classes = mixup_alpha, cutmix_alpha, num_classes

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int):
        """(mixed images, soft targets as class probabilities) for CrossEntropyLoss, which smooths them as it
        smooths hard labels."""
        rng = np.random.default_rng(seed)
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < 0.5)
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        partner = images.flip(0)
        if cutmix:
            images, lam = paste_box(images, partner, lam, rng)
        else:
            images = images.lerp(partner, 1 - lam)
        # scatter_, not F.one_hot, which on the CPU reads the labels' range back to check it.
        one_hot = torch.zeros(len(labels), self.num_classes, device=labels.device)
        one_hot.scatter_(1, labels.unsqueeze(1), 1.0)
        return images, one_hot.lerp(one_hot.flip(0), 1 - lam)


def paste_box(images: torch.Tensor, partner: torch.Tensor, lam: float, rng: np.random.Generator):
    """CutMix's box (the reference's rand_bbox: sides sqrt(1 - lam) of the image's, a uniform centre, clipped at
    the border) filled from `partner`; returns the images and the fraction of the area they keep."""
    height, width = images.shape[-2:]
    cut = np.sqrt(1 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    images = images.clone()
    images[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
    return images, 1 - float((y1 - y0) * (x1 - x0)) / (height * width)
