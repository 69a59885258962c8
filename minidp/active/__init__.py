"""Active-learning tools: ensembles and model deviation, neighbour statistics, bias changes, streamed labelling."""
