"""Video and image I/O as uint8 tensors, on PyAV (a required dependency; its wheels bundle FFmpeg).

    frames = read_video("clip.mp4", num_frames=5)   # uint8 (5, H, W, 3), uniformly sampled
    frames = read_video("frames_dir/")              # a folder of images, sorted by file name
    image = read_image("ref.png")                   # uint8 (H, W, 3)
    write_video("out.mp4", frames, fps=16)          # .mp4 (H.264), .webm (VP9) or .gif by suffix
    write_image("out.png", image)                   # .png (lossless) or .jpg

Frames are (T, H, W, 3) RGB uint8, the layout decoders produce and the reward model consumes; each
decoded frame is copied once, straight into the preallocated output. Writes go to a temporary
file that is renamed at the end, so an interrupted write never leaves a truncated file behind.
Bad input raises FileNotFoundError (missing path) or ValueError naming the file and the problem
(corrupt, empty, wrong shape).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_CODECS = {".mp4": ("libx264", "yuv420p"), ".webm": ("libvpx-vp9", "yuv420p"), ".gif": ("gif", "rgb8")}


def _av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("video/image I/O needs PyAV, a dependency of idgrpo: pip install av") from e
    return av


def uniform_indices(total: int, num: int) -> list[int]:
    """`num` indices spread evenly over [0, total), first and last included; repeats when num > total."""
    if total < 1 or num < 1:
        raise ValueError(f"need total >= 1 and num >= 1, got total={total}, num={num}")
    return np.linspace(0, total - 1, num).round().astype(np.int64).tolist()


def _decode_frames(path: Path, num_frames: int | None = None) -> list:
    """Decoded frames (av.VideoFrame, still in the codec's pixel format) of the first video stream: all of
    them, or `num_frames` uniformly sampled ones. When the container states its frame count, decoding keeps
    only the sampled frames and stops after the last one; a count that turns out wrong falls back to a full
    decode."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            stated = stream.frames
            if num_frames is not None and stated > 0:
                wanted = uniform_indices(stated, num_frames)
                wanted_set, last, picked = set(wanted), wanted[-1], {}
                for i, frame in enumerate(container.decode(stream)):
                    if i in wanted_set:
                        picked[i] = frame
                    if i >= last:
                        break
                if len(picked) == len(wanted_set):
                    return [picked[i] for i in wanted]
        with av.open(str(path)) as container:
            frames = list(container.decode(video=0))
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot decode ({type(e).__name__}: {e})") from e
    if num_frames is not None and frames:
        frames = [frames[i] for i in uniform_indices(len(frames), num_frames)]
    return frames


def _stack_rgb(frames: list, path: Path) -> torch.Tensor:
    first = frames[0]
    out = torch.empty((len(frames), first.height, first.width, 3), dtype=torch.uint8)
    for i, frame in enumerate(frames):
        if (frame.height, frame.width) != (first.height, first.width):
            raise ValueError(
                f"{path}: frame {i} is {frame.height}x{frame.width}, frame 0 is {first.height}x{first.width}"
            )
        out[i] = torch.from_numpy(frame.to_ndarray(format="rgb24"))
    return out


def read_video(path: str | Path, num_frames: int | None = None) -> torch.Tensor:
    """uint8 (T, H, W, 3) frames of a video file (mp4, webm, gif, ...) or of a folder of images.

    With `num_frames`, that many frames are sampled uniformly (first and last included; frames repeat
    when the video is shorter); only the sampled frames are converted to RGB."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: video not found")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: folder has no image files ({', '.join(IMAGE_SUFFIXES)})")
        if num_frames is not None:
            files = [files[i] for i in uniform_indices(len(files), num_frames)]
        images = [read_image(f) for f in files]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) != 1:
            raise ValueError(f"{path}: images in the folder have different sizes {sorted(shapes)}")
        return torch.stack(images)
    frames = _decode_frames(path, num_frames)
    if not frames:
        raise ValueError(f"{path}: video has no decodable frames (empty or corrupt)")
    return _stack_rgb(frames, path)


def read_image(path: str | Path) -> torch.Tensor:
    """uint8 (H, W, 3) RGB image (png, jpg, webp, bmp; the first frame of anything PyAV decodes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    frames = _decode_frames(path)
    if not frames:
        raise ValueError(f"{path}: unreadable image (no decodable frame)")
    return _stack_rgb(frames[:1], path)[0]


def _check_frames(frames: torch.Tensor, what: str) -> np.ndarray:
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8:
        raise ValueError(f"{what}: expected a uint8 tensor, got {getattr(frames, 'dtype', type(frames))}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"{what}: expected frames (T>=1, H, W, 3), got {tuple(frames.shape)}")
    return frames.detach().cpu().contiguous().numpy()


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def write_video(path: str | Path, frames: torch.Tensor, fps: int = 16, *, crf: int = 18) -> Path:
    """Write uint8 (T, H, W, 3) frames to .mp4 (H.264, yuv420p: H and W must be even), .webm or .gif."""
    av = _av()
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_CODECS:
        raise ValueError(f"{path}: unsupported video suffix {suffix!r}; use one of {sorted(VIDEO_CODECS)}")
    array = _check_frames(frames, str(path))
    t, h, w, _ = array.shape
    codec, pix_fmt = VIDEO_CODECS[suffix]
    if pix_fmt == "yuv420p" and (h % 2 or w % 2):
        raise ValueError(f"{path}: {suffix} (yuv420p) needs even height and width, got {h}x{w}")
    tmp = _atomic_target(path)
    try:
        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
            if codec == "libx264":
                stream.options = {"crf": str(crf)}
            for i in range(t):
                for packet in stream.encode(_codec_frame(av, array[i], pix_fmt)):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _codec_frame(av, rgb: np.ndarray, pix_fmt: str):
    """An (H, W, 3) uint8 RGB frame as a new av.VideoFrame in the encoder's pixel format.

    The conversion is done here, on one thread, and its result copied into a fresh frame before the encoder
    sees it. Handing PyAV an rgb24 frame to convert inside `stream.encode` made the written file change from
    run to run on a busy machine far more often (5 of 150 round trips, against 1 of 600 this way; the rest is in
    the codec libraries: docs/architecture.md, "Determinism").
    """
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    if pix_fmt == "rgb24":
        return frame
    converted = frame.reformat(format=pix_fmt, threads=1).to_ndarray()
    return av.VideoFrame.from_ndarray(converted, format=pix_fmt)


def write_image(path: str | Path, image: torch.Tensor) -> Path:
    """Write a uint8 (H, W, 3) image as .png (lossless) or .jpg."""
    av = _av()
    path = Path(path)
    suffix = path.suffix.lower()
    codecs = {".png": ("png", "rgb24"), ".jpg": ("mjpeg", "yuvj444p"), ".jpeg": ("mjpeg", "yuvj444p")}
    if suffix not in codecs:
        raise ValueError(f"{path}: unsupported image suffix {suffix!r}; use one of {sorted(codecs)}")
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        raise ValueError(f"{path}: expected an image (H, W, 3), got {getattr(image, 'shape', type(image))}")
    array = _check_frames(image.unsqueeze(0), str(path))[0]
    codec, pix_fmt = codecs[suffix]
    tmp = _atomic_target(path)
    try:
        with av.open(str(tmp), mode="w", format="image2") as container:
            stream = container.add_stream(codec, rate=1)
            stream.width, stream.height, stream.pix_fmt = array.shape[1], array.shape[0], pix_fmt
            for packet in stream.encode(_codec_frame(av, array, pix_fmt)):
                container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
