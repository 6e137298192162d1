"""``dyncompile::sparse_linear``: a linear layer that skips the weight rows of small inputs."""
