"""Module classes by what they do to the gradient, named as users write them (no torch needed)."""

PLAIN_RECURRENT = frozenset({"RNN", "RNNCell"})
GATED_RECURRENT = frozenset({"LSTM", "GRU", "LSTMCell", "GRUCell"})
