"""The training layer: the Accelerator, precision and FLOPs, and the pretrain and finetune
stages."""
