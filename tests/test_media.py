"""Video/image I/O round trips on tiny clips: mp4, webm, gif, image folders, uniform sampling, bad input."""

import pytest
import torch

pytest.importorskip("av")

from idgrpo.media import read_image, read_video, uniform_indices, write_image, write_video  # noqa: E402


def _clip(t=6, h=16, w=24, seed=0):
    """Smooth frames (lossy codecs keep them close) whose mean brightness encodes the frame index."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, h // 4, w // 4, 3, generator=g)
    base = torch.nn.functional.interpolate(base.permute(0, 3, 1, 2), size=(h, w), mode="bilinear")
    base = base.permute(0, 2, 3, 1)  # (1, H, W, 3)
    ramp = torch.linspace(0, 1, t).view(t, 1, 1, 1)
    return ((0.3 * base + 0.7 * ramp) * 255).round().clamp(0, 255).to(torch.uint8)


def test_uniform_indices():
    assert uniform_indices(10, 5) == [0, 2, 4, 7, 9]
    assert uniform_indices(3, 1) == [0]
    assert uniform_indices(2, 4) == [0, 0, 1, 1]  # repeats when asking for more frames than exist
    with pytest.raises(ValueError):
        uniform_indices(0, 3)


@pytest.mark.parametrize("suffix,tol", [(".mp4", 12), (".webm", 12), (".gif", 40)])
def test_video_round_trip(tmp_path, suffix, tol):
    frames = _clip()
    path = write_video(tmp_path / f"clip{suffix}", frames, fps=8)
    back = read_video(path)
    assert back.dtype == torch.uint8 and back.shape == frames.shape
    err = (back.float() - frames.float()).abs().mean(dim=(1, 2, 3))
    assert err.max() < tol, err
    # the brightness ramp survives: frame order preserved
    assert torch.all(back.float().mean(dim=(1, 2, 3)).diff() > 0)
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])  # mp4 states its frame count (early stop), webm not
def test_uniform_sampling_picks_the_right_frames(tmp_path, suffix):
    frames = _clip(t=9)
    path = write_video(tmp_path / f"clip{suffix}", frames)
    picked = read_video(path, num_frames=3)
    full = read_video(path)
    assert picked.shape == (3, 16, 24, 3)
    torch.testing.assert_close(picked, full[[0, 4, 8]], rtol=0, atol=0)


def test_image_round_trip_and_folder(tmp_path):
    frames = _clip(t=5, h=17, w=23)  # odd sizes are fine for images
    for i, f in enumerate(frames):
        write_image(tmp_path / "seq" / f"{i:03d}.png", f)
    back = read_image(tmp_path / "seq" / "002.png")
    torch.testing.assert_close(back, frames[2], rtol=0, atol=0)  # png is lossless
    folder = read_video(tmp_path / "seq")
    torch.testing.assert_close(folder, frames, rtol=0, atol=0)
    torch.testing.assert_close(read_video(tmp_path / "seq", num_frames=2), frames[[0, 4]], rtol=0, atol=0)
    jpg = read_image(write_image(tmp_path / "a.jpg", frames[1]))
    assert jpg.shape == (17, 23, 3) and (jpg.float() - frames[1].float()).abs().mean() < 10


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="corrupt.mp4"):
        read_video(corrupt)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.mp4"):
        read_video(empty)
    bad_png = tmp_path / "bad.png"
    bad_png.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="bad.png"):
        read_image(bad_png)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        read_video(tmp_path / "nothing")
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "x.mp4", torch.zeros(2, 16, 16, 3))
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "x.mp4", torch.zeros(2, 15, 16, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="suffix"):
        write_video(tmp_path / "x.avi", torch.zeros(2, 16, 16, 3, dtype=torch.uint8))
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".gif"])
def test_encoder_input_is_the_single_threaded_conversion(tmp_path, suffix):
    """write_video hands the encoder frames already in the codec's pixel format, converted by a single-threaded
    reformat (so the encoder never converts), and the same frames written twice decode the same."""
    import av

    from idgrpo.media import VIDEO_CODECS, _codec_frame

    frames = _clip(t=4, h=16, w=32, seed=1)
    _, pix_fmt = VIDEO_CODECS[suffix]
    for frame in frames.numpy():
        made = _codec_frame(av, frame, pix_fmt)
        assert made.format.name == pix_fmt and (made.width, made.height) == (32, 16)
        want = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format=pix_fmt, threads=1).to_ndarray()
        assert (made.to_ndarray() == want).all()
    # (the bytes of a webm differ anyway: Matroska writes a random segment UID)
    first = read_video(write_video(tmp_path / f"a{suffix}", frames))
    assert torch.equal(first, read_video(write_video(tmp_path / f"b{suffix}", frames))), "same frames, other file"
