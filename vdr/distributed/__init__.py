"""Multi-process training and evaluation: collectives with the right gradients, FSDP2 sharding, eval sharding."""
