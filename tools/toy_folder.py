"""A tiny image folder to try --dataset folder:PATH on, and what the README's worked example
needs beside it:
    OUT/pets/train/<class>/*.jpg, OUT/pets/test/<class>/*.jpg   cat, dog, owl (12 and 4 images each)
    OUT/hard/<class>/*.jpg                                      dog and owl, 4 each: an outside meta set
    OUT/resnet18.pt                                             a torchvision ResNet-18 state_dict
The images are smooth colour patterns, one per class, plus noise, JPEG-encoded; the ResNet-18
weights are freshly initialised (they stand in for pretrained ones, which need a download).

    python -m tools.toy_folder runs/folder-demo
"""
import argparse
import os

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image


def write_folder(root, classes=("cat", "dog", "owl"), per_class=8, side=40, seed=0):
    """An image folder in torchvision's ImageFolder layout, root/<class>/<i>.jpg; returns root."""
    g = torch.Generator().manual_seed(seed)
    for name in classes:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        proto = F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=side, mode="bilinear")[0]
        for i in range(per_class):
            x = (proto + 0.1 * torch.randn(3, side, side, generator=g)).clamp(0, 1)
            Image.fromarray((x * 255).byte().permute(1, 2, 0).numpy()).save(os.path.join(root, name, f"{i}.jpg"))
    return root


def write_demo(out):
    """The pets tree, the outside meta set and the weights file under `out`."""
    classes = ("cat", "dog", "owl")
    write_folder(os.path.join(out, "pets", "train"), classes, 12, seed=0)
    write_folder(os.path.join(out, "pets", "test"), classes, 4, seed=1)
    write_folder(os.path.join(out, "hard"), classes[1:], 4, seed=2)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), os.path.join(out, "resnet18.pt"))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("out", help="folder to write into")
    write_demo(p.parse_args().out)
