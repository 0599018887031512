"""Models written the way people write them (torchvision / timm style), at tiny widths.

torchvision cannot be imported on the CPU machines (its wheels fail against the CPU torch), so
these follow ``torchvision.models.resnet`` (BasicBlock with BN and downsample, in-place ReLUs,
``out += identity``), ``torchvision.models.vgg`` (``vgg11_bn``: features / avgpool / classifier
with Dropout), ``torchvision.models.mobilenetv2`` (InvertedResidual with depthwise convs, ReLU6,
linear bottlenecks), timm's ``VisionTransformer`` (PatchEmbed, cls token, pos embed, pre-norm
blocks with an ``Attention`` and an ``Mlp``, ``x[:, 0]`` pooling, head dropout) and a plain MLP
with LayerNorm and Dropout, ``torchvision.models.resnet.Bottleneck`` with groups (ResNeXt).  No
neurofuse code is used in them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# -- torchvision ResNet ------------------------------------------------------------------------
def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), widths=(4, 8, 8, 16), num_classes=10, in_ch=3, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self._norm = norm_layer
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_ch, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), self._norm(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, self._norm)]
        self.inplanes = planes
        for _ in range(1, blocks):
            layers.append(BasicBlock(self.inplanes, planes, norm_layer=self._norm))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def resnet18(num_classes=10):
    return ResNet((2, 2, 2, 2), (4, 8, 8, 16), num_classes)


def resnet18_gn(num_classes=10, widths=(4, 8, 8, 16), in_ch=3):
    """torchvision's ResNet-18 with ``norm_layer=GroupNorm(2, C)``, as federated learning trains it."""
    return ResNet((2, 2, 2, 2), widths, num_classes, in_ch, norm_layer=lambda c: nn.GroupNorm(2, c))


# -- torchvision VGG-11 with BN -----------------------------------------------------------------
class VGG(nn.Module):
    def __init__(self, features, num_classes=10, hidden=32, dropout=0.5):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(features[-3].num_features * 4, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def make_layers(cfg, batch_norm=True, in_channels=3):
    layers = []
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)] if batch_norm else [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


def vgg11_bn(num_classes=10):
    # vgg11 "A": 64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M at 1/16 width
    cfg = [4, "M", 8, "M", 16, 16, "M", 16, 16, "M", 16, 16, "M"]
    return VGG(make_layers(cfg, batch_norm=True), num_classes)


# -- torchvision MobileNetV2 ---------------------------------------------------------------------
class Conv2dNormActivation(nn.Sequential):
    def __init__(self, in_planes, out_planes, kernel_size=3, stride=1, groups=1, activation=True):
        padding = (kernel_size - 1) // 2
        layers = [nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
                  nn.BatchNorm2d(out_planes)]
        if activation:
            layers.append(nn.ReLU6(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1))
        layers.extend([
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ])
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=10, setting=((1, 4, 1, 1), (4, 8, 2, 2), (4, 8, 1, 1)), dropout=0.2, in_ch=3,
                 width_mult=1):
        super().__init__()
        input_channel, last_channel = 4 * width_mult, 16 * width_mult
        features = [Conv2dNormActivation(in_ch, input_channel, stride=2)]
        for t, c, n, s in setting:
            c = c * width_mult
            for i in range(n):
                features.append(InvertedResidual(input_channel, c, s if i == 0 else 1, expand_ratio=t))
                input_channel = c
        features.append(Conv2dNormActivation(input_channel, last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_channel, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


# -- two conv branches joined by torch.cat (an Inception-style module) ---------------------------
class BranchNet(nn.Module):
    """A stem, then a 3x3 and a 5x5 conv branch concatenated, then a conv and a classifier."""

    def __init__(self, num_classes=10, in_ch=3, widths=(8, 6, 10, 16), hidden=32):
        super().__init__()
        stem, a, b, mid = widths
        self.stem = nn.Conv2d(in_ch, stem, 3, padding=1)
        self.branch3 = nn.Conv2d(stem, a, 3, padding=1)
        self.branch5 = nn.Conv2d(stem, b, 5, padding=2)
        self.mid = nn.Conv2d(a + b, mid, 3, padding=1)
        self.fc = nn.Linear(mid * 4, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        x = torch.cat([self.branch3(x), self.branch5(x)], dim=1)
        x = F.max_pool2d(F.relu(self.mid(F.relu(x))), 2)
        x = F.adaptive_avg_pool2d(x, (2, 2)).flatten(1)
        return self.out(F.relu(self.fc(x)))


# -- timm VisionTransformer ----------------------------------------------------------------------
class PatchEmbed(nn.Module):
    def __init__(self, img_size=16, patch_size=4, in_chans=3, embed_dim=16):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x):
        x = self.proj(x)
        x = x.flatten(2).transpose(1, 2)  # NCHW -> NLC
        return self.norm(x)


class Attention(nn.Module):
    def __init__(self, dim, num_heads=2, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=2.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = nn.Identity()
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = nn.Identity()
        self.drop_path2 = nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class VisionTransformer(nn.Module):
    def __init__(self, img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=16, depth=2,
                 num_heads=2, mlp_ratio=2.0, drop_rate=0.1):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)
        self.norm_pre = nn.Identity()
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.normal_(self.cls_token, std=1e-6)

    def _pos_embed(self, x):
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.pos_embed
        return self.pos_drop(x)

    def forward_features(self, x):
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.norm_pre(x)
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x):
        x = x[:, 0]
        x = self.head_drop(x)
        return self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# -- an MLP with LayerNorm and Dropout ---------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, in_features=3 * 8 * 8, hidden=(16, 16), num_classes=10, p=0.1):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.ln1 = nn.LayerNorm(hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.ln2 = nn.LayerNorm(hidden[1])
        self.drop = nn.Dropout(p)
        self.out = nn.Linear(hidden[1], num_classes)

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = self.drop(F.relu(self.ln1(self.fc1(x))))
        x = self.drop(F.relu(self.ln2(self.fc2(x))))
        return self.out(x)


class DropoutMLP(nn.Module):
    """An MLP whose levels end in Dropout (Linear -> Dropout -> ReLU) and whose output too."""

    def __init__(self, in_features=3 * 8 * 8, hidden=16, num_classes=10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.Dropout(0.2), nn.ReLU(),
                                 nn.Linear(hidden, num_classes), nn.Dropout(0.1))

    def forward(self, x):
        return self.net(x)


# -- pre-norm residual MLP blocks (ResMLP / MLP-Mixer channel mixing, written the usual way) ---
class MixerBlock(nn.Module):
    def __init__(self, dim, hidden, p=0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(p), nn.Linear(hidden, dim))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class ResMLP(nn.Module):
    def __init__(self, in_features=3 * 8 * 8, dim=16, hidden=32, depth=2, num_classes=10):
        super().__init__()
        self.embed = nn.Linear(in_features, dim)
        self.blocks = nn.Sequential(*[MixerBlock(dim, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(torch.flatten(x, 1)))))


# -- torchvision ResNeXt (Bottleneck with groups) ------------------------------------------------
class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck``: 1x1 conv, grouped 3x3 conv (``groups``, ``base_width``
    channels per group as ResNeXt's ``32x4d``), 1x1 conv, BN after each, ``out += identity``."""

    expansion = 2

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=4, base_width=4):
        super().__init__()
        width = groups * base_width
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNeXt(nn.Module):
    """A small ResNeXt: a stem, two stages of grouped bottlenecks (the second strided, with a
    downsample), average pooling and a linear head."""

    def __init__(self, num_classes=10, in_ch=3, widths=(8, 16), groups=4, base_width=4, blocks=(2, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers, inplanes = [], 16
        for stage, (planes, n) in enumerate(zip(widths, blocks)):
            stride = 1 if stage == 0 else 2
            for j in range(n):
                down = None
                if j == 0 and (stride != 1 or inplanes != planes * Bottleneck.expansion):
                    down = nn.Sequential(conv1x1(inplanes, planes * Bottleneck.expansion, stride),
                                         nn.BatchNorm2d(planes * Bottleneck.expansion))
                layers.append(Bottleneck(inplanes, planes, stride if j == 0 else 1, down, groups, base_width))
                inplanes = planes * Bottleneck.expansion
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class GroupedBasicBlock(nn.Module):
    """A basic block whose second 3x3 convolution is grouped and ends the block:
    ``shortcut(x) + BN(gconv(ReLU(BN(conv(x)))))``, the shortcut the identity or, when the block
    widens or strides, a 1x1 convolution with its BatchNorm (a projection)."""

    def __init__(self, inplanes, planes, groups, stride=1):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(inplanes, planes, stride), nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(identity + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class GroupedEndResNet(nn.Module):
    """Residual blocks that end in grouped convolutions: a stem, two such blocks, one that strides
    and widens (a projection shortcut), one more, average pooling and a linear head."""

    def __init__(self, num_classes=10, in_ch=3, widths=(16, 32), groups=4):
        super().__init__()
        self.stem = nn.Sequential(conv3x3(in_ch, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.blocks = nn.Sequential(GroupedBasicBlock(widths[0], widths[0], groups),
                                    GroupedBasicBlock(widths[0], widths[0], groups),
                                    GroupedBasicBlock(widths[0], widths[1], groups, stride=2),
                                    GroupedBasicBlock(widths[1], widths[1], groups))
        self.fc = nn.Linear(widths[1], num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def channel_shuffle(x, groups):
    """torchvision's ShuffleNet-V2 channel shuffle: ``view -> transpose -> view``."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """torchvision's ShuffleNet-V2 ``InvertedResidual``: a channel split (``chunk``) or two
    branches, a concatenation and a channel shuffle."""

    def __init__(self, inp, oup, stride):
        super().__init__()
        self.stride, half = stride, oup // 2
        self.branch1 = nn.Sequential()
        if stride > 1:
            self.branch1 = nn.Sequential(nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
                                         nn.Conv2d(inp, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """A small ShuffleNet-V2: a stem, a strided unit and a split unit, a 1x1 conv, pooling, a head."""

    def __init__(self, num_classes=10, in_ch=3):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_ch, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.stage2 = nn.Sequential(ShuffleUnit(8, 16, 2), ShuffleUnit(16, 16, 1))
        self.conv5 = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.conv5(self.stage2(self.conv1(x))).mean([2, 3]))


#: name -> (factory, input shape)
ARCHITECTURES = {
    "resnet18": (resnet18, (3, 32, 32)),
    "resnet18_gn": (resnet18_gn, (3, 32, 32)),
    "vgg11_bn": (vgg11_bn, (3, 32, 32)),
    "mobilenet_v2": (MobileNetV2, (3, 16, 16)),
    "vit": (VisionTransformer, (3, 16, 16)),
    "mlp_ln": (MLP, (3, 8, 8)),
    "resmlp": (ResMLP, (3, 8, 8)),
    "branches": (BranchNet, (3, 16, 16)),
    "resnext": (ResNeXt, (3, 16, 16)),
    "grouped_end": (GroupedEndResNet, (3, 16, 16)),
}
