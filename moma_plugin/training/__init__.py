"""The pretraining job (``moma-pretrain``): flags, training loop, checkpoints, metrics."""
