"""`sd3exp doctor [experiment=... overrides]`: is this machine ready to run this experiment?

One line per check (the trainer, torch and CUDA, each GPU, free disk for the run, the Hugging Face
token, the model, ComfyUI when it renders, CLIP/DINO folders), each problem with its fix; exit 1
when something blocks the experiment. Nothing is written and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence

from sd3exp import hub
from sd3exp.errors import Sd3expError, human_bytes
from sd3exp.plan import Plan
from sd3exp.project import CONF_DIR
from sd3exp.schema import ExperimentConfig
from sd3exp.tinymodel import MARKER
from sd3exp.trainer_env import TrainerEnv, locate

if TYPE_CHECKING:
    from sd3exp.evaluate.comfyui.client import ComfyClient

TORCH_PROBE = """import json, torch
gpus = [{"name": torch.cuda.get_device_name(i), "memory": torch.cuda.get_device_properties(i).total_memory}
        for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus}))"""
MODEL_INPUT = re.compile(r"^(ckpt|unet|clip|vae|lora)_name\d*$")  # a loader's model file input
OPTIMIZER_COPIES = 3  # a full checkpoint: the weights and AdamW's two moments
LORA_SHARE = 0.05  # a LoRA checkpoint, as a share of the full model's (rough, until plan.json estimates it)


@dataclass(frozen=True)
class Check:
    """One line: ok | warn | FAIL (FAIL blocks the experiment), what was found, and the fix."""

    name: str
    status: str
    found: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:<4}  {self.name:<9} {self.found}" + (f"\n      fix: {self.fix}" if self.fix else "")


def trainer_check(cfg: ExperimentConfig) -> tuple[Check, Optional[TrainerEnv]]:
    t = cfg.trainer
    try:
        env = locate(t.simpletuner, t.version, t.home)
    except Sd3expError as err:
        return Check("trainer", "FAIL", "not found", str(err)), None
    return Check("trainer", "ok", f"SimpleTuner {env.version} ({env.kind}) at {env.root}"), env


def torch_probe(python: Path) -> dict:
    """torch's version, its CUDA and each GPU (name, bytes), asked of the trainer venv's python."""
    out = subprocess.run([str(python), "-c", TORCH_PROBE], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def nvidia_smi() -> List[str]:
    """'name, total MiB, free MiB' per GPU from nvidia-smi; [] without it."""
    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=60)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def is_tiny(cfg: ExperimentConfig) -> bool:
    """sd3exp's tiny SD3: trains and renders on a CPU."""
    return (Path(cfg.model.path) / MARKER).is_file()


def gpu_checks(cfg: ExperimentConfig, probe: dict) -> List[Check]:
    if "error" in probe:
        return [Check("torch", "FAIL", f"the trainer venv cannot import torch: {probe['error']}",
                      "reinstall the trainer: `sd3exp setup-trainer`")]
    cuda = f"CUDA {probe['cuda']}" if probe["cuda"] else "a CPU-only build (no CUDA)"
    checks = [Check("torch", "ok", f"torch {probe['torch']}, {cuda}")]
    smi = nvidia_smi()
    for i, gpu in enumerate(probe["gpus"]):
        memory = smi[i] if i < len(smi) else f"{gpu['name']}, {human_bytes(gpu['memory'])}"
        checks.append(Check(f"gpu {i}", "ok", memory))
    if not probe["gpus"]:
        needed = not is_tiny(cfg)
        checks.append(Check("gpu", "FAIL" if needed else "ok",
                            "no CUDA GPU visible to torch" + ("" if needed else " (the tiny demo model trains on the CPU)"),
                            "run on a machine with an NVIDIA GPU (nvidia-smi lists it) and a CUDA build of torch "
                            "in the trainer venv" if needed else ""))
    return checks


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def disk_check(cfg: ExperimentConfig, plan: Plan, model: hub.ModelState) -> Check:
    """Free space where the run folder goes against the kept checkpoints x one checkpoint's size."""
    where = Path(cfg.paths.output_root)
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    kept = len(plan.checkpoints_kept)
    transformer = Path(model.folder) / "transformer" if model.folder else None
    if transformer is None or not transformer.is_dir():
        return Check("disk", "ok", f"{human_bytes(free)} free at {where}; {kept} checkpoint(s) kept, their size "
                     "unknown until the model is on disk")
    size = folder_bytes(transformer) * (OPTIMIZER_COPIES if cfg.model.type == "full" else LORA_SHARE)
    need = int(size * kept)
    found = f"{human_bytes(free)} free at {where}; the run keeps {kept} checkpoint(s) of about {human_bytes(int(size))}"
    if free < need:
        return Check("disk", "FAIL", f"{found} = {human_bytes(need)}",
                     "free space there, point paths.output_root at a larger disk, or keep fewer checkpoints "
                     "(checkpointing.keep=2)")
    return Check("disk", "ok", f"{found} = {human_bytes(need)}")


def token_check() -> Check:
    source = hub.token_source()
    if source:
        return Check("token", "ok", f"a Hugging Face token was found in {source}")
    return Check("token", "warn", f"no Hugging Face token (HF_TOKEN unset, no {hub.token_path()})",
                 "gated models (stabilityai/*) need one: `hf auth login`, or export HF_TOKEN=<your token>")


def model_check(cfg: ExperimentConfig, env: Optional[TrainerEnv]) -> tuple[Check, hub.ModelState]:
    value = cfg.model.path
    if env is None and hub.is_repo_id(value):
        state = hub.ModelState(value, "unknown")
        return Check("model", "warn", f"{value}: not checked (no trainer venv to ask the hub cache)"), state
    state = hub.model_state(value, env.python if env else Path())  # a local folder needs no python
    if state.usable:
        return Check("model", "ok", f"{value}: {state.line()}"), state
    found = f"{value}: {state.line()}"
    if state.state == "no_network":
        found = f"{value}: not in the Hugging Face cache ({hub.hub_cache()}) and the hub cannot be reached ({state.detail})"
    elif state.state == "not_cached_offline":
        found = f"{value}: not in the Hugging Face cache ({hub.hub_cache()}); HF_HUB_OFFLINE is set"
    return Check("model", "FAIL", found, hub.model_fix(state)), state


def comfyui_check(cfg: ExperimentConfig) -> List[Check]:
    """The server, its version (/system_stats) and the workflow's model names in /object_info."""
    from sd3exp.evaluate.comfyui.client import ComfyClient

    ev = cfg.eval
    if not ev.url:
        return [Check("comfyui", "FAIL", "eval.backend=comfyui without eval.url", "add eval.url=http://127.0.0.1:8188")]
    client = ComfyClient(ev.url, retries=0, request_timeout_s=10)
    try:
        stats = client.get_json("/system_stats")
        version = stats.get("system", {}).get("comfyui_version", "unknown version")
        return [Check("comfyui", "ok", f"reachable at {ev.url}, ComfyUI {version}"), *model_name_checks(cfg, client)]
    except Sd3expError as err:
        return [Check("comfyui", "FAIL", str(err).split(". Is it")[0],
                      f"start ComfyUI (python main.py --listen) and check eval.url={ev.url}")]


def model_name_checks(cfg: ExperimentConfig, client: ComfyClient) -> List[Check]:
    """Each model file the workflow names (loader inputs such as unet_name, vae_name) among those ComfyUI
    lists; the loader sd3exp points at each checkpoint is left out."""
    from sd3exp.evaluate.comfyui.names import listed_names
    from sd3exp.evaluate.comfyui.workflow import LOADERS, load_workflow

    patched = LOADERS[cfg.model.type][:2]
    checks = []
    for node_id, node in sorted(load_workflow(cfg.eval.workflow).items()):
        for key, value in node.get("inputs", {}).items():
            if not (MODEL_INPUT.match(key) and isinstance(value, str)) or (node["class_type"], key) == patched:
                continue
            name = f"node {node_id} {node['class_type']}.{key}={value!r}"
            info = client.get_json(f"/object_info/{node['class_type']}")
            if not info:
                checks.append(Check("comfyui", "warn", f"{name}: ComfyUI does not describe {node['class_type']}",
                                    "install the custom node that provides it, if ComfyUI lacks it"))
                continue
            names = listed_names(info, node["class_type"], key)
            checks.append(Check("comfyui", "ok", f"{name} is installed") if value in names else
                          Check("comfyui", "FAIL", f"{name} is not among the {len(names)} ComfyUI lists",
                                f"put {value} into ComfyUI's models folder (or set that input with "
                                f"+eval.workflow_inputs.{node_id}.{key}=<a listed name>)"))
    return checks


def scoring_checks(cfg: ExperimentConfig) -> List[Check]:
    from sd3exp.evaluate.models import model_folder

    checks = []
    for key in ("clip", "dino"):
        value = getattr(cfg.eval.scoring, key)
        if value:
            try:
                checks.append(Check(key, "ok", f"eval.scoring.{key}: {model_folder(key, value)}"))
            except Sd3expError as err:
                checks.append(Check(key, "FAIL", f"eval.scoring.{key}={value!r}", str(err)))
    return checks


def diagnose(cfg: ExperimentConfig, plan: Plan) -> List[Check]:
    """Every check for this experiment, in the order a user fixes them."""
    trainer, env = trainer_check(cfg)
    checks = [trainer]
    if env is not None:
        checks += gpu_checks(cfg, torch_probe(env.python))
    model, state = model_check(cfg, env)
    checks += [disk_check(cfg, plan, state), token_check(), model]
    if cfg.eval.backend == "comfyui":
        checks += comfyui_check(cfg)
    return checks + scoring_checks(cfg)


def experiment(overrides: Sequence[str]) -> tuple[ExperimentConfig, Plan]:
    """The experiment and its plan as `sd3exp ... stage=compile` would make them (in a temporary run folder)."""
    from sd3exp.job import checked_plan, compose_job

    with tempfile.TemporaryDirectory(prefix="sd3exp-doctor-") as tmp:
        job = compose_job(CONF_DIR, list(overrides), Path(tmp) / "run")
        return job.cfg, checked_plan(job)


def doctor_main(argv: List[str], out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(prog="sd3exp doctor", description="Check this machine for an experiment: "
                                     "trainer, torch/CUDA, GPUs, disk, Hugging Face token and model, ComfyUI, "
                                     "CLIP/DINO. Exit status 1 when something blocks it.")
    parser.add_argument("overrides", nargs="*", help="experiment=NAME and other overrides, as for a run")
    args = parser.parse_args(argv)
    cfg, plan = experiment(args.overrides)
    checks = diagnose(cfg, plan)
    for check in checks:
        out(check.line())
    blocking = [c.name for c in checks if c.status == "FAIL"]
    out(f"doctor: {cfg.name}: " + (f"{len(blocking)} problem(s) block this experiment ({', '.join(blocking)})"
                                   if blocking else f"ready ({len(checks)} checks)"))
    return 1 if blocking else 0
