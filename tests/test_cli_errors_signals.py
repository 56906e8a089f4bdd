"""Bad input to the audio, video and shape scripts: one line `error: ...`, non-zero exit."""
import os

import numpy as np
import pytest
import soundfile as sf

from conftest import SHARED_DATA
from test_cli_errors import _one_line_error


def test_audio_missing_file(script, tmp_path):
    _one_line_error(script("fit_audio.py", "--audio", tmp_path / "no.wav"), "--audio", "no.wav")


def test_audio_no_samples_and_unreadable(script, tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 8000)
    _one_line_error(script("fit_audio.py", "--audio", tmp_path / "empty.wav"),
                    "empty.wav", "no samples")
    (tmp_path / "junk.mp3").write_bytes(b"not audio at all")
    _one_line_error(script("fit_audio.py", "--audio", tmp_path / "junk.mp3"), "unsupported")
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    _one_line_error(script("fit_audio.py", "--audio", tmp_path / "junk.wav"), "junk.wav")


def test_video_missing_unsupported_and_zero_frames(script, tmp_path):
    _one_line_error(script("fit_video.py", "--video", tmp_path / "no.mp4"), "--video", "no.mp4")
    (tmp_path / "clip.txt").write_text("x")
    _one_line_error(script("fit_video.py", "--video", tmp_path / "clip.txt"), "unsupported")
    os.makedirs(tmp_path / "frames")
    _one_line_error(script("fit_video.py", "--video", tmp_path / "frames"), "no frames")


def test_mesh_missing_unsupported_empty_and_open(script, tmp_path):
    _one_line_error(script("fit_shape.py", "--mesh", tmp_path / "no.obj"), "--mesh", "no.obj")
    (tmp_path / "m.xyz").write_text("0 0 0\n")
    _one_line_error(script("fit_shape.py", "--mesh", tmp_path / "m.xyz"), "unsupported")
    (tmp_path / "empty.obj").write_text("# nothing\nv 0 0 0\nv 1 0 0\n")
    _one_line_error(script("fit_shape.py", "--mesh", tmp_path / "empty.obj"), "empty.obj")
    # a wavy open sheet (5x5 vertices, a boundary hole too big to fill): encloses nothing
    g = np.arange(5)
    verts = [f"v {i} {j} {np.sin(i) * np.cos(j):.3f}" for i in g for j in g]
    faces = [f"f {a + 1} {a + 2} {a + 7}\nf {a + 1} {a + 7} {a + 6}"
             for a in (i * 5 + j for i in range(4) for j in range(4))]
    (tmp_path / "sheet.obj").write_text("\n".join(verts + faces) + "\n")
    _one_line_error(script("fit_shape.py", "--mesh", tmp_path / "sheet.obj"), "sheet.obj",
                    "volume")


@pytest.mark.realdata
def test_benchmark_missing_real_file_is_one_line(script, tmp_path):
    _one_line_error(script("benchmark_optimizers.py", "--modality", "shape", "--mesh",
                           tmp_path / "gone.obj"), "--mesh", "gone.obj")
    assert os.path.isfile(os.path.join(SHARED_DATA, "meshes", "armadillo.obj"))


def test_missing_files_name_flag_and_file(script, tmp_path):
    """The library says which file is missing; the script adds the flag."""
    for name, flag, path in [("fit_audio.py", "--audio", tmp_path / "gone.flac"),
                             ("fit_video.py", "--video", tmp_path / "gone_frames"),
                             ("fit_shape.py", "--mesh", tmp_path / "gone.ply")]:
        _one_line_error(script(name, flag, path), flag, "gone", "no such")


def test_bad_values_name_the_flag(script):
    _one_line_error(script("fit_audio.py", "--samples_per_cell", "0"), "--samples_per_cell")
    _one_line_error(script("fit_audio.py", "--omega_0", "-5"), "--omega_0")
    _one_line_error(script("fit_video.py", "--grid", "99", "1", "1"), "--grid", "frames")
    _one_line_error(script("fit_shape.py", "--target", "volume"), "--target", "volume")


def test_benchmark_device_only_for_the_distillation_race(script):
    _one_line_error(script("benchmark_optimizers.py", "--modality", "audio", "--device", "cuda"),
                    "--device", "nerf_distill")
