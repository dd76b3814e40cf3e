"""bolaco: feature-space low-rank compression of causal LMs with a Bayesian-optimised rank allocation."""

__version__ = "0.1.0"
