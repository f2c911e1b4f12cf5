"""spectrum: the spectral dynamics of weights, from the checkpoints a training run leaves.

Singular values and top singular vectors of every weight matrix are computed once per
checkpoint and kept in a Zarr store; every metric is derived from that store. The science
follows Yunis et al., *Approaching Deep Learning through the Spectral Dynamics of Weights*
(arXiv 2408.11804, 2024).
"""

__version__ = "0.1.0"
