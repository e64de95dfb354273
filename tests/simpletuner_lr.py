"""Run by the trainer venv's Python: the LR SimpleTuner's get_lr_scheduler gives at
each step, for schedules read as JSON on stdin ({scheduler, warmup_steps, lr_end, power, lr, max_steps})."""

import json
import logging
import sys
import types

import torch

logging.disable(logging.CRITICAL)
from simpletuner.helpers.training.custom_schedule import get_lr_scheduler  # noqa: E402

results = []
for job in json.loads(sys.stdin.read()):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=job["lr"])
    args = types.SimpleNamespace(lr_scheduler=job["scheduler"], lr_warmup_steps=job["warmup_steps"],
                                 lr_end=job["lr_end"], lr_power=job["power"], max_train_steps=job["max_steps"],
                                 lr_num_cycles=1)
    accelerator = types.SimpleNamespace(num_processes=1)
    scheduler = get_lr_scheduler(args, optimizer, accelerator, logging.getLogger("x"), global_step=0)
    lrs = []
    for _ in range(job["max_steps"] + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    results.append(lrs)
print(json.dumps(results))
