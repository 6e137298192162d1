"""``dyncompile::expert_route``: which experts each token runs under the budget in force."""
