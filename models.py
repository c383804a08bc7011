"""Networks: the classifiers f_theta and the mask networks g_phi of the paper.

All models take images in [0, 1]; CIFAR normalisation is each CIFAR classifier's first
layer, so attack budgets are in pixel units. The CIFAR mask network reads raw pixels
(x + delta in [0, 1]), as the authors' code feeds it. `build(name, dataset)` is the one entry point.

    mnist_cnn       MNIST classifier (4 conv + 2 linear, as the authors' code)
    mnist_mask      MNIST g_phi: 3 conv (LeakyReLU 0.2), upsample to 28x28, conv
    preact18        PreAct ResNet-18 (He et al. 2016)
    wrn34_10        WideResNet-34-10 (Zagoruyko & Komodakis 2016)
    resnet18_mask   CIFAR g_phi: ResNet-18 trunk, nearest upsample to 32x32, conv (no normalisation)

The mask networks return the pre-sigmoid logits z, shape of x; the mask is M = sigmoid(z),
taken in fp32 by `cat.mask_of` (under bf16 autocast a bf16 sigmoid rounds to exactly 1 for
z above ~6, with zero gradient). The paper's g_phi ends in that sigmoid.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# Per-channel statistics of the training sets, used by the Normalize first layer.
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}
CLASSES = {"mnist": 10, "cifar10": 10, "cifar100": 100}


class Normalize(nn.Module):
    """(x - mean) / std with fixed per-channel statistics; a buffer, not a parameter."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


# ----------------------------------------------------------------------------- MNIST

def mnist_cnn(num_classes=10):
    """28x28 -> 3x3 convs 1-32, 32-32 /2, 32-64, 64-64 /2 -> 64x7x7 = 3136 -> 100 -> classes."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),     # 14x14
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),     # 7x7
        nn.Flatten(), nn.Linear(3136, 100), nn.ReLU(), nn.Linear(100, num_classes),
    )


def mnist_mask():
    """g_phi for MNIST without its sigmoid: reads x + delta (N,1,28,28), returns logits z of that shape."""
    act = lambda: nn.LeakyReLU(0.2)
    return nn.Sequential(
        nn.Conv2d(1, 64, 3, stride=2, padding=1), act(),          # 14x14
        nn.Conv2d(64, 128, 3, padding=1), act(),
        nn.Conv2d(128, 128, 3, padding=1), act(),
        nn.Upsample(size=(28, 28), mode="nearest"),
        nn.Conv2d(128, 1, 3, padding=1),                          # z; M = sigmoid(z) in cat.mask_of
    )


# ----------------------------------------------------------------------------- ResNets

class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv-BN-ReLU-conv, identity or 1x1 shortcut."""

    def __init__(self, c_in, c_out, stride=1, drop=0.0):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.drop = drop
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = F.relu(self.bn2(out))
        if self.drop:
            out = F.dropout(out, self.drop, self.training)
        return self.conv2(out) + skip


class BasicBlock(nn.Module):
    """Post-activation ResNet basic block (He et al. 2015), used by the mask network's trunk."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _stages(block, c_in, widths, depths, **kw):
    """Stack `depths[i]` blocks of width `widths[i]`; every stage after the first halves H, W."""
    layers = []
    for i, (width, depth) in enumerate(zip(widths, depths)):
        for j in range(depth):
            layers.append(block(c_in, width, stride=2 if (i > 0 and j == 0) else 1, **kw))
            c_in = width
    return nn.Sequential(*layers)


class PreActResNet18(nn.Module):
    def __init__(self, num_classes=10, stats=STATS["cifar10"]):
        super().__init__()
        self.normalize = Normalize(*stats)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.layers = _stages(PreActBlock, 64, (64, 128, 256, 512), (2, 2, 2, 2))
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.layers(self.conv1(self.normalize(x)))       # (N, 512, 4, 4)
        out = F.relu(self.bn(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideResNet(nn.Module):
    """WRN-depth-widen: (depth - 4) / 6 pre-activation blocks per stage, widths 16k, 32k, 64k.

    Initialised as the WRN code the authors use: convolutions kaiming-normal with fan_out
    (std sqrt(2 / (k * k * c_out))), linear bias 0; batch norm and the linear weight keep
    PyTorch's defaults (weight 1 and bias 0; uniform)."""

    def __init__(self, depth=34, widen=10, num_classes=10, stats=STATS["cifar10"], drop=0.0):
        super().__init__()
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.normalize = Normalize(*stats)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.layers = _stages(PreActBlock, 16, widths, (n, n, n), drop=drop)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.linear = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv1(self.normalize(x)))))   # (N, 640, 8, 8)
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class ResNet18Mask(nn.Module):
    """g_phi for CIFAR: ResNet-18 trunk (512 x 4 x 4), nearest upsample to 32x32, 3x3 conv 512-3 -> logits z.

    It reads x + delta in raw [0, 1] pixels, without normalisation, as in the authors' code."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.layers = _stages(BasicBlock, 64, (64, 128, 256, 512), (2, 2, 2, 2))
        self.head = nn.Conv2d(512, 3, 3, padding=1)

    def forward(self, x):
        out = self.layers(self.stem(x))                          # (N, 512, 4, 4)
        out = F.interpolate(out, size=x.shape[-2:], mode="nearest")
        return self.head(out)                                    # z; M = sigmoid(z) in cat.mask_of


# ----------------------------------------------------------------------------- entry point

CLASSIFIERS = {"mnist": ("mnist_cnn",), "cifar10": ("preact18", "wrn34_10"), "cifar100": ("preact18", "wrn34_10")}
MASKS = {"mnist": "mnist_mask", "cifar10": "resnet18_mask", "cifar100": "resnet18_mask"}


def build(name, dataset):
    """Build network `name` for `dataset` ('mnist', 'cifar10', 'cifar100')."""
    if dataset not in SHAPES:
        raise ValueError(f"unknown dataset {dataset!r}: use one of {', '.join(SHAPES)}")
    allowed = CLASSIFIERS[dataset] + (MASKS[dataset],)
    if name not in allowed:
        raise ValueError(f"arch {name!r} does not fit dataset {dataset!r}: use one of {', '.join(allowed)}")
    classes, stats = CLASSES[dataset], STATS.get(dataset)
    if name == "mnist_cnn":
        return mnist_cnn(classes)
    if name == "mnist_mask":
        return mnist_mask()
    if name == "preact18":
        return PreActResNet18(classes, stats)
    if name == "wrn34_10":
        return WideResNet(34, 10, classes, stats)
    return ResNet18Mask()
