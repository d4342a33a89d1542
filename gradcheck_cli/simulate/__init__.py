"""``gradcheck simulate``: vanishing and exploding gradients from first principles.

Modules: ``report`` (the frozen result, no torch), ``chain`` (the product of per-layer factors, no
torch), ``meanfield`` (theory, numpy), ``network`` (Monte Carlo on real random torch networks),
``compare`` (remedies side by side), ``logistic`` (the iterated map), ``rnn`` (backpropagation
through time).
"""
