"""Model families, one module each; importing a module registers its Task."""
