# Copyright (c) mmtune contributors. All rights reserved.
"""A minimal image classifier: backbone, global average pool, linear head.

It stands in for mmpretrain's ``ImageClassifier`` (not a dependency of
mmtune) in the ResNet-50 fine-tuning benchmark
(``configs/benchmark/resnet50_8xb64_finetune-cls-224.py``).
"""

from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from mmengine.model import BaseModel
from torch import Tensor, nn

from mmtune.registry import MODELS

Labels = Union[None, Tensor, Sequence[int]]


@MODELS.register_module()
class SimpleImageClassifier(BaseModel):
    """Backbone -> global average pool -> linear layer -> cross-entropy.

    Labels are plain: ``data_samples`` is a ``LongTensor`` of shape ``(N,)``
    or a list of ``N`` ints (no data-sample classes), which is what
    ``mmengine.ImgDataPreprocessor`` passes through unchanged.

    Args:
        backbone (dict): Config of the backbone, built from mmtune's
            ``MODELS`` registry; give another scope's type with its prefix,
            e.g. ``dict(type='mmdet.ResNet', depth=50, out_indices=(3, ))``.
            It returns a tensor or a tuple of tensors, of which the last is
            classified.
        num_classes (int): Number of classes.
        in_channels (int): Channels of the backbone's last output.
            Defaults to 2048 (ResNet-50).
        data_preprocessor (dict, optional): Config of the data preprocessor,
            e.g. ``dict(type='mmengine.ImgDataPreprocessor', mean=...,
            std=...)``. Defaults to None (mmengine's
            ``BaseDataPreprocessor``).
        init_cfg (dict, optional): Weight initialisation config.
            Defaults to None.
    """

    def __init__(
        self,
        backbone: dict,
        num_classes: int,
        in_channels: int = 2048,
        data_preprocessor: Optional[dict] = None,
        init_cfg: Optional[dict] = None,
    ):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f'num_classes must be a positive int, got {num_classes!r}'
            )
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(
                f'in_channels must be a positive int, got {in_channels!r}'
            )
        super().__init__(
            data_preprocessor=data_preprocessor, init_cfg=init_cfg
        )
        self.num_classes = num_classes
        self.backbone = MODELS.build(backbone)
        self.head = nn.Linear(in_channels, num_classes)

    def extract_feat(self, inputs: Tensor) -> Tensor:
        """Pooled features of the backbone's last output, ``(N, C)``."""
        feats = self.backbone(inputs)
        if isinstance(feats, (list, tuple)):
            feats = feats[-1]
        return torch.flatten(F.adaptive_avg_pool2d(feats, 1), 1)

    def forward(
        self,
        inputs: Tensor,
        data_samples: Labels = None,
        mode: str = 'tensor',
    ) -> Union[Tensor, Dict[str, Tensor], List[dict]]:
        """Run in one of mmengine's three modes.

        Args:
            inputs (Tensor): Normalised images, ``(N, C, H, W)``.
            data_samples (Tensor | Sequence[int], optional): Labels, needed
                for ``mode='loss'``. Defaults to None.
            mode (str): ``'tensor'`` returns the logits ``(N,
                num_classes)``; ``'loss'`` a dict with the cross-entropy
                ``loss``; ``'predict'`` one dict per image with
                ``pred_score`` (softmax) and ``pred_label``.
                Defaults to ``'tensor'``.
        """
        if mode == 'tensor':
            return self.head(self.extract_feat(inputs))
        if mode == 'loss':
            return self.loss(inputs, data_samples)
        if mode == 'predict':
            return self.predict(inputs)
        raise ValueError(
            f"mode must be 'tensor', 'loss' or 'predict', got {mode!r}"
        )

    def loss(self, inputs: Tensor, data_samples: Labels) -> Dict[str, Tensor]:
        """The cross-entropy of the logits against the labels."""
        if data_samples is None:
            raise ValueError("mode='loss' needs labels in data_samples")
        logits = self.head(self.extract_feat(inputs))
        labels = torch.as_tensor(
            data_samples, dtype=torch.long, device=logits.device
        )
        return dict(loss=F.cross_entropy(logits, labels))

    def predict(self, inputs: Tensor) -> List[dict]:
        """Softmax scores and the top-1 label of each image."""
        scores = self.head(self.extract_feat(inputs)).softmax(dim=1)
        return [
            dict(pred_score=score, pred_label=score.argmax())
            for score in scores
        ]
