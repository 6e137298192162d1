"""``dyncompile::expert_ffn``: an FFN split into experts that computes only the selected ones."""
