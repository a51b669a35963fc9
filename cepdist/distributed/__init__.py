"""The Ray layer: data-parallel stages (Ray Train), the evaluation actor pool, staged Tune sweeps.
The QGPO stage functions it wraps know nothing of Ray."""
