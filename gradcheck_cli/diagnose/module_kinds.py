"""Module classes by what they do to the gradient, named as users write them: the one table every stage reads
(no torch needed). Each set is a different question, so they differ on purpose; the comments say why."""

PLAIN_RECURRENT = frozenset({"RNN", "RNNCell"})
GATED_RECURRENT = frozenset({"LSTM", "GRU", "LSTMCell", "GRUCell"})
RECURRENT = PLAIN_RECURRENT | GATED_RECURRENT

RELU_LIKE = frozenset(
    {"ReLU", "LeakyReLU", "PReLU", "RReLU", "ReLU6", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Hardswish"}
)
"""Piecewise-linear or nearly so for z > 0: Kaiming's scale fits them (the advice and the fixes' gain)."""
SATURATING = frozenset({"Sigmoid", "Tanh", "Hardtanh", "Hardsigmoid", "Softsign", "LogSigmoid", "Tanhshrink"})
"""Flat for large |z|: the vanishing story of the classic deep sigmoid/tanh stack."""
SIGMOID_LIKE = frozenset({"Sigmoid", "Hardsigmoid", "LogSigmoid"})
"""Saturating ones whose ``calculate_gain`` is sigmoid's (the other saturating ones are tanh's)."""
SWAPPABLE = frozenset({"Sigmoid", "Tanh", "Hardtanh", "Hardsigmoid", "Softsign"})
"""Saturating activation modules that the ``activation_change`` fix replaces by ``nn.ReLU``."""

SATURATION_MEASURED = frozenset({"Sigmoid", "Tanh", "Hardtanh", "Hardsigmoid"})
"""Activations whose saturated share the probe measures (a closed form for φ'(z) < 1 % of its peak)."""
DEAD_UNITS_MEASURED = frozenset({"ReLU", "ReLU6"})
"""Activations whose dead units (never positive over the batch) the probe counts."""
DERIVATIVE_MEASURED = SATURATION_MEASURED | DEAD_UNITS_MEASURED | frozenset({"LeakyReLU", "GELU", "SiLU", "ELU"})
"""Activations whose φ'(z) RMS the probe measures on its own forward pass."""

LEAKY_RELU_LIKE = frozenset({"LeakyReLU", "PReLU", "RReLU"})
"""Activations with a negative slope: the init gain is ``calculate_gain("leaky_relu", slope)`` of their own slope."""
INIT_GAIN_NAME = {
    "ReLU": "relu",
    "ReLU6": "relu",
    "Tanh": "tanh",
    "Hardtanh": "tanh",
    "Softsign": "tanh",
    "Sigmoid": "sigmoid",
    "Hardsigmoid": "sigmoid",
    "LogSigmoid": "sigmoid",
    "SELU": "selu",
    "GELU": "gelu",
    "SiLU": "silu",
    "Mish": "mish",
    "ELU": "elu",
    "CELU": "elu",
    "Hardswish": "hardswish",
    "Softplus": "softplus",
}
"""Every other activation class with the name of its init gain (``calculate_gain``'s, or a derived one): with
:data:`LEAKY_RELU_LIKE`, the activations whose scale a weight before them should match."""
