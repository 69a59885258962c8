"""Training: the input file, sampling, the loss and its exact weight gradient, checkpoints, the learning curve and the loop."""
