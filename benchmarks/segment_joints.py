"""Segment joints on Ray: flicker across the cuts, against the same frames dreamed in one stream.

    python benchmarks/segment_joints.py [--frames 30] [--segments 3] [--warmup 12] [--workers 2]

Workload: a pan across examples/chelsea.jpg (a 192x128 window moving 3 pixels a frame to the
right over the photo scaled to its width, 12 fps, no audio), dreamed at full size with ``--layers block8`` and the classic
settings otherwise. Three renders, each a ``jaxdream video`` command in a fresh process:

* ``sequential``: one segment (every frame carries the previous one's detail);
* ``in-process``: ``--segments N --warmup K``, the segments side by side in one process;
* ``ray``: the same with ``--ray --workers W`` (a private local Ray instance).

Reported per render: wall seconds and the flicker metric across the joints of the N-segment
plan and elsewhere (for ``sequential`` the same frame pairs, which are no joints there), then
joint by joint, and whether the Ray frames equal the in-process ones. A segment whose warm-up
reaches back to frame 0 dreams the one-stream frames, so its joint costs nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def pan_clip(path: Path, frames: int, width: int = 192, height: int = 128, speed: int = 3) -> None:
    from PIL import Image

    from motion_clips import write_clip

    photo = Image.open(ROOT / "examples" / "chelsea.jpg").convert("RGB")
    scale = (width + speed * frames) / photo.width  # the window pans across the whole photo
    wide = np.asarray(photo.resize((width + speed * frames, round(photo.height * scale))))
    top = (wide.shape[0] - height) // 2
    write_clip(path, [np.ascontiguousarray(wide[top:top + height, speed * t:speed * t + width])
                      for t in range(frames)], fps=12, audio=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--segments", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from jaxdream.images import load_rgb
    from jaxdream.motion import video as vid
    from jaxdream.motion.videoio import probe_video

    tmp = Path(tempfile.mkdtemp(prefix="jdjoints", dir="/tmp"))
    clip = tmp / "pan.mp4"
    pan_clip(clip, args.frames)
    common = ["--layers", "block8", "--max-side", "0", "-q"]
    split = ["--segments", str(args.segments), "--warmup", str(args.warmup)]
    runs = {"sequential": [], "in-process": split,
            "ray": [*split, "--ray", "--workers", str(args.workers)]}
    env = {**os.environ, "RAY_TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
    info = probe_video(clip)
    segments = vid.plan_segments(info.frames, args.segments, args.warmup)
    for name, options in runs.items():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jaxdream.cli", "video", str(clip), "-o",
                        str(tmp / name), *common, *options], check=True, env=env)
        seconds = time.perf_counter() - start
        joints, elsewhere = vid.joint_flicker(info, tmp / name, segments)
        each = [vid.joint_flicker(info, tmp / name, [s])[0] for s in segments if s.first]
        print(f"{name:11s} {seconds:6.1f} s  flicker at the joints {joints:.2f}, elsewhere "
              f"{elsewhere:.2f} ({joints / elsewhere:.2f}x); per joint "
              f"{', '.join(f'{value:.2f}' for value in each)}", flush=True)
    same = all(np.array_equal(load_rgb(tmp / "ray" / p.name), load_rgb(p))
               for p in sorted((tmp / "in-process").glob("frame_*.png")))
    print(f"ray frames equal the in-process frames: {same}; clip {info.describe()}, "
          f"segments {[(s.warm, s.first, s.end) for s in segments]}")


if __name__ == "__main__":
    main()
