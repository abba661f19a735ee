"""Privacy mechanics: clip-and-noise queries, accounting, Poisson sampling."""
