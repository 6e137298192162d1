"""dyncompile inside other engines (each integration imports its engine lazily)."""
