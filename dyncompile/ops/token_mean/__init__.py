"""token_mean: the mean over the token dimension of a [rows, tokens, width] stream."""
