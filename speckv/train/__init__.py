"""Training the controller with PyTorch Lightning: the DataModule over step records, the
survival MLP and its LightningModule, checkpoints, and ``python -m speckv.train``."""
