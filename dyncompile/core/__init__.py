"""What every layer above shares: the config, the budget state, call stats, typed
options and the form registry. Imports nothing else of dyncompile but ``ops``."""
