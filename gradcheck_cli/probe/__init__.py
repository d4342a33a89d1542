"""One forward and backward pass with hooks, and the numbers it reads: measure → probe, recorder, readout."""
