# Turn on mmtune's tune mode for Conv+eval-BN pairs of the whole model.
# Add this file to `_base_`, or pass
# `--cfg-options fast_conv_bn_eval=True` to tools/train.py instead.
custom_imports = dict(imports=['mmtune'], allow_failed_imports=False)
fast_conv_bn_eval = True
# Restrict to submodules, e.g. ['backbone']; None covers the whole model.
fast_conv_bn_eval_modules = None
