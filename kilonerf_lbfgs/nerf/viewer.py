"""A live web viewer: the cells rendered at the browser's camera, while training or afterwards.

viser (PyPI) serves the page, a three.js client, and reports every browser's camera. This
module turns that camera into a pose and intrinsics, renders the field with
:func:`~kilonerf_lbfgs.nerf.evaluate.render_view` (the function that renders the test views)
and sends the image back as the scene's background. While the camera moves the view is
rendered at ``moving_resolution`` rows, once it rests at ``resolution``. The panel shows the
training progress and toggles the cell grid (line segments) and the occupancy grid (a point
per occupied voxel).

Training and rendering share the field, so they take turns: the training loop holds
:attr:`NerfViewer.lock` for each step (outside its clock) and the render thread holds it for
each frame. With no browser connected the render thread sleeps and the lock is never
contended, so training runs at its own speed.

Conventions: viser's camera is OpenCV-like (``+z`` forward, ``+y`` down) and ``wxyz`` rotates
camera to world; the rays here are OpenGL/Blender-like (``-z`` forward, ``+y`` up), so
:func:`pose_from_viser` flips the camera's y and z axes.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import replace
from typing import Optional, Sequence

import numpy as np
import torch

from ..io import to_uint8
from .evaluate import render_view
from .render.rendering import RenderSettings


def quaternion_matrix(wxyz: Sequence[float]) -> np.ndarray:
    """``[3, 3]`` rotation of the unit quaternion ``(w, x, y, z)`` (normalised here)."""
    w, x, y, z = np.asarray(wxyz, dtype=np.float64) / np.linalg.norm(wxyz)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def pose_from_viser(wxyz: Sequence[float], position: Sequence[float]) -> torch.Tensor:
    """``[4, 4]`` float32 camera-to-world pose (OpenGL: looks down ``-z``, ``+y`` up) of a
    viser camera (OpenCV: looks down ``+z``, ``+y`` down; ``wxyz`` camera to world).

    Example::

        pose_from_viser((1, 0, 0, 0), (0, 0, 3))[:3, 2]   # tensor([0., 0., -1.]): the
        # OpenCV camera looked down +z, so the OpenGL camera's +z (backwards) is -z
    """
    pose = np.eye(4)
    pose[:3, :3] = quaternion_matrix(wxyz) @ np.diag([1.0, -1.0, -1.0])
    pose[:3, 3] = np.asarray(position, dtype=np.float64)
    return torch.as_tensor(pose, dtype=torch.float32)


def fov_intrinsics(fov_y: float, W: int, H: int) -> torch.Tensor:
    """``[4]`` ``(fx, fy, cx, cy)`` in pixels of a pinhole camera with vertical field of
    view ``fov_y`` (radians), square pixels, centred principal point."""
    if not 0.0 < fov_y < math.pi:
        raise ValueError(f"fov_y must be in (0, pi) radians, got {fov_y}")
    f = 0.5 * H / math.tan(0.5 * fov_y)
    return torch.tensor([f, f, 0.5 * W, 0.5 * H], dtype=torch.float32)


def cell_grid_segments(aabb: Sequence[float], resolution) -> np.ndarray:
    """``[N, 2, 3]`` float32 line segments: the edges of a grid of ``resolution`` cells per
    axis (an int or 3 ints) over the box ``aabb [6]``, each lattice line once."""
    res = [int(resolution)] * 3 if np.isscalar(resolution) else [int(r) for r in resolution]
    lo, hi = np.asarray(aabb[:3], np.float64), np.asarray(aabb[3:], np.float64)
    ticks = [np.linspace(lo[i], hi[i], res[i] + 1) for i in range(3)]
    segs = []
    for axis in range(3):
        a, b = [i for i in range(3) if i != axis]
        ua, ub = np.meshgrid(ticks[a], ticks[b], indexing="ij")
        start = np.zeros(ua.shape + (3,))
        start[..., a], start[..., b], start[..., axis] = ua, ub, lo[axis]
        end = start.copy()
        end[..., axis] = hi[axis]
        segs.append(np.stack([start, end], -2).reshape(-1, 2, 3))
    return np.concatenate(segs).astype(np.float32)


def occupied_voxel_centres(grid) -> np.ndarray:
    """``[M, 3]`` float32 centres of the occupied voxels of an :class:`OccupancyGrid`."""
    ijk = torch.nonzero(grid.binary.detach().cpu()).double()
    lo = grid.aabb[:3].detach().cpu().double()
    size = (grid.aabb[3:] - grid.aabb[:3]).detach().cpu().double() / torch.tensor(
        grid.resolution, dtype=torch.float64)
    return (lo + (ijk + 0.5) * size).float().numpy()


class NerfViewer:
    """A viser server that renders ``field`` at every connected browser's camera.

    Args:
        aabb: the scene box ``[6]`` (initial camera, grid overlay).
        rs: the render settings of the field (step size, background); near and far are
            widened so the camera may go anywhere.
        grid_res: cells per axis of the cell grid overlay (None: no toggle).
        host, port: where to serve (default: this machine only).
        resolution, moving_resolution: image rows at rest and while the camera moves.

    Call :meth:`set_field` with the model and marcher to show, :meth:`update` with the
    training progress, :meth:`close` at the end.
    """

    def __init__(self, aabb: Sequence[float], rs: RenderSettings, grid_res=None,
                 host: str = "127.0.0.1", port: int = 8080, resolution: int = 256,
                 moving_resolution: int = 96, chunk: int = 16384):
        import viser                      # optional dependency: imported only when used

        if resolution < 8 or moving_resolution < 8:
            raise ValueError(f"resolution and moving_resolution must be >= 8, got "
                             f"{resolution} and {moving_resolution}")
        self.aabb = [float(v) for v in aabb]
        self.rs = replace(rs, near=1e-3, far=1e4)     # the marcher clips rays to the box
        self.resolution, self.moving_resolution, self.chunk = resolution, moving_resolution, chunk
        self.lock = threading.RLock()
        self.frames_sent = 0
        self._model = self._marcher = None
        self._version = 0                  # bumps when the shown field changes
        self._last_bump = -math.inf
        self._clients = {}                 # client id -> [camera moved at, version shown, rows]
        self._stop = threading.Event()

        self.server = viser.ViserServer(host=host, port=port, verbose=False)
        self.server.scene.set_up_direction("+z")
        centre = [0.5 * (a + b) for a, b in zip(self.aabb[:3], self.aabb[3:])]
        extent = max(b - a for a, b in zip(self.aabb[:3], self.aabb[3:]))
        self.server.initial_camera.position = (centre[0] + 1.6 * extent,
                                               centre[1] - 1.6 * extent,
                                               centre[2] + 1.0 * extent)
        self.server.initial_camera.look_at = tuple(centre)
        gui = self.server.gui
        self._status = gui.add_markdown("waiting for the field")
        self._rows = gui.add_slider("resolution", 32, 1024, 16, resolution)
        self._grid_box = gui.add_checkbox("cell grid", False) if grid_res is not None else None
        self._occ_box = gui.add_checkbox("occupancy grid", False)
        self._grid_handle = self._occ_handle = None
        if grid_res is not None:
            self._grid_handle = self.server.scene.add_line_segments(
                "/cell_grid", cell_grid_segments(self.aabb, grid_res), (90, 90, 90),
                thickness=1.0, thickness_units="screen", visible=False)
            self._grid_box.on_update(lambda _: self._toggle(self._grid_handle, self._grid_box))
        self._occ_box.on_update(lambda _: self._show_occupancy())
        self._rows.on_update(lambda _: self._bump(force=True))
        self.server.on_client_connect(self._on_connect)
        self.server.on_client_disconnect(lambda c: self._clients.pop(c.client_id, None))
        self._thread = threading.Thread(target=self._loop, name="nerf-viewer", daemon=True)
        self._thread.start()

    @property
    def status(self) -> str:
        """The panel's progress text (markdown)."""
        return self._status.content

    @property
    def url(self) -> str:
        return f"http://{self.server.get_host()}:{self.server.get_port()}"

    # ------------------------------------------------------------------ the trainer's side
    def set_field(self, model: torch.nn.Module, marcher) -> None:
        """Show ``model`` (any field :func:`render_view` renders) marched with ``marcher``."""
        with self.lock:
            self._model, self._marcher = model, marcher
        self._bump(force=True)
        if self._occ_box.value:
            self._show_occupancy()

    def update(self, text: str, refresh_every: float = 1.0) -> None:
        """Progress text for the panel (markdown); the views are re-rendered at most every
        ``refresh_every`` seconds to show the trained field."""
        self._status.content = text
        self._bump(min_interval=refresh_every)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.server.stop()

    # ------------------------------------------------------------------ internals
    def _bump(self, force: bool = False, min_interval: float = 0.0) -> None:
        now = time.monotonic()
        if force or now - self._last_bump >= min_interval:
            self._version += 1
            self._last_bump = now

    def _toggle(self, handle, box) -> None:
        handle.visible = bool(box.value)

    def _show_occupancy(self) -> None:
        if self._occ_handle is not None:
            self._occ_handle.remove()
            self._occ_handle = None
        if self._occ_box.value and self._marcher is not None:
            with self.lock:
                pts = occupied_voxel_centres(self._marcher.grid)
            size = min(b - a for a, b in zip(self.aabb[:3], self.aabb[3:])) / max(
                self._marcher.grid.resolution)
            self._occ_handle = self.server.scene.add_point_cloud(
                "/occupancy", pts, (255, 120, 0), point_size=0.5 * size)

    def _on_connect(self, client) -> None:
        state = [time.monotonic(), -1, 0]
        self._clients[client.client_id] = state

        def moved(_):
            state[0] = time.monotonic()
        client.camera.on_update(moved)

    def render(self, camera, rows: int) -> Optional[np.ndarray]:
        """``[rows, cols, 3]`` uint8 view of the field at a viser camera, or None when
        there is no field yet."""
        cols = max(8, int(round(rows * float(camera.aspect))))
        pose = pose_from_viser(camera.wxyz, camera.position)
        K = fov_intrinsics(float(camera.fov), cols, rows)
        with self.lock, torch.no_grad():
            if self._model is None:
                return None
            img = render_view(self._model, self._marcher, pose, K, rows, cols, self.rs,
                              self.chunk)
        return to_uint8(img.cpu().numpy())

    def _loop(self) -> None:
        while not self._stop.is_set():
            busy = False
            for client in list(self.server.get_clients().values()):
                state = self._clients.get(client.client_id)
                if state is None:
                    continue
                moving = time.monotonic() - state[0] < 0.25
                rows = self.moving_resolution if moving else int(self._rows.value)
                if state[1] == self._version and state[2] == rows and not moving:
                    continue
                version = self._version
                try:
                    img = self.render(client.camera, rows)
                    if img is None:
                        continue
                    client.scene.set_background_image(img, format="jpeg", jpeg_quality=85)
                except Exception:          # a client that left while we rendered
                    continue
                state[1], state[2] = version, rows
                self.frames_sent += 1
                busy = True
            if not busy:
                self._stop.wait(0.03)


def progress_text(stage: str, step: int, seconds: float, psnr: float) -> str:
    """The panel's markdown for a training step."""
    return (f"**{stage}**  \nstep {step}, {seconds:.0f} s of training  \n"
            f"train-batch PSNR {psnr:.2f} dB")
