# Copyright (c) mmtune contributors. All rights reserved.
"""Models that mmtune's benchmarks need and no installed package provides
(the engine layer: needs mmengine)."""

from .image_classifier import SimpleImageClassifier

__all__ = ['SimpleImageClassifier']
