"""The training layer: the Accelerator, precision and FLOPs, the parts of a training loop
(``sampler``, ``optim``, ``schedule``, ``step``, ``validate``, ``checkpoint``) and the pretrain and
finetune stages, each an orchestration of those parts."""
