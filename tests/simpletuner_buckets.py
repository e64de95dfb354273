"""Run by the trainer venv's Python: SimpleTuner's own bucket rounding for a list of
(width, height, resolution, resolution_type) read as JSON on stdin."""

import argparse
import json
import logging
import sys
import tempfile

logging.disable(logging.CRITICAL)
from simpletuner.helpers.multiaspect.image import MultiaspectImage  # noqa: E402
from simpletuner.helpers.training.state_tracker import StateTracker  # noqa: E402

StateTracker.set_args(argparse.Namespace(aspect_bucket_alignment=64, aspect_bucket_rounding=None,
                                         output_dir=tempfile.mkdtemp()))
out = []
for w, h, res, rtype in json.loads(sys.stdin.read()):
    ar = MultiaspectImage.calculate_image_aspect_ratio((w, h))
    if rtype == "pixel":
        target, _, _ = MultiaspectImage.calculate_new_size_by_pixel_edge(ar, res, (w, h))
    else:
        megapixels = res * res / 1e6 if rtype == "pixel_area" else res
        target, _, _ = MultiaspectImage.calculate_new_size_by_pixel_area(ar, megapixels, (w, h))
    out.append(MultiaspectImage.calculate_image_aspect_ratio(tuple(target)))
print(json.dumps(out))
