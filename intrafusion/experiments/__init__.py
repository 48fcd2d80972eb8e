"""The experiment side: the paper grid, its CSV results and plots, data sets, checkpoints, training."""
