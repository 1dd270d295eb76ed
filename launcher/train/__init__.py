"""The training process: loop, optimizers, regularisers, checkpoints, reports."""
