"""minidp: a readable NumPy + Numba Deep Potential (se_e2_a), cross-checked against deepmd-kit."""

__version__ = "0.1.0"


def __getattr__(name):
    # DeepPot pulls in the descriptor and Numba kernels: import it only when asked,
    # so that `import minidp.nn` stays light.
    if name == "DeepPot":
        from minidp.infer import DeepPot

        return DeepPot
    raise AttributeError(f"module 'minidp' has no attribute {name!r}")


__all__ = ["DeepPot", "__version__"]
