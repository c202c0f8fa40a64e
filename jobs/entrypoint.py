"""Ray job entrypoint: runs `citer train` on the cluster the job was submitted to.

    python jobs/entrypoint.py CONFIG [--run DIR] [KEY=VALUE ...]

`citer submit` makes this the job's entrypoint; a KubeRay RayJob or `ray job submit` can call it
directly. Inside a Ray job RAY_ADDRESS is set, so every stage runs on the cluster, not on an
embedded local Ray. The working directory (this repository) is on the path, so it runs without
citer being installed in the image.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("RAY_ADDRESS", "auto")
    sys.exit(main(["train", *sys.argv[1:]]))
