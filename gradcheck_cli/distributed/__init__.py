"""gradcheck inside torch.distributed: what is reduced how, and the torchrun launch."""
