"""Run by the trainer venv's Python: SimpleTuner 4.10.1's own small-bucket pruning and its split across
processes (helpers/metadata/backends/base.py) for cases read as JSON on stdin:
[{bucket: images}, repeats, batch, processes, grad_accum, pruning, oversubscription], one per case.
Prints per case "aborts" (ValueError: zero usable batches) or {bucket: main-process samples per epoch}
(images on rank 0 x passes; a pruned bucket left out)."""

import argparse
import json
import logging
import sys
from types import SimpleNamespace

logging.disable(logging.CRITICAL)
from simpletuner.helpers.data_backend.dataset_types import DatasetType  # noqa: E402
from simpletuner.helpers.metadata.backends.base import MetadataBackend  # noqa: E402
from simpletuner.helpers.training.state_tracker import StateTracker  # noqa: E402


def fate(buckets, repeats, batch, processes, grad_accum, pruning, oversubscription):
    StateTracker.set_args(argparse.Namespace(disable_bucket_pruning=False, seed=42,
                                             allow_dataset_oversubscription=oversubscription))
    StateTracker.set_data_backend_config("concept", {"repeats": repeats})
    meta = SimpleNamespace(id="concept", dataset_type=DatasetType.IMAGE, repeats=repeats, batch_size=batch,
                           bucket_report=None, read_only=False,
                           accelerator=SimpleNamespace(num_processes=processes, process_index=0, is_main_process=True),
                           aspect_ratio_bucket_indices={k: [f"{k}/{i}.png" for i in range(n)] for k, n in buckets.items()})
    if pruning:  # _enforce_min_bucket_size, which runs only with minimum_image_size set
        for key in list(meta.aspect_ratio_bucket_indices):
            MetadataBackend._prune_small_buckets(meta, key)
    try:
        MetadataBackend.split_buckets_between_processes(meta, gradient_accumulation_steps=grad_accum,
                                                        apply_padding=False)
    except ValueError as exc:
        if "zero usable batches" in str(exc):
            return "aborts"
        raise
    # a padded bucket (oversubscription, repeats 0 only) carries its repeats as entries
    return {k: len(v) * (repeats + 1) for k, v in meta.aspect_ratio_bucket_indices.items()}


print(json.dumps([fate(*case) for case in json.loads(sys.stdin.read())]))
