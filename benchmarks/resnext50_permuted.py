"""A full-width ResNeXt-50 (32x4d) with random weights and BatchNorm statistics, fused with a copy
of itself whose every neuron space is permuted (``neurofuse.testing.permute_spaces``: the grouped
convolutions' spaces in their groups, the residual streams, the inner spaces), on random 3x32x32
inputs, one thread.  The model is torchvision's ``resnext50_32x4d`` layout written out here
(torchvision cannot be imported with the CPU torch): ``Bottleneck`` blocks of 3, 4, 6 and 3, a
grouped 3x3 convolution of 32 groups of ``planes / 16`` channels (128 to 1,024 channels),
expansion 4 (256 to 2,048 output channels), a CIFAR-style 3x3 stem of 64 channels.  Prints, per
method, the largest relative gap of the fused logits to the model's and the CPU seconds of the
fusion call, next to the floor (one forward pass of both models over the inputs)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/resnext50_permuted.py [samples [method ...]]

(default methods: weight-matching, git-rebasin, otfusion, kf-linear).
"""
import sys
import time

import torch  # noqa: E402

import neurofuse  # noqa: E402
from neurofuse.testing import permute_spaces  # noqa: E402
from torch import nn  # noqa: E402


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (ResNeXt: ``width = planes * base_width / 64 * groups``)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample, groups: int = 32, base_width: int = 4):
        super().__init__()
        width = int(planes * base_width / 64) * groups
        self.conv1, self.bn1 = nn.Conv2d(inplanes, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu, self.downsample = nn.ReLU(inplace=True), downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNeXt50(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        layers, inplanes = [], 64
        for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            for j in range(n):
                stride = 2 if stage and j == 0 else 1
                down = None
                if j == 0:
                    down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                         nn.BatchNorm2d(planes * 4))
                layers.append(Bottleneck(inplanes, planes, stride, down))
                inplanes = planes * 4
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


torch.set_num_threads(1)
torch.manual_seed(0)
model = ResNeXt50().eval()
with torch.no_grad():
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M")
net = neurofuse.levels_from(model, input_shape=(3, 32, 32))
twin = permute_spaces(net, seed=1)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 32
x = torch.randn(n, 3, 32, 32)
y = torch.randint(0, 10, (n,))
with torch.no_grad():
    ref = net(x)
    print(f"permuted copy: same function to {float((twin(x) - ref).abs().max() / ref.abs().max()):.1e}")
    c0 = time.process_time()
    net(x), twin(x)
    print(f"floor (one forward pass of both): {time.process_time() - c0:.2f} CPU s")
for method in sys.argv[2:] or ("weight-matching", "git-rebasin", "otfusion", "kf-linear"):
    c0 = time.process_time()
    fused = neurofuse.fuse([net, twin], None if method == "weight-matching" else (x, y), method=method,
                           progress=False)
    sec = time.process_time() - c0
    with torch.no_grad():
        gap = float((fused(x) - ref).abs().max() / ref.abs().max())
    print(f"{method}: relative gap {gap:.1e}, {sec:.1f} CPU s")
