# Copyright (c) mmtune contributors. All rights reserved.
"""mmengine / mmcv integration: hooks, config keys, the ConvModule path."""
