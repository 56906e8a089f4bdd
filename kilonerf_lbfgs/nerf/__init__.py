"""NeRF on the cell-grid engine, cut by concept: ``data`` (posed images, rays, the generated
demo scene), ``render`` (occupancy grid, marching, volume rendering), ``fields`` (the KiloNeRF
field and the teachers), ``train`` (photometric training, distillation, the pipeline), and
``evaluate`` / ``cli`` on top.

Kept import-light: import the submodules you need, e.g.
``from kilonerf_lbfgs.nerf.data.loaders import load_dataset``.
"""
