"""Tiny random PickScore, aesthetic-predictor, HPSv2.1 and DINO (ViT) models, and their reference scores,
for tests (trainer venv; nothing downloaded).

`tiny_preference.py build OUT`: OUT/pickscore (a CLIPModel, no processor files), OUT/clip-h (its processor),
OUT/aesthetic-clip (a CLIPModel + processor) and OUT/aesthetic.pth (the predictor's MLP head),
OUT/hps/HPS_v2.1_compressed.pt (an open_clip CLIP of ViT-H-14's architecture, small, with
open_clip_config.json beside it), OUT/vit-dino (a ViTModel saved without a pooler, as facebook/dino-vits16),
OUT/vit-broken (the same with an encoder weight removed).
`tiny_preference.py reference JOB.json OUT.json`: per cell, the scores as each model's own reference code
computes them (PickScore's README, improved-aesthetic-predictor's simple_inference.py, HPSv2's img_score.py,
DINO's CLS token), no sd3exp code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from tiny_clip import build as build_clip  # noqa: E402  (the tiny CLIP and its processor)

# ViT-H-14's open_clip architecture (embed 1024, 32 x 1280 vision, 24 x 1024 text), shrunk
HPS_CFG = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}


class MLP(torch.nn.Module):
    """improved-aesthetic-predictor's head, as in its simple_inference.py."""

    def __init__(self, input_size):
        super().__init__()
        self.input_size = input_size
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(self.input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def normalized(a, axis=-1, order=2):
    l2 = np.atleast_1d(np.linalg.norm(a, order, axis))
    l2[l2 == 0] = 1
    return a / np.expand_dims(l2, axis)


def build(out: Path) -> None:
    import open_clip
    from safetensors.torch import load_file, save_file
    from transformers import AutoProcessor, CLIPModel, ViTConfig, ViTImageProcessor, ViTModel

    build_clip(out / "base")
    torch.manual_seed(1)
    CLIPModel(CLIPModel.from_pretrained(out / "base" / "clip").config).save_pretrained(out / "pickscore")
    AutoProcessor.from_pretrained(out / "base" / "clip").save_pretrained(out / "clip-h")
    torch.manual_seed(2)
    CLIPModel(CLIPModel.from_pretrained(out / "base" / "clip").config).save_pretrained(out / "aesthetic-clip")
    AutoProcessor.from_pretrained(out / "base" / "clip").save_pretrained(out / "aesthetic-clip")
    torch.save(MLP(16).state_dict(), out / "aesthetic.pth")
    torch.manual_seed(3)
    (out / "hps").mkdir()
    torch.save({"state_dict": open_clip.CLIP(**HPS_CFG).state_dict()}, out / "hps" / "HPS_v2.1_compressed.pt")
    (out / "hps" / "open_clip_config.json").write_text(json.dumps({"model_cfg": HPS_CFG}))
    torch.manual_seed(4)
    vit = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=37)
    ViTModel(vit, add_pooling_layer=False).save_pretrained(out / "vit-dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out / "vit-dino")
    broken = out / "vit-broken"
    ViTModel(vit, add_pooling_layer=False).save_pretrained(broken)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(broken)
    weights = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layer.1.output.dense" not in k}, broken / "model.safetensors",
              metadata={"format": "pt"})


class ResizeMaxSize(torch.nn.Module):
    """HPSv2's preprocess_val resize (hpsv2/src/open_clip/transform.py): longest side to `max_size`, padded."""

    def __init__(self, max_size, fn="max", fill=0):
        import torchvision.transforms.functional as F
        from torchvision.transforms import InterpolationMode

        super().__init__()
        self.max_size, self.fn, self.fill, self.F = max_size, max if fn == "max" else min, fill, F
        self.interpolation = InterpolationMode.BICUBIC

    def forward(self, img):
        width, height = img.size
        scale = self.max_size / float(max(height, width))
        if scale != 1.0:
            new_size = tuple(round(dim * scale) for dim in (height, width))
            img = self.F.resize(img, new_size, self.interpolation)
            pad_h = self.max_size - new_size[0]
            pad_w = self.max_size - new_size[1]
            img = self.F.pad(img, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2],
                             fill=self.fill)
        return img


@torch.no_grad()
def reference(job: dict) -> dict:
    import open_clip
    import torchvision.transforms as T
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor, CLIPModel

    def rgb(path):
        return Image.open(path).convert("RGB")

    out = {str(c["id"]): {} for c in job["cells"]}
    if job.get("pickscore"):  # PickScore's README
        processor = AutoProcessor.from_pretrained(job["pickscore_processor"])
        model = CLIPModel.from_pretrained(job["pickscore"]).eval()
        for cell in job["cells"]:
            image_inputs = processor(images=[rgb(cell["image"])], padding=True, truncation=True, max_length=77,
                                     return_tensors="pt")
            text_inputs = processor(text=cell["prompt"], padding=True, truncation=True, max_length=77,
                                    return_tensors="pt")
            image_embs = model.get_image_features(**image_inputs)
            image_embs = getattr(image_embs, "pooler_output", image_embs)
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.get_text_features(**text_inputs)
            text_embs = getattr(text_embs, "pooler_output", text_embs)
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            scores = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
            out[str(cell["id"])]["pickscore"] = float(scores[0])
    if job.get("aesthetic"):  # improved-aesthetic-predictor's simple_inference.py, CLIP through transformers
        head = MLP(16)
        head.load_state_dict(torch.load(job["aesthetic"]))
        head.eval()
        clip = CLIPModel.from_pretrained(job["aesthetic_clip"]).eval()
        preprocess = AutoProcessor.from_pretrained(job["aesthetic_clip"])
        for cell in job["cells"]:
            image = preprocess(images=[rgb(cell["image"])], return_tensors="pt")["pixel_values"]
            image_features = clip.get_image_features(pixel_values=image)
            image_features = getattr(image_features, "pooler_output", image_features)
            im_emb_arr = normalized(image_features.cpu().detach().numpy())
            prediction = head(torch.from_numpy(im_emb_arr).type(torch.FloatTensor))
            out[str(cell["id"])]["aesthetic"] = float(prediction[0, 0])
    if job.get("hps"):  # HPSv2's img_score.py (its create_model_and_transforms: ResizeMaxSize preprocess_val)
        cfg = json.loads(Path(job["hps"]).with_name("open_clip_config.json").read_text())["model_cfg"]
        model = open_clip.CLIP(**cfg, output_dict=True)
        checkpoint = torch.load(job["hps"], map_location="cpu")
        model.load_state_dict(checkpoint["state_dict"])
        model.eval()
        preprocess_val = T.Compose([ResizeMaxSize(cfg["vision_cfg"]["image_size"]), T.ToTensor(),
                                    T.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)])
        tokenizer = open_clip.get_tokenizer("ViT-H-14")
        for cell in job["cells"]:
            image = preprocess_val(rgb(cell["image"])).unsqueeze(0)
            text = tokenizer([cell["prompt"]])
            outputs = model(image, text)
            image_features, text_features = outputs["image_features"], outputs["text_features"]
            logits_per_image = image_features @ text_features.T
            out[str(cell["id"])]["hps"] = 100.0 * float(torch.diagonal(logits_per_image)[0])
    if job.get("dino"):  # DINO's convention: the CLS token of the last layer (after its norm)
        dino, dproc = AutoModel.from_pretrained(job["dino"]).eval(), AutoImageProcessor.from_pretrained(job["dino"])

        def cls(path):
            x = dino(pixel_values=dproc(images=[rgb(path)], return_tensors="pt")["pixel_values"]).last_hidden_state[0, 0]
            return x / x.norm()

        for cell in job["cells"]:
            training = [t["path"] for cid in cell["concepts"] for t in job["training"][cid]]
            out[str(cell["id"])]["dino_i"] = float(np.mean([float(cls(cell["image"]) @ cls(t)) for t in training]))
            held = [t["path"] for cid in cell["concepts"] for t in job.get("holdout", {}).get(cid, [])]
            if held:
                out[str(cell["id"])]["holdout_dino"] = float(np.mean([float(cls(cell["image"]) @ cls(t)) for t in held]))
    return out


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]))
    else:
        Path(sys.argv[3]).write_text(json.dumps(reference(json.loads(Path(sys.argv[2]).read_text()))))
