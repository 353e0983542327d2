"""escapelab: how networks escape a random-teacher initialization.

A frozen random teacher, a student initialized next to it, plain SGD at huge step
sizes, and the measurements of the paper "Escaping Random Teacher Initialization
Enhances Signal Propagation and Representation" (Sarnthein et al.).

The library's entry points::

    from escapelab.config import load_config
    from escapelab.train import train
    summary = train(load_config("digits", ["optim.lr=1e4"]), "runs/x")
"""

__version__ = "0.1.0"
