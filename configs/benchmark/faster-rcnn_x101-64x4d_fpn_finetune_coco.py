# Faster R-CNN ResNeXt-101 64x4d FPN as fine-tuned from ImageNet weights in
# mmdet: the backbone's BN frozen (norm_eval=True, mmdet's default), 2
# images of 1333x800 per GPU. The benchmark configuration of
# tools/analysis_tools/benchmark_fast_conv_bn_eval.py: without COCO in
# data/coco the tool feeds synthetic batches of the train pipeline's scale.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_x101-64x4d_fpn_1x_coco.py'
custom_imports = dict(imports=['mmtune'], allow_failed_imports=False)

model = dict(backbone=dict(norm_eval=True, init_cfg=None))
train_dataloader = dict(batch_size=2)
