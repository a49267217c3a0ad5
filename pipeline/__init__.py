"""Out-of-core neural-network training on Dask.

Datasets live as chunked Zarr stores (:mod:`pipeline.store`), Dask workers stream their chunks
(:mod:`pipeline.loader`) and compute minibatch updates with Numba kernels (:mod:`kernels`), and a
parameter server inside the Dask scheduler (:mod:`pipeline.ps`) combines them.
"""

from __future__ import annotations

from pipeline.errors import PipelineError

__version__ = "0.1.0"
__all__ = ["PipelineError", "__version__"]
