"""NeRF on the cell-grid engine: posed-image data, rays, a generated demo scene, and (in sibling
modules) occupancy grid, volume rendering, the KiloNeRF field and training.

Kept import-light: import the submodules you need, e.g. ``from kilonerf_lbfgs.nerf.data import
load_dataset``.
"""
