# Copyright (c) mmtune contributors. All rights reserved.
"""Datasets for the demos and tests (numpy + OpenCV only)."""

from .demo_coco import (
    DEMO_COCO_CLASSES,
    DEMO_DATA_ENV,
    default_demo_root,
    generate_demo_coco,
    prepare_demo_data,
)

__all__ = [
    'DEMO_COCO_CLASSES',
    'DEMO_DATA_ENV',
    'default_demo_root',
    'generate_demo_coco',
    'prepare_demo_data',
]
