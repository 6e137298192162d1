"""Graph side: everything that reads or edits an fx.Graph."""
