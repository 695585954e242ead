# Turn on mmtune's tune mode for the Conv+eval-BN pairs of the whole model,
# with any codebase's own tools/train.py (mmdet, mmpretrain, mmseg, mmpose)
# or mmtune's: add this file to `_base_`.
#
# It adds mmtune's hook through `custom_hooks`. A config that sets its own
# `custom_hooks` replaces this list (mmengine does not merge lists): add
# dict(type='mmtune.FastConvBNEvalHook') to yours then. The hook reads the
# two keys below, so `--cfg-options fast_conv_bn_eval=False` turns it off
# and `fast_conv_bn_eval_modules=backbone` restricts it.
custom_imports = dict(imports=['mmtune'], allow_failed_imports=False)
custom_hooks = [dict(type='mmtune.FastConvBNEvalHook')]
fast_conv_bn_eval = True
# Restrict to submodules, e.g. ['backbone']; None covers the whole model.
fast_conv_bn_eval_modules = None
