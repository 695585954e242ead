# Mask R-CNN R101-FPN as fine-tuned from ImageNet weights in mmdet, 16
# images of 1333x800 per GPU in mixed precision (fp16): the backbone's BN
# frozen (norm_eval=True, mmdet's default). The benchmark configuration of
# tools/analysis_tools/benchmark_fast_conv_bn_eval.py, which takes the
# precision from its --amp flag (tools/analysis_tools/benchmark_workloads.py
# passes --amp fp16), not from optim_wrapper; the AmpOptimWrapper here is
# for tools/train.py. Without COCO in data/coco the tool feeds synthetic
# batches of the train pipeline's scale (with box masks).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r101_fpn_1x_coco.py'
custom_imports = dict(imports=['mmtune'], allow_failed_imports=False)

model = dict(backbone=dict(norm_eval=True, init_cfg=None))
train_dataloader = dict(batch_size=16)
optim_wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic')
