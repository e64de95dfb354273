"""Run by the trainer venv's Python: SimpleTuner's own minimum_image_size check for
(width, height, resolution, resolution_type, minimum, crop, crop_aspect) read as JSON on stdin;
prints whether each image is kept (true/false) or "error" when SimpleTuner refuses the setting."""

import argparse
import json
import logging
import sys
from types import SimpleNamespace

logging.disable(logging.CRITICAL)
from simpletuner.helpers.data_backend.dataset_types import DatasetType  # noqa: E402
from simpletuner.helpers.data_backend.factory import FactoryRegistry  # noqa: E402
from simpletuner.helpers.metadata.backends.base import MetadataBackend  # noqa: E402
from simpletuner.helpers.training.state_tracker import StateTracker  # noqa: E402


def kept(w, h, res, rtype, minimum, crop, crop_aspect):
    backend = {"id": "concept", "dataset_type": "image", "resolution": res, "resolution_type": rtype,
               "minimum_image_size": minimum, "crop": crop, "crop_aspect": crop_aspect}
    factory = SimpleNamespace(args=argparse.Namespace(resolution=res, resolution_type=rtype))
    FactoryRegistry._handle_resolution_conversion(factory, backend)
    StateTracker.set_data_backend_config("concept", backend)
    meta = SimpleNamespace(dataset_config=backend, dataset_type=DatasetType.IMAGE, id="concept",
                           minimum_image_size=backend["minimum_image_size"], resolution_type=backend["resolution_type"],
                           minimum_num_frames=None, maximum_num_frames=None)
    try:
        return bool(MetadataBackend.meets_resolution_requirements(meta, image_metadata={"original_size": (w, h)}))
    except ValueError:
        return "error"


print(json.dumps([kept(*case) for case in json.loads(sys.stdin.read())]))
