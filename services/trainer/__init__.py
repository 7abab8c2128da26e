"""Trainer service: the training recipe (``recipe``); the gRPC jobs API comes with the trainer-service issue."""
