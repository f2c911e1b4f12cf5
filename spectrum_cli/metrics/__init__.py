"""The paper's metrics, as pure numpy functions of stored singular values and vectors.

One module holds each family, following Yunis et al., *Approaching Deep Learning through the
Spectral Dynamics of Weights* (arXiv 2408.11804, 2024):

- :mod:`~spectrum_cli.metrics.rank`: effective rank (Roy & Vetterli), stable rank, norms;
- :mod:`~spectrum_cli.metrics.agreement`: singular-vector agreement between two matrices;
- :mod:`~spectrum_cli.metrics.alignment`: alignment of consecutive layers.

Nothing here reads a store or a checkpoint; :mod:`spectrum_cli.dynamics` does that.
"""
