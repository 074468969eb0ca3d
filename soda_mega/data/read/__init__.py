"""Reading datasets for training: opening, cache, order, steps, mixture, loader, inspect."""
