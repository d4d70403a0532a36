"""BLIP: Bayesian machine-learning interatomic potentials.

    import blip
    model = blip.load("model.pt")
    out = model.predict(list_of_atoms, samples=16, seed=0)
"""

__version__ = "0.1.0"


def load(path, device: str = "cpu"):
    """Load a model file -> :class:`blip.predictor.BlipModel`."""
    from .io import load as _load

    return _load(path, device=device)


def __getattr__(name):
    if name == "Calculator":
        from .calculator import BlipCalculator

        return BlipCalculator
    raise AttributeError(name)
