"""lwpipe's Ray launcher for Hydra, found by Hydra's scan of the hydra_plugins namespace."""
